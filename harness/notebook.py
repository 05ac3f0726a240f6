"""The notebook API: one call runs both engines and returns a :class:`Run` to explore.

    import harness
    run = harness.compare("model.gguf", prompt="The quick brown fox", steps=4,
                          inject=["drop_qkv_bias"])        # faults: names, Fault records, mod:fn@sites
    run                                  # Jupyter: verdict, first divergence, per-layer summary
    run.table                            # every (step, site): errors, tolerances, verdicts (DataFrame)
    run.first                            # the first divergent op, with its inputs and neighbours
    p = run["blk.0.q", 0]                # (site, step): p.ours, p.ref, p.diff, p.local, p.local_diff
    p.worst(5); p.per("head"); p.hints() # the worst elements, error per head, what it looks like
    run.worst("blk.0.q", k=5)            # top elements over all steps, with named indices
    run.filter(layer=0, site="q*", step=0)
    run.plot_layers(); run.plot_steps("blk.0.q"); run.plot_attention(0, head=1)
    run.plot_logits(step=2); run.plot_hist("blk.0.q")          # see harness.plots
    run.to_html("reports/x.html"); run.save("runs/x"); harness.notebook.load("runs/x")

Reusing recorded data instead of recomputing it:

* ``harness.compare(ref="reference_runs/NAME", inject=[...])`` takes the reference (llama.cpp)
  side from a recorded run (``llamadiff record``, :mod:`harness.runs`) and only runs our model
  (on the run's tokens, against the run's GGUF, found and sha256-checked as ``llamadiff gate``
  does); ``ref=`` also takes a :class:`~harness.trace.Trace`, a trace file (:func:`save_trace`)
  or a saved run folder.
* :func:`load` reopens a whole run written by :meth:`Run.save` (table, verdict and all three
  traces) without running anything; :func:`compare_recorded` compares two recorded runs and
  :func:`from_traces` any two traces.

Tensors of loaded traces and runs are read on demand (``safetensors.safe_open``), one site at a
time (:class:`LazyTensors`); a run computed in this process holds its traces in memory, as
``diff_gguf`` returns them.
"""
from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import pandas as pd
import torch

from .compare import Comparison, FirstDivergence, compare as compare_traces, step_label
from .html_report import CSS, esc, first_html, frame_html, verdict_html
from .pipeline import DiffRequest, DiffResult, diff_gguf
from .sites import input_sites, order_key, parse_site
from .tolerance import Policy
from .trace import Trace

RUN_FORMAT = 1
DIM_NAMES = {"T": "token", "H": "head", "Hkv": "kv_head", "Dh": "dim", "P": "pos", "D": "dim", "F": "dim",
             "V": "vocab"}
# Columns of a one-row summary of a site (SitePair display).
DISPLAY_COLUMNS = ("step", "site", "shape", "rel_l2", "max_abs", "cosine", "worst", "ours", "ref", "tol_rel",
                   "passed", "local_rel_l2", "local_tol_rel", "local_passed", "local_worst")


# -- tables --------------------------------------------------------------------------------------
class DiffTable(pd.DataFrame):
    """A pandas DataFrame that renders in Jupyter with failing rows tinted and numbers formatted
    (at most ``max_rows`` rows; a divergence table without its bookkeeping columns such as
    ``op``, ``family``, ``worst_index``; ``pd.DataFrame(df)`` shows everything). Every pandas
    operation works and keeps the type."""

    _metadata: list[str] = []
    max_rows = 60

    @property
    def _constructor(self):
        return DiffTable

    def _repr_html_(self) -> str:
        cols = list(self.columns)
        if {"rel_l2", "tol_rel", "site"} <= set(cols):      # a divergence table: the usual columns
            cols = [c for c in cols if c not in _HIDDEN]
        first = self.attrs.get("first")
        body = frame_html(self, columns=cols, max_rows=self.max_rows, first=first,
                          step_rows="step" in self.columns and "site" in self.columns)
        return f'<div class="llamadiff"><style>{CSS}</style>{body}</div>'


_HIDDEN = {"op", "family", "worst_index", "nonfinite", "local_ours", "local_ref"}


