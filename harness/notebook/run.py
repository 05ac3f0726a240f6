"""The notebook API: one call runs both engines and returns a :class:`Drilldown` to explore.

    import harness
    run = harness.drilldown("model.gguf", prompt="The quick brown fox", steps=4,
                          inject=["drop_qkv_bias"])        # faults: names, Fault records, mod:fn@sites
    run                                  # Jupyter: verdict, first divergence, per-layer summary
    run.table                            # every (step, site): errors, tolerances, verdicts (DataFrame)
    run.first                            # the first divergent op, with its inputs and neighbours
    p = run["blk.0.q", 0]                # (site, step): p.ours, p.ref, p.diff, p.local, p.local_diff
    p.worst(5); p.per("head"); p.hints() # the worst elements, error per head, what it looks like
    run.worst("blk.0.q", k=5)            # top elements over all steps, with named indices
    run.filter(layer=0, site="q*", step=0)
    run.plot_layers(); run.plot_steps("blk.0.q"); run.plot_attention(0, head=1)
    run.plot_logits(step=2); run.plot_hist("blk.0.q")          # see harness.report.plots
    run.to_html("reports/x.html"); run.save("runs/x"); harness.notebook.run.load("runs/x")

Reusing recorded data instead of recomputing it:

* ``harness.drilldown(ref="reference_runs/NAME", inject=[...])`` takes the reference (llama.cpp)
  side from a recorded run (``llamadiff record``, :mod:`harness.runs.store`) and only runs our model
  (on the run's tokens, against the run's GGUF, found and sha256-checked as ``llamadiff gate``
  does); ``ref=`` also takes a :class:`~harness.trace.Trace`, a trace file (:func:`save_trace`)
  or a saved run folder.
* :func:`load` reopens a whole run written by :meth:`Drilldown.save` (table, verdict and all three
  traces) without running anything; :func:`drilldown_recorded` compares two recorded runs and
  :func:`from_traces` any two traces.

Tensors of loaded traces and runs are read on demand (``safetensors.safe_open``), one site at a
time (:class:`LazyTensors`); a run computed in this process holds its traces in memory, as
``diff_gguf`` returns them.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, MutableMapping

import pandas as pd
import torch

from harness.compare.comparator import Comparison, FirstDivergence, compare_traces, decisive_column
from harness.report.html import CSS, esc, first_html, frame_html, verdict_html
from harness.diff import DiffRequest, DiffResult, diff_gguf
from harness.sites import matches, parse_site
from harness.compare.tolerance import Policy
from harness.trace import Trace
from harness.notebook.views import DiffTable, FirstView, SitePair, as_list, diff_table

RUN_FORMAT = 1


class Drilldown:
    """A comparison and its three traces (``ref``: llama.cpp, ``ours``: PyTorch end to end,
    ``local``: each of our ops on the reference's inputs, or None). Has the attributes of a
    :class:`~harness.diff.DiffResult`, so :mod:`harness.report.plots` and
    :func:`harness.report.html.render_html` take it directly."""

    def __init__(self, result: DiffResult, gguf: str | None = None, request: DiffRequest | None = None):
        self.result, self.gguf, self.request = result, gguf, request
        self._vocab: list[str] | None = None
        self._rows: dict | None = None

    # the DiffResult fields
    @property
    def comparison(self) -> Comparison:
        return self.result.comparison

    @property
    def ref(self) -> Trace:
        return self.result.ref

    @property
    def ours(self) -> Trace:
        return self.result.ours

    @property
    def local(self) -> Trace | None:
        return self.result.local

    # summary
    @property
    def table(self) -> DiffTable:
        """Every compared (step, site) in execution order (see harness.compare.comparator for the columns)."""
        f = self.comparison.first
        return diff_table(self.comparison.table, first=(f.step, f.site) if f else None)

    @property
    def first(self) -> FirstView | None:
        f = self.comparison.first
        return FirstView(self, f) if f is not None else None

    @property
    def diverged(self) -> bool:
        return self.comparison.diverged

    @property
    def verdict(self) -> str:
        from harness.report.text import verdict_line
        return verdict_line(self.comparison)

    @property
    def meta(self) -> dict:
        return self.comparison.meta

    @property
    def n_layer(self) -> int:
        return self.ref.n_layer

    @property
    def tokens(self) -> list[int]:
        return list(self.ref.tokens)

    @property
    def logits(self) -> DiffTable:
        """Per (step, token row): top-1 agreement, top-k overlap, KL."""
        return diff_table(self.comparison.logit_rows)

    @property
    def spikes(self) -> DiffTable:
        return diff_table(self.comparison.spikes)

    def steps(self) -> list[int]:
        return sorted(set(int(s) for s in self.comparison.table["step"]))

    def sites(self) -> list[str]:
        return list(dict.fromkeys(self.comparison.table["site"]))

    def summary(self) -> DiffTable:
        """One row per layer: worst errors, failures (:func:`harness.report.text.layer_summary`)."""
        from harness.report.text import layer_summary
        return diff_table(layer_summary(self.comparison))

    # token text
    @property
    def vocab(self) -> list[str] | None:
        if self._vocab is None and self.gguf and os.path.isfile(self.gguf):
            from harness.gguf.load import read_tokens
            self._vocab = read_tokens(self.gguf)
        return self._vocab

    def token_text(self, tok: int) -> str | None:
        v = self.vocab
        return v[tok] if v is not None and 0 <= tok < len(v) else None

    # element access
    def table_row(self, step: int, site: str) -> dict | None:
        """The table row of (step, site) as a dict, or None when it was not compared."""
        if self._rows is None:
            self._rows = {(int(r["step"]), r["site"]): r for r in self.comparison.table.to_dict("records")}
        return self._rows.get((step, site))

    def __getitem__(self, key) -> SitePair:
        """``run[site, step]`` (or ``run[step, site]``, or ``run[site]`` for the prefill)."""
        if isinstance(key, str):
            site, step = key, 0
        elif isinstance(key, tuple) and len(key) == 2:
            site, step = (key[0], key[1]) if isinstance(key[0], str) else (key[1], key[0])
        else:
            raise KeyError(f"use run[site, step], e.g. run['blk.0.q', 0]; got {key!r}")
        parse_site(site)
        if (int(step), site) not in self.ref:
            have = sorted(s for s, n in self.ref.keys() if n == site) if site in set(self.sites()) else []
            raise KeyError(f"{site} at step {step} is not in this run"
                           + (f" (steps with it: {have})" if have else " (not captured: see run.sites())"))
        return SitePair(self, site, int(step))

    def pair(self, site: str, step: int = 0) -> SitePair:
        return self[site, step]

    def worst(self, site: str, k: int = 10, step: int | None = None, local: bool = False) -> DiffTable:
        """The ``k`` worst elements of ``site`` (a name or glob, several comma-separated) over every
        step (or ``step``), with their indices named by the site's layout."""
        names = [n for n in self.sites() if matches(n, site)]
        if not names:
            raise KeyError(f"no site matching {site!r} (see run.sites())")
        steps = self.steps() if step is None else as_list(step)
        parts = []
        for n in names:
            for s in steps:
                if (s, n) in self.ref:
                    p = SitePair(self, n, s)
                    parts.append(p.worst(k, local=local))
        df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        if df.empty:
            return diff_table(df)
        return diff_table(df.sort_values("abs_diff", ascending=False, kind="stable").head(k).reset_index(drop=True))

    def filter(self, layer=None, site=None, step=None, failed: bool | None = None, family=None,
               local_failed: bool | None = None) -> DiffTable:
        """Table rows by layer (int or list; global sites have none), site (globs over the op key
        or the full name, e.g. ``"q*"``, ``"blk.0.*"``; a list or comma-separated), step, family,
        and verdict: ``failed`` uses the deciding verdict (local when measured), ``local_failed``
        the local one."""
        t = self.comparison.table
        m = pd.Series(True, index=t.index)
        if layer is not None:
            m &= t["layer"].isin(as_list(layer))
        if site is not None:
            pats = as_list(site)
            m &= pd.Series([any(matches(n, p) or matches(k, p) for p in pats)
                            for n, k in zip(t["site"], t["op"])], index=t.index, dtype=bool)
        if step is not None:
            m &= t["step"].isin(as_list(step))
        if family is not None:
            m &= t["family"].isin(as_list(family))
        if failed is not None:
            m &= t[decisive_column(t)].map(lambda v: not pd.isna(v) and not bool(v)) == failed
        if local_failed is not None:
            m &= t["local_passed"].map(lambda v: not pd.isna(v) and not bool(v)) == local_failed
        f = self.comparison.first
        return diff_table(t[m.to_numpy(dtype=bool)], first=(f.step, f.site) if f else None)

    # plots (harness.report.plots)
    def plot_layers(self, **kw):
        from harness.report import plots
        return plots.layer_errors(self, **kw)

    def plot_steps(self, site: str | None = None, **kw):
        from harness.report import plots
        site = site or (self.comparison.first.site if self.comparison.first else "logits")
        return plots.step_errors(self, site, **kw)

    def plot_attention(self, layer: int, head: int, step: int = 0, **kw):
        from harness.report import plots
        return plots.attention(self, layer, head, step=step, **kw)

    def plot_logits(self, step: int = 0, row: int = -1, k: int = 8, **kw):
        from harness.report import plots
        return plots.logits(self, step=step, row=row, k=k, vocab=kw.pop("vocab", self.vocab), **kw)

    def plot_hist(self, site: str | None = None, step: int | None = None, **kw):
        from harness.report import plots
        f = self.comparison.first
        site = site or (f.site if f else "logits")
        step = step if step is not None else (f.step if f and f.site == site else 0)
        return plots.error_hist(self, site, step=step, **kw)

    # output
    def to_dict(self) -> dict:
        from harness.report.text import to_dict
        return to_dict(self.comparison)

    def to_json(self) -> str:
        from harness.report.text import to_json
        return to_json(self.comparison)

    def to_html(self, path: str | os.PathLike | None = None) -> str:
        """The self-contained HTML report (written to ``path`` when given)."""
        from harness.report.html import render_html
        text = render_html(self, vocab=self.vocab)
        if path is not None:
            path = os.fspath(path)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    def save(self, path: str | os.PathLike) -> str:
        """Write the run to folder ``path``: ``run.json`` (the JSON report plus what :func:`load`
        needs) and ``ref``/``ours``/``local`` ``.safetensors`` traces. Returns the folder."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        for name in ("ref", "ours", "local"):
            trace = getattr(self, name)
            if trace is not None:
                save_trace(trace, os.path.join(path, f"{name}.safetensors"))
        doc = dict(llamadiff_run=RUN_FORMAT, gguf=os.path.abspath(self.gguf) if self.gguf else None,
                   has_local=self.local is not None, report=self.to_dict())
        tmp = os.path.join(path, ".run.json.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, allow_nan=False)
        os.replace(tmp, os.path.join(path, "run.json"))
        return path

    # display
    def __repr__(self) -> str:
        from harness.report.text import render_text_table
        return render_text_table(self.comparison, width=120)

    def _repr_html_(self) -> str:
        from harness.report.text import header_lines, logit_lines
        cmp = self.comparison
        parts = [f'<div class="llamadiff"><style>{CSS}</style>']
        parts += [f'<p class="meta">{esc(line)}</p>' for line in header_lines(cmp)]
        parts.append(verdict_html(cmp))
        if cmp.first is not None:
            parts.append(first_html(cmp))
        summary = self.summary()
        if not summary.empty:
            parts.append("<p>per-layer summary (worst over steps and sites):</p>")
            parts.append(frame_html(summary))
        parts += [f"<pre>{esc(line)}</pre>" for line in logit_lines(cmp)[:1]]
        parts.append('<p class="meta">explore: run.table, run.first, run["blk.0.q", 0], run.worst(site), '
                     "run.filter(layer=, site=, step=), run.plot_layers()</p></div>")
        return "".join(parts)


# -- entry points ------------------------------------------------------------------------------
def _faults(inject) -> list:
    from harness.ours.inject import Fault, get_fault
    items = [inject] if isinstance(inject, (str, Fault)) else list(inject or [])
    return [f if isinstance(f, Fault) else get_fault(f) for f in items]


def drilldown(gguf: str | os.PathLike | None = None, prompt: str | None = None, *, tokens: list[int] | None = None,
            steps: int = 4, device: str = "cpu", dtype: str = "float32", sites: str | None = None,
            inject=(), kv_type: str = "f16", flash_attn: bool = False, local: bool = True,
            ref=None, model=None, extra_bufts: bool = False, isolate: bool = True) -> Drilldown:
    """Run llama.cpp and our PyTorch model on ``gguf`` and compare them op by op.

    ``prompt`` (text, tokenized by llama.cpp) or ``tokens``; ``steps`` decode steps after the
    prefill; ``device`` "cpu" or "cuda" for both sides; ``sites`` a glob to capture fewer sites;
    ``inject`` fault names (``harness.ours.inject``), ``Fault`` records or ``module:function@sites``;
    ``model`` an already loaded ``harness.ours.model.Model`` to reuse; ``extra_bufts`` llama.cpp's
    CPU weight repacking (its default, not what the tolerances were calibrated on). llama.cpp runs
    in a worker process: a crash inside it raises ``LlamaCrash`` and this kernel lives on
    (``isolate=False``: in this process, a little faster on CUDA, but a crash kills the kernel).

    ``ref`` skips llama.cpp: a recorded reference run folder (``llamadiff record``; its tokens,
    steps and KV type are used, its tensors read on demand, and ``gguf`` may be left out: the
    run's own GGUF is found and sha256-checked), a trace file or saved run folder
    (:meth:`Drilldown.save`), or a :class:`~harness.trace.Trace` / ``Drilldown`` in memory."""
    ref_obj = load_reference(ref, lazy_run=True) if ref is not None else None
    if _is_recorded_run(ref_obj):
        return _compare_recorded(ref_obj, gguf, tokens=tokens, device=device, dtype=dtype, sites=sites,
                                 inject=inject, local=local, model=model)
    if gguf is None:
        raise ValueError("give the GGUF to compare (or ref= a recorded reference run)")
    gguf = os.fspath(gguf)
    ref_trace = ref_obj
    if ref_trace is None and (prompt is None) == (tokens is None):
        raise ValueError("give exactly one of prompt='text' or tokens=[ids]")
    if ref_trace is not None and tokens is not None and list(tokens) != list(ref_trace.tokens[:ref_trace.n_prompt]):
        raise ValueError("tokens= differ from the recorded reference's prompt tokens")
    if steps < 0:
        raise ValueError("steps must be >= 0")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda': no CUDA device is visible to PyTorch")
    if sites:
        from harness.gguf.load import read_config_file
        from harness.sites import validate_pattern
        validate_pattern(sites, read_config_file(gguf).n_layer)
    req = DiffRequest(gguf, prompt=prompt, tokens=list(tokens) if tokens is not None else None, steps=steps,
                      device=device, dtype=dtype, sites=sites, faults=_faults(inject), kv_type=kv_type,
                      flash_attn=flash_attn, local=local, extra_bufts=extra_bufts, isolate=isolate)
    return Drilldown(diff_gguf(req, model=model, ref=ref_trace), gguf=gguf, request=req)


def _is_recorded_run(obj) -> bool:
    return obj is not None and not isinstance(obj, Trace) and isinstance(getattr(obj, "trace", None), Trace)


def _compare_recorded(rec, gguf, *, tokens, device, dtype, sites, inject, local, model) -> Drilldown:
    """Our model against a recorded reference run (what ``llamadiff gate`` does), keeping the traces."""
    from harness.runs.gate import locate_gguf, replay
    ref = rec.trace
    if tokens is not None and list(tokens) != list(ref.tokens[:ref.n_prompt]):
        raise ValueError("tokens= differ from the recorded run's prompt tokens")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda': no CUDA device is visible to PyTorch")
    gguf = os.fspath(gguf) if gguf is not None else locate_gguf(rec)
    result, req = replay(rec, gguf, _faults(inject), device, dtype, sites=sites, local=local, model=model)
    return Drilldown(result, gguf=gguf, request=req)


def drilldown_recorded(reference, candidate) -> Drilldown:
    """Compare two recorded traces (``harness.runs.store`` folders, e.g. llama.cpp against another
    engine's dump) without running anything; tensors are read on demand."""
    from harness.runs.store import compare_runs
    ref, cand = open_recorded(reference), open_recorded(candidate)
    cmp = compare_runs(ref, cand)
    cmp.meta.setdefault("faults", [])
    return Drilldown(DiffResult(cmp, ref.trace, cand.trace, None))


def from_traces(ours: Trace, ref: Trace, local: Trace | None = None, gguf: str | None = None,
                policy: Policy | None = None) -> Drilldown:
    """Compare two existing traces (nothing is run). The tolerance policy comes from their
    metadata (reference backend, our weight type and dtype) unless given."""
    if policy is None:
        weight_type = ours.meta.get("weight_type") or ref.meta.get("weight_type", "F32")
        policy = Policy(ref.meta.get("backend", "cpu"), weight_type, ours.meta.get("dtype", "float32"))
    cmp = compare_traces(ours, ref, policy, local)
    cmp.meta.setdefault("faults", [])
    return Drilldown(DiffResult(cmp, ref, ours, local), gguf=gguf)


# -- traces on disk (lazy) ---------------------------------------------------------------------
class LazyTensors(MutableMapping):
    """``(step, site) -> tensor`` backed by safetensors files: ``names`` maps each key to
    ``(file, tensor name)``; a tensor is read (as float32) when asked for and not kept.
    Assigned tensors live in memory on top."""

    def __init__(self, names: Mapping[tuple[int, str], tuple[str, str]]):
        self.names = dict(names)
        self.extra: dict[tuple[int, str], torch.Tensor] = {}

    def __getitem__(self, key):
        if key in self.extra:
            return self.extra[key]
        path, name = self.names[key]
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            t = f.get_tensor(name)
        return t if t.dtype == torch.float32 else t.float()

    def __setitem__(self, key, value):
        self.extra[key] = value

    def __delitem__(self, key):
        if key in self.extra:
            del self.extra[key]
        else:
            del self.names[key]

    def __contains__(self, key):
        return key in self.extra or key in self.names

    def __iter__(self):
        yield from self.names
        yield from (k for k in self.extra if k not in self.names)

    def __len__(self):
        return len(self.names) + sum(1 for k in self.extra if k not in self.names)


def _tensor_name(step: int, site: str) -> str:
    return f"{step}/{site}"


def save_trace(trace: Trace, path: str | os.PathLike) -> str:
    """One safetensors file: tensors ``"{step}/{site}"``, and the trace's n_layer, tokens,
    n_prompt and meta as JSON in the file's metadata. (A folder of the shareable recorded-run
    format is ``harness.runs.store.write_trace``.)"""
    from safetensors.torch import save_file
    path = os.fspath(path)
    tensors = {_tensor_name(s, n): t.detach().float().cpu().contiguous().clone() for (s, n), t in trace.items()}
    header = dict(format=RUN_FORMAT, n_layer=trace.n_layer, tokens=list(trace.tokens), n_prompt=trace.n_prompt,
                  meta=trace.meta)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"llamadiff_trace": json.dumps(header, default=str)})
    os.replace(tmp, path)
    return path


def read_trace(path: str | os.PathLike) -> Trace:
    """A trace file written by :func:`save_trace`, its tensors read on demand."""
    from safetensors import safe_open
    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        header = json.loads((f.metadata() or {}).get("llamadiff_trace", "null") or "null")
        keys = list(f.keys())
    if header is None:
        raise ValueError(f"{path}: not a llamadiff trace file (no llamadiff_trace metadata)")
    names = {}
    for k in keys:
        step, _, site = k.partition("/")
        names[(int(step), site)] = (path, k)
    return Trace(int(header["n_layer"]), tokens=list(header["tokens"]), n_prompt=int(header["n_prompt"]),
                 meta=dict(header.get("meta") or {}), tensors=LazyTensors(names))


def open_recorded(path: str | os.PathLike, verify: bool = False):
    """A recorded run (``harness.runs.store`` format: a folder with manifest.json and safetensors)
    as a ``harness.runs.store.RecordedRun`` whose trace reads each tensor on demand. The manifest and every
    file header are validated (``runs.load_run``) but no tensor is read; ``verify`` also checks
    the files' sha256 (reads them once)."""
    from harness.runs import store as runs
    from harness.sites import SiteFilter
    from harness.compare.tolerance import UNIT_ROUNDOFF
    rec = runs.load_run(os.fspath(path), filt=SiteFilter(steps=frozenset()), verify=verify)   # reads no tensor
    names, storages = {}, set()
    for e in rec.manifest["tensors"]:
        step, _, site = str(e["name"]).partition("/")
        names[(int(step), site)] = (os.path.join(rec.path, e["file"]), e["name"])
        storages.add(runs.STORAGE_OF_TAG[e["dtype"]])
    rec.storage = max(storages or {"float32"}, key=lambda s: UNIT_ROUNDOFF[s])
    rec.trace.meta["storage_dtype"] = rec.storage
    rec.trace.tensors = LazyTensors(names)
    return rec


def load_reference(source, lazy_run: bool = False):
    """The reference side from a :class:`Trace` (as is), a Drilldown/DiffResult (its ``ref``), a trace
    file (:func:`save_trace`), a saved run folder (:meth:`Drilldown.save`: its ``ref.safetensors``) or
    a recorded reference run folder (``harness.runs.store``; returned as its lazy Trace, or with
    ``lazy_run`` as the ``RecordedRun`` record from :func:`open_recorded`)."""
    if isinstance(source, Trace):
        return source
    if _is_recorded_run(source):
        return source if lazy_run else source.trace
    if isinstance(getattr(source, "ref", None), Trace):
        return source.ref
    path = os.fspath(source)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "run.json")):
        return read_trace(os.path.join(path, "ref.safetensors"))
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return read_trace(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.json")) or \
            os.path.basename(path) == "manifest.json":
        rec = open_recorded(path)
        return rec if lazy_run else rec.trace
    raise FileNotFoundError(f"{path}: not a trace file, a saved run folder or a recorded reference run")


def load(path: str | os.PathLike) -> Drilldown:
    """Reopen a run written by :meth:`Drilldown.save` without running anything: the table and verdict
    from ``run.json``, the traces read on demand."""
    path = os.fspath(path)
    with open(os.path.join(path, "run.json")) as f:
        doc = json.load(f)
    if doc.get("llamadiff_run") != RUN_FORMAT:
        raise ValueError(f"{path}: not a llamadiff run folder (format {doc.get('llamadiff_run')!r})")
    rep = doc["report"]
    table = _table_from_records(rep["table"])
    first = None
    fd = rep.get("first_divergence")
    if fd:
        rows = {(int(r["step"]), r["site"]): r for r in table.to_dict("records")}
        first = FirstDivergence(int(fd["step"]), fd["layer"], fd["site"], fd["kind"],
                                rows.get((int(fd["step"]), fd["site"]), fd["row"]), list(fd.get("inputs") or []),
                                fd["explanation"], [tuple(x) for x in fd.get("also_failing_locally") or []])
    e2e = rep.get("first_end_to_end_failure")
    cmp = Comparison(table, pd.DataFrame(rep.get("logits") or []), pd.DataFrame(rep.get("logit_spikes") or []),
                     first, tuple(e2e) if e2e else None, rep.get("meta") or {})
    traces = {n: read_trace(os.path.join(path, f"{n}.safetensors"))
              if os.path.isfile(os.path.join(path, f"{n}.safetensors")) else None for n in ("ref", "ours", "local")}
    gguf = doc.get("gguf")
    return Drilldown(DiffResult(cmp, traces["ref"], traces["ours"], traces["local"]), gguf=gguf)


_FLOAT_COLS = ("layer", "max_abs", "rel_l2", "max_norm", "cosine", "ours", "ref", "tol_rel", "tol_max",
               "local_rel_l2", "local_max_norm", "local_ours", "local_ref", "local_tol_rel", "local_tol_max")


def _table_from_records(records: list[dict]) -> pd.DataFrame:
    """Undo the JSON report's encoding of the table (tuples as lists, inf as "inf", NaN as null)."""
    t = pd.DataFrame(records)
    if t.empty:
        return t
    for col in ("shape", "worst_index"):
        if col in t:
            t[col] = t[col].map(lambda v: tuple(v) if isinstance(v, list) else v)
    for col in _FLOAT_COLS:
        if col in t:
            t[col] = pd.to_numeric(t[col].map(lambda v: float(v) if isinstance(v, str) else v), errors="coerce")
    if "local_passed" in t:
        col = t["local_passed"]
        t["local_passed"] = col.astype(bool) if col.notna().all() else col.map(
            lambda v: pd.NA if v is None or pd.isna(v) else bool(v)).astype(object)
    return t
