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
  does); ``ref=`` also takes a :class:`~harness.trace.Trace`, a trace file
  (:func:`~harness.notebook.storage.save_trace`) or a saved run folder.
* :func:`load` reopens a whole run written by :meth:`Drilldown.save` (table, verdict and all three
  traces) without running anything; :func:`drilldown_recorded` compares two recorded runs and
  :func:`from_traces` any two traces.

Tensors of loaded traces and runs are read on demand (``safetensors.safe_open``), one site at a
time (:mod:`harness.notebook.storage`); a run computed in this process holds its traces in
memory, as ``diff_gguf`` returns them.
"""
from __future__ import annotations

import os

import pandas as pd
import torch

from harness.compare.comparator import Comparison, compare_traces, decisive_column
from harness.report.html import CSS, esc, first_html, frame_html, verdict_html
from harness.diff import DiffRequest, DiffResult, diff_gguf
from harness.sites import matches, parse_site
from harness.compare.tolerance import Policy
from harness.trace import Trace
from harness.notebook.storage import is_recorded_run, load_reference, load_result, open_recorded, save_result
from harness.notebook.views import DiffTable, FirstView, SitePair, as_list, diff_table


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
        return save_result(path, self.result, self.gguf, self.to_dict())

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
    if is_recorded_run(ref_obj):
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
        cfg = read_config_file(gguf)
        validate_pattern(sites, cfg.n_layer, cfg.spec.sites)
    req = DiffRequest(gguf, prompt=prompt, tokens=list(tokens) if tokens is not None else None, steps=steps,
                      device=device, dtype=dtype, sites=sites, faults=_faults(inject), kv_type=kv_type,
                      flash_attn=flash_attn, local=local, extra_bufts=extra_bufts, isolate=isolate)
    return Drilldown(diff_gguf(req, model=model, ref=ref_trace), gguf=gguf, request=req)


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
    cmp = compare_traces(ours, ref, policy, local, judge_unanchored=False)   # local can only be anchored on ref
    cmp.meta.setdefault("faults", [])
    return Drilldown(DiffResult(cmp, ref, ours, local), gguf=gguf)


def load(path: str | os.PathLike) -> Drilldown:
    """Reopen a run written by :meth:`Drilldown.save` without running anything: the table and verdict
    from ``run.json``, the traces read on demand."""
    result, gguf = load_result(path)
    return Drilldown(result, gguf=gguf)