def _table(df: pd.DataFrame, first: tuple[int, str] | None = None) -> DiffTable:
    t = DiffTable(df)
    if first is not None:
        t.attrs["first"] = first
    return t


def _as_list(x) -> list | None:
    if x is None:
        return None
    if isinstance(x, (str, bytes)) or not isinstance(x, Iterable):
        return [x]
    return list(x)


# -- one site, one step ---------------------------------------------------------------------------
class SitePair:
    """Both sides of one site at one step: ``ours``, ``ref``, ``diff`` (ours - ref), ``local``
    (our op on the reference's inputs, or None) and ``local_diff``; ``row`` is its table row.
    Tensors are fetched from the traces on first use (float32, CPU)."""

    def __init__(self, run: "Run", site: str, step: int):
        self.run, self.site, self.step = run, site, int(step)
        self.layer, spec = parse_site(site)
        self.op, self.layout = spec.key, spec.layout
        self.dims = tuple(DIM_NAMES[d] for d in spec.layout)
        self.row: dict | None = run._row(self.step, site)
        self._cache: dict[str, torch.Tensor | None] = {}

    def _get(self, which: str) -> torch.Tensor | None:
        if which not in self._cache:
            trace = getattr(self.run, which)
            key = (self.step, self.site)
            self._cache[which] = trace[key].detach().float().cpu() if trace is not None and key in trace else None
        return self._cache[which]

    @property
    def ours(self) -> torch.Tensor:
        return self._get("ours")

    @property
    def ref(self) -> torch.Tensor:
        return self._get("ref")

    @property
    def local(self) -> torch.Tensor | None:
        return self._get("local")

    @property
    def diff(self) -> torch.Tensor:
        return self.ours - self.ref

    @property
    def local_diff(self) -> torch.Tensor | None:
        return None if self.local is None else self.local - self.ref

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.ref.shape)

    def _side(self, local: bool) -> torch.Tensor:
        if local and self.local is None:
            raise ValueError(f"no local trace for {self.site} at step {self.step} (run with local=True)")
        return self.local if local else self.ours

    def stats(self, local: bool = False):
        """:class:`harness.metrics.PairStats` of ours (or local) against the reference."""
        from .metrics import pair_stats
        return pair_stats(self._side(local), self.ref)

    def worst(self, k: int = 10, local: bool = False) -> DiffTable:
        """The ``k`` elements with the largest |ours - ref|, with their named indices (``token``
        is the row within the step; ``token_id`` the token fed there; ``vocab`` ids get their text)."""
        return _worst_elements(self.run, self.site, self.step, self._side(local), self.ref, k)

    def per(self, dim: str = "head", local: bool = False) -> DiffTable:
        """Error per index along one named dim (``head``, ``token``, ``pos``, ``dim``, ...)."""
        if dim not in self.dims:
            raise ValueError(f"{self.site} has dims {self.dims}, not {dim!r}")
        axis = self.dims.index(dim)
        a, b = self._side(local).double(), self.ref.double()
        a, b = a.movedim(axis, 0).reshape(a.shape[axis], -1), b.movedim(axis, 0).reshape(b.shape[axis], -1)
        d = a - b
        dn, bn = d.norm(dim=1), b.norm(dim=1)
        rows = []
        for i in range(a.shape[0]):
            j = int(d[i].abs().argmax()) if d.shape[1] else 0
            rows.append({dim: i, "rel_l2": float(dn[i] / bn[i]) if float(bn[i]) > 0 else float(dn[i]),
                         "max_abs": float(d[i].abs().max()) if d.shape[1] else 0.0,
                         "ours": float(a[i, j]), "ref": float(b[i, j])})
        return _table(pd.DataFrame(rows))

    def by_head(self, local: bool = False) -> DiffTable:
        return self.per("head" if "head" in self.dims else "kv_head", local)

    def hints(self, local: bool | None = None) -> list[str]:
        """Plain-language observations about what the difference looks like (op skipped, a
        constant offset per feature, a scale factor, error confined to some heads/tokens...)."""
        local = self.local is not None if local is None else local
        return _hints(self, local)

    def __repr__(self) -> str:
        r = self.row or {}
        parts = [f"SitePair({self.site} at {step_label(self.step)}, shape {self.shape}, dims {self.dims}"]
        if r:
            parts.append(f"rel {r['rel_l2']:.3g} {'ok' if r['passed'] else 'FAIL'}")
            if r.get("local_rel_l2") is not None and not pd.isna(r.get("local_rel_l2")):
                parts.append(f"local rel {r['local_rel_l2']:.3g} {'ok' if r['local_passed'] else 'FAIL'}")
        return ", ".join(parts) + "; .ours .ref .diff .local .local_diff .worst() .per() .hints())"

    def _repr_html_(self) -> str:
        rows = [self.row] if self.row else []
        head = f"<p><b>{esc(self.site)}</b> at {esc(step_label(self.step))}: shape {esc(self.shape)}, dims " \
               f"{esc(', '.join(self.dims))}</p>"
        body = frame_html(pd.DataFrame(rows), columns=list(DISPLAY_COLUMNS)) if rows else ""
        worst = frame_html(self.worst(5, local=self.local is not None))
        hints = "".join(f"<li>{esc(h)}</li>" for h in self.hints())
        return (f'<div class="llamadiff"><style>{CSS}</style>{head}{body}<p>worst elements'
                f'{" (local)" if self.local is not None else ""}:</p>{worst}'
                f'{"<ul>" + hints + "</ul>" if hints else ""}</div>')


def _worst_elements(run: "Run", site: str, step: int, ours: torch.Tensor, ref: torch.Tensor, k: int) -> DiffTable:
    a, b = ours.detach().double(), ref.detach().double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
    bad = ~(torch.isfinite(a) & torch.isfinite(b)) & ~both_inf
    diff = torch.where(both_inf, 0.0, a - b)
    mag = torch.where(bad, torch.inf, diff.abs()).reshape(-1)
    fb = torch.where(torch.isfinite(b), b, 0.0)
    rms = float(fb.norm()) / max(b.numel(), 1) ** 0.5
    k = min(k, mag.numel())
    top = torch.topk(mag, k).indices if k else torch.tensor([], dtype=torch.long)
    layout = parse_site(site)[1].layout
    fed = run.ref.step_tokens(step) if hasattr(run.ref, "step_tokens") else []
    rows = []
    for flat in top.tolist():
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
        row: dict[str, Any] = {"step": step, "site": site}
        for d, i in zip(layout, idx):
            row[DIM_NAMES[d]] = i
            if d == "T" and i < len(fed):
                row["token_id"] = fed[i]
            if d == "V":
                row["text"] = run.token_text(i)
        o, r = float(a.reshape(-1)[flat]), float(b.reshape(-1)[flat])
        row.update(index=idx, ours=o, ref=r, diff=o - r, abs_diff=float(mag[flat]),
                   err_rms=float(mag[flat]) / rms if rms > 0 else float("inf"))
        rows.append(row)
    return _table(pd.DataFrame(rows))


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> bool:
    if a.shape != b.shape:
        return False
    a, b = a.double(), b.double()
    return float((a - b).norm()) <= tol * max(float(b.norm()), 1e-30)


def _hints(p: SitePair, local: bool) -> list[str]:
    out: list[str] = []
    ours, ref = p._side(local), p.ref
    a, b = ours.double(), ref.double()
    d = a - b
    if float(d.norm()) == 0:
        return ["ours and the reference are identical"]
    nonfin = int((~torch.isfinite(a)).sum()) - int((~torch.isfinite(b)).sum())
    if nonfin > 0:
        out.append(f"{nonfin} more non-finite elements in ours than in the reference")
    # the op looks skipped: our output equals one of its inputs (local: the reference's input)
    src = p.run.ref if local else p.run.ours
    for name in input_sites(p.site):
        if src is not None and (p.step, name) in src:
            x = src[p.step, name].float()
            if _close(ours.reshape(x.shape) if ours.numel() == x.numel() else ours, x):
                out.append(f"ours equals its input {name} exactly: the op {p.op} acts as the identity "
                           f"(skipped: e.g. a bias, scale or norm not applied)")
    # a scale factor: ours ~ c * ref
    bb = float((b * b).sum())
    if bb > 0:
        c = float((a * b).sum()) / bb
        if abs(c - 1) > 1e-3 and float((a - c * b).norm()) <= 1e-3 * float(a.norm()):
            out.append(f"ours = {c:.6g} x reference (a scale factor{', a sign flip' if c < 0 else ''})")
    # the difference is the same for every token: a per-feature term added or missing
    if "token" in p.dims and ref.shape[p.dims.index("token")] > 1:
        ax = p.dims.index("token")
        mean = d.mean(dim=ax, keepdim=True)
        if float((d - mean).norm()) <= 1e-3 * float(d.norm()):
            v = mean.squeeze(ax)
            flat = v.reshape(-1)
            j = int(flat.abs().argmax())
            where = tuple(int(i) for i in torch.unravel_index(torch.tensor(j), v.shape))
            names = [n for n in p.dims if n != "token"]
            at = " ".join(f"{n} {i}" for n, i in zip(names, where))
            out.append(f"ours - reference is the same vector for every token (norm {float(v.norm()):.4g}, "
                       f"largest {float(flat[j]):.4g} at {at}): a per-feature term such as a bias is "
                       f"{'missing' if float((v * b.mean(dim=ax)).sum()) < 0 else 'extra'} in ours")
    # error confined to some heads / tokens
    for dim in ("head", "kv_head", "token"):
        if dim in p.dims and ref.shape[p.dims.index(dim)] > 1:
            per = d.movedim(p.dims.index(dim), 0).reshape(ref.shape[p.dims.index(dim)], -1).norm(dim=1)
            hit = [i for i, v in enumerate(per.tolist()) if v > 1e-3 * float(per.max())]
            if len(hit) < len(per):
                out.append(f"the error is confined to {dim} {', '.join(map(str, hit))} (of {len(per)})")
    if not out:
        rel = float(d.norm()) / max(float(b.norm()), 1e-30)
        out.append(f"no simple pattern: relative error {rel:.3g} spread over the tensor")
    return out


# -- the first divergence with its context ------------------------------------------------------
class FirstView:
    """The first divergent op (:class:`~harness.compare.FirstDivergence` fields: ``step``,
    ``layer``, ``site``, ``kind``, ``row``, ``inputs``, ``explanation``,
    ``also_failing_locally``) plus ``context`` (its inputs' rows and the ops after it),
    ``pair`` (both tensors), ``worst(k)``, ``heads`` and ``hints``."""

    def __init__(self, run: "Run", fd: FirstDivergence):
        self.run, self.divergence = run, fd

    def __getattr__(self, name):
        if name in ("run", "divergence"):
            raise AttributeError(name)
        return getattr(self.divergence, name)

    @property
    def where(self) -> tuple[int, int | None, str]:
        return self.step, self.layer, self.site

    @property
    def pair(self) -> SitePair:
        return self.run[self.site, self.step]

    @property
    def local_decides(self) -> bool:
        return self.kind == "local"

    def worst(self, k: int = 10) -> DiffTable:
        return self.pair.worst(k, local=self.local_decides and self.pair.local is not None)

    @property
    def heads(self) -> DiffTable | None:
        dims = self.pair.dims
        if "head" not in dims and "kv_head" not in dims:
            return None
        return self.pair.by_head(local=self.local_decides and self.pair.local is not None)

    @property
    def hints(self) -> list[str]:
        return self.pair.hints()

    @property
    def context(self) -> DiffTable:
        """Rows at this step: the op's inputs, the op, and the next ops of its layer (``role``)."""
        t = self.run.comparison.table
        at = t[t["step"] == self.step]
        names = list(at["site"])
        inputs = [n for n in input_sites(self.site) if n in names]
        i = names.index(self.site)
        after = [n for n in names[i + 1:i + 6] if parse_site(n)[0] == self.layer][:4]
        role = {**{n: "input" for n in inputs}, self.site: "first divergence", **{n: "after" for n in after}}
        part = at[at["site"].isin(role)].copy()
        part.insert(0, "role", part["site"].map(role))
        part["_o"] = part["site"].map(lambda n: order_key(n, self.run.n_layer))
        return _table(part.sort_values("_o").drop(columns="_o"), first=(self.step, self.site))

    def __repr__(self) -> str:
        from .render import _first_lines
        return "\n".join(_first_lines(self.run.comparison))

    def _repr_html_(self) -> str:
        ctx = self.context._repr_html_()
        return f'<div class="llamadiff"><style>{CSS}</style>{first_html(self.run.comparison)}' \
               f"<p>context at {esc(step_label(self.step))}:</p></div>{ctx}"


# -- a run -------------------------------------------------------------------------------------
class Run:
    """A comparison and its three traces (``ref``: llama.cpp, ``ours``: PyTorch end to end,
    ``local``: each of our ops on the reference's inputs, or None). Has the attributes of a
    :class:`~harness.pipeline.DiffResult`, so :mod:`harness.plots` and
    :func:`harness.html_report.render_html` take it directly."""

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
        """Every compared (step, site) in execution order (see harness.compare for the columns)."""
        f = self.comparison.first
        return _table(self.comparison.table, first=(f.step, f.site) if f else None)

    @property
    def first(self) -> FirstView | None:
        f = self.comparison.first
        return FirstView(self, f) if f is not None else None

    @property
    def diverged(self) -> bool:
        return self.comparison.diverged

    @property
    def verdict(self) -> str:
        from .render import verdict_line
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
        return _table(self.comparison.logit_rows)

    @property
    def spikes(self) -> DiffTable:
        return _table(self.comparison.spikes)

    def steps(self) -> list[int]:
        return sorted(set(int(s) for s in self.comparison.table["step"]))

    def sites(self) -> list[str]:
        return list(dict.fromkeys(self.comparison.table["site"]))

    def summary(self) -> DiffTable:
        """One row per layer: worst errors, failures (render.layer_summary)."""
        from .render import layer_summary
        return _table(layer_summary(self.comparison))

    # token text
    @property
    def vocab(self) -> list[str] | None:
        if self._vocab is None and self.gguf and os.path.isfile(self.gguf):
            from .gguf_io import read_tokens
            self._vocab = read_tokens(self.gguf)
        return self._vocab

    def token_text(self, tok: int) -> str | None:
        v = self.vocab
        return v[tok] if v is not None and 0 <= tok < len(v) else None

    # element access
    def _row(self, step: int, site: str) -> dict | None:
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
        """The ``k`` worst elements of ``site`` (a name or glob) over every step (or ``step``),
        with their indices named by the site's layout."""
        names = [n for n in self.sites() if fnmatch.fnmatchcase(n, site)]
        if not names:
            raise KeyError(f"no site matching {site!r} (see run.sites())")
        steps = self.steps() if step is None else _as_list(step)
        parts = []
        for n in names:
            for s in steps:
                if (s, n) in self.ref:
                    p = SitePair(self, n, s)
                    parts.append(p.worst(k, local=local))
        df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        if df.empty:
            return _table(df)
        return _table(df.sort_values("abs_diff", ascending=False, kind="stable").head(k).reset_index(drop=True))

    def filter(self, layer=None, site=None, step=None, failed: bool | None = None, family=None,
               local_failed: bool | None = None) -> DiffTable:
        """Table rows by layer (int or list; global sites have none), site (globs over the op key
        or the full name, e.g. ``"q*"``, ``"blk.0.*"``), step, family, and verdict: ``failed``
        uses the deciding verdict (local when measured), ``local_failed`` the local one."""
        t = self.comparison.table
        m = pd.Series(True, index=t.index)
        if layer is not None:
            m &= t["layer"].isin(_as_list(layer))
        if site is not None:
            pats = _as_list(site)
            m &= pd.Series([any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(k, p) for p in pats)
                            for n, k in zip(t["site"], t["op"])], index=t.index, dtype=bool)
        if step is not None:
            m &= t["step"].isin(_as_list(step))
        if family is not None:
            m &= t["family"].isin(_as_list(family))
        if failed is not None:
            col = "local_passed" if t["local_passed"].notna().any() else "passed"
            m &= t[col].map(lambda v: not pd.isna(v) and not bool(v)) == failed
        if local_failed is not None:
            m &= t["local_passed"].map(lambda v: not pd.isna(v) and not bool(v)) == local_failed
        f = self.comparison.first
        return _table(t[m.to_numpy(dtype=bool)], first=(f.step, f.site) if f else None)

    # plots (harness.plots)
    def plot_layers(self, **kw):
        from . import plots
        return plots.layer_errors(self, **kw)

    def plot_steps(self, site: str | None = None, **kw):
        from . import plots
        site = site or (self.comparison.first.site if self.comparison.first else "logits")
        return plots.step_errors(self, site, **kw)

    def plot_attention(self, layer: int, head: int, step: int = 0, **kw):
        from . import plots
        return plots.attention(self, layer, head, step=step, **kw)

    def plot_logits(self, step: int = 0, row: int = -1, k: int = 8, **kw):
        from . import plots
        return plots.logits(self, step=step, row=row, k=k, vocab=kw.pop("vocab", self.vocab), **kw)

    def plot_hist(self, site: str | None = None, step: int | None = None, **kw):
        from . import plots
        f = self.comparison.first
        site = site or (f.site if f else "logits")
        step = step if step is not None else (f.step if f and f.site == site else 0)
        return plots.error_hist(self, site, step=step, **kw)

    # output
    def to_dict(self) -> dict:
        from .render import to_dict
        return to_dict(self.comparison)

    def to_json(self) -> str:
        from .render import to_json
        return to_json(self.comparison)

    def to_html(self, path: str | os.PathLike | None = None) -> str:
        """The self-contained HTML report (written to ``path`` when given)."""
        from .html_report import render_html
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
        from .render import render_text_table
        return render_text_table(self.comparison, width=120)

    def _repr_html_(self) -> str:
        from .render import _header, _logit_lines
        cmp = self.comparison
        parts = [f'<div class="llamadiff"><style>{CSS}</style>']
        parts += [f'<p class="meta">{esc(line)}</p>' for line in _header(cmp)]
        parts.append(verdict_html(cmp))
        if cmp.first is not None:
            parts.append(first_html(cmp))
        summary = self.summary()
        if not summary.empty:
            parts.append("<p>per-layer summary (worst over steps and sites):</p>")
            parts.append(frame_html(summary))
        parts += [f"<pre>{esc(line)}</pre>" for line in _logit_lines(cmp)[:1]]
        parts.append('<p class="meta">explore: run.table, run.first, run["blk.0.q", 0], run.worst(site), '
                     "run.filter(layer=, site=, step=), run.plot_layers()</p></div>")
        return "".join(parts)


# -- entry points ------------------------------------------------------------------------------
def _faults(inject) -> list:
    from probes.faults import Fault, get_fault
    items = [inject] if isinstance(inject, (str, Fault)) else list(inject or [])
    return [f if isinstance(f, Fault) else get_fault(f) for f in items]


def compare(gguf: str | os.PathLike | None = None, prompt: str | None = None, *, tokens: list[int] | None = None,
            steps: int = 4, device: str = "cpu", dtype: str = "float32", sites: str | None = None,
            inject=(), kv_type: str = "f16", flash_attn: bool = False, local: bool = True,
            ref=None, model=None) -> Run:
    """Run llama.cpp and our PyTorch Qwen2 on ``gguf`` and compare them op by op.

    ``prompt`` (text, tokenized by llama.cpp) or ``tokens``; ``steps`` decode steps after the
    prefill; ``device`` "cpu" or "cuda" for both sides; ``sites`` a glob to capture fewer sites;
    ``inject`` fault names (``probes.faults``), ``Fault`` records or ``module:function@sites``;
    ``model`` an already loaded ``harness.model.Qwen2`` to reuse.

    ``ref`` skips llama.cpp: a recorded reference run folder (``llamadiff record``; its tokens,
    steps and KV type are used, its tensors read on demand, and ``gguf`` may be left out: the
    run's own GGUF is found and sha256-checked), a trace file or saved run folder
    (:meth:`Run.save`), or a :class:`~harness.trace.Trace` / ``Run`` in memory."""
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
        from .gguf_io import _open_reader, read_config
        from .sites import validate_pattern
        validate_pattern(sites, read_config(_open_reader(gguf), gguf).n_layer)
    req = DiffRequest(gguf, prompt=prompt, tokens=list(tokens) if tokens is not None else None, steps=steps,
                      device=device, dtype=dtype, sites=sites, faults=_faults(inject), kv_type=kv_type,
                      flash_attn=flash_attn, local=local)
    return Run(diff_gguf(req, model=model, ref=ref_trace), gguf=gguf, request=req)


def _is_recorded_run(obj) -> bool:
    return obj is not None and not isinstance(obj, Trace) and isinstance(getattr(obj, "trace", None), Trace)


def _compare_recorded(rec, gguf, *, tokens, device, dtype, sites, inject, local, model) -> Run:
    """Our model against a recorded reference run (what ``llamadiff gate`` does), keeping the traces."""
    from .pipeline import model_for, run_ours
    from .runs import check_compatible, compare_runs
    from .sites import SiteFilter, all_sites
    ref = rec.trace
    if tokens is not None and list(tokens) != list(ref.tokens[:ref.n_prompt]):
        raise ValueError("tokens= differ from the recorded run's prompt tokens")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda': no CUDA device is visible to PyTorch")
    if gguf is None:
        from .gate import locate_gguf
        gguf = locate_gguf(rec)
    gguf = os.fspath(gguf)
    faults = _faults(inject)
    req = DiffRequest(gguf, tokens=list(ref.tokens[:ref.n_prompt]), steps=ref.n_steps, device=device, dtype=dtype,
                      sites=sites, faults=faults, kv_type=rec.engine.get("kv_type", "f16"), local=local)
    net = model if model is not None else model_for(req, ref)
    recorded = ref.sites()
    if sites:
        filt = SiteFilter(sites)
    else:
        filt = None if len(recorded) == len(all_sites(ref.n_layer)) else SiteFilter(",".join(recorded))
    ours = run_ours(net, ref, faults, filt)
    check_compatible(ref, ours, rec.path, "our model")
    loc = run_ours(net, ref, faults, filt, anchor=ref) if local else None
    cmp = compare_runs(rec, ours, loc, dtype=dtype)
    cmp.meta["faults"] = [f.name for f in faults]
    return Run(DiffResult(cmp, ref, ours, loc), gguf=gguf, request=req)


def compare_recorded(reference, candidate) -> Run:
    """Compare two recorded traces (``harness.runs`` folders, e.g. llama.cpp against another
    engine's dump) without running anything; tensors are read on demand."""
    from .runs import compare_runs
    ref, cand = open_recorded(reference), open_recorded(candidate)
    cmp = compare_runs(ref, cand)
    cmp.meta.setdefault("faults", [])
    return Run(DiffResult(cmp, ref.trace, cand.trace, None))


def from_traces(ours: Trace, ref: Trace, local: Trace | None = None, gguf: str | None = None,
                policy: Policy | None = None) -> Run:
    """Compare two existing traces (nothing is run). The tolerance policy comes from their
    metadata (reference backend, our weight type and dtype) unless given."""
    if policy is None:
        weight_type = ours.meta.get("weight_type") or ref.meta.get("weight_type", "F32")
        policy = Policy(ref.meta.get("backend", "cpu"), weight_type, ours.meta.get("dtype", "float32"))
    cmp = compare_traces(ours, ref, policy, local)
    cmp.meta.setdefault("faults", [])
    return Run(DiffResult(cmp, ref, ours, local), gguf=gguf)


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
    format is ``harness.runs.write_trace``.)"""
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
    """A recorded run (``harness.runs`` format: a folder with manifest.json and safetensors)
    as a ``harness.runs.Run`` whose trace reads each tensor on demand. The manifest and every
    file header are validated (``runs.load_run``) but no tensor is read; ``verify`` also checks
    the files' sha256 (reads them once)."""
    from . import runs
    from .sites import SiteFilter
    from .tolerance import UNIT_ROUNDOFF
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
    """The reference side from a :class:`Trace` (as is), a Run/DiffResult (its ``ref``), a trace
    file (:func:`save_trace`), a saved run folder (:meth:`Run.save`: its ``ref.safetensors``) or
    a recorded reference run folder (``harness.runs``; returned as its lazy Trace, or with
    ``lazy_run`` as the ``runs.Run`` record from :func:`open_recorded`)."""
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


def load(path: str | os.PathLike) -> Run:
    """Reopen a run written by :meth:`Run.save` without running anything: the table and verdict
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
    return Run(DiffResult(cmp, traces["ref"], traces["ours"], traces["local"]), gguf=gguf)


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
