"""Plots of a comparison: matplotlib on the Agg canvas, no pyplot (no global figure state, no
GUI backend, nothing to close). Every function returns a :class:`Plot`, a ``Figure`` that
shows itself in Jupyter (``_repr_png_``), ``.save(path)`` writes a PNG and ``.png()`` gives
the bytes. The PNG is exactly ``width x height`` inches at ``dpi`` (no tight bounding box).

Functions take ``res``: anything with ``comparison``, ``ref``, ``ours`` and ``local``
attributes (a :class:`~harness.diff.DiffResult` or a notebook ``Drilldown``); the two table plots
also take a bare :class:`~harness.compare.comparator.Comparison`.

=================  ==========================================================================
layer_errors       error per layer for each site family (log scale, tolerances drawn)
step_errors        error over the decode steps of one site (or a glob: one line per site)
attention          one head's attention weights, ours and reference side by side, and the diff
logits             ours vs reference logits of one token row, top outliers labelled
error_hist         histogram of element errors of one site at one step
=================  ==========================================================================
"""
from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator

from harness.compare.comparator import Comparison, decisive_column, step_label
from harness.compare.metrics import abs_error
from harness.sites import SITES, matches, parse_site

FLOOR = 1e-12          # log axes: exact zeros are drawn at this value
FAMILY_ORDER = tuple(dict.fromkeys(s.family for s in SITES))
E2E_COLOR, LOCAL_COLOR, FAIL_COLOR, FIRST_COLOR = "#1f5fa8", "#e07b00", "#c0001a", "#7a0010"


class Plot(Figure):
    """A Figure on an Agg canvas that shows itself in Jupyter and writes PNGs."""

    def png(self, dpi: float | None = None) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=dpi or self.dpi, facecolor="white")
        return buf.getvalue()

    def save(self, path: str | os.PathLike, dpi: float | None = None) -> str:
        """Write the PNG (folders created) and return its path."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(self.png(dpi))
        return path

    def _repr_png_(self) -> bytes:
        return self.png()


def new_figure(width: float, height: float, dpi: float = 100, layout: str | None = "constrained") -> Plot:
    fig = Plot(figsize=(width, height), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


# -- helpers -----------------------------------------------------------------------------------
def _log_y(ax, numticks: int = 6) -> None:
    """Log y axis with a few labelled decades and no minor ticks (thousands of tick labels over
    12 decades make layout take seconds)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=numticks))
    ax.yaxis.set_minor_locator(NullLocator())


def _comparison(res) -> Comparison:
    return res if isinstance(res, Comparison) else res.comparison


def _has_local(table) -> bool:
    return "local_rel_l2" in table and table["local_rel_l2"].notna().any()


def _pos(values) -> np.ndarray:
    """Values for a log axis: NaN stays NaN, zeros -> FLOOR, inf -> NaN."""
    a = np.asarray(values, dtype=float)
    a = np.where(np.isinf(a), np.nan, a)
    return np.where(a <= 0, FLOOR, a)


def _tensor(trace, step: int, site: str) -> torch.Tensor:
    if trace is None or (step, site) not in trace:
        raise KeyError(f"no tensor for {site} at step {step} in this trace")
    return trace[step, site].detach().float().cpu()


def _token_label(tok: int, vocab) -> str:
    if vocab is None or not 0 <= tok < len(vocab):
        return str(tok)
    text = vocab[tok].replace("$", r"\$")          # no mathtext
    return f"{tok} {text!r}"


def _n_layer(res, table) -> int:
    ref = getattr(res, "ref", None)
    if ref is not None and getattr(ref, "n_layer", None):
        return int(ref.n_layer)
    return int(table["layer"].max()) + 1 if table["layer"].notna().any() else 0


def _na(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def _failed(v) -> bool:
    """A verdict cell that says "over tolerance" (NA is no verdict)."""
    return not _na(v) and not bool(v)


# -- error per layer ---------------------------------------------------------------------------
def layer_errors(res, *, step: int | list[int] | None = None, width: float = 12.0, height: float = 8.0,
                 dpi: float = 100) -> Plot:
    """Relative L2 error per layer, one panel per site family (worst over the family's sites and
    over the steps, or only ``step``). Solid: end to end; dashed: local; dotted: tolerances;
    crosses: ops over the decisive tolerance; the first divergence is starred and its layer marked."""
    cmp = _comparison(res)
    t = cmp.table
    if t.empty:
        raise ValueError("the comparison has no rows to plot")
    if step is not None:
        t = t[t["step"].isin([step] if isinstance(step, int) else list(step))]
    n_layer = _n_layer(res, t)
    has_local, verdict = _has_local(t), decisive_column(t)
    x = np.where(t["layer"].notna(), t["layer"].fillna(-1),
                 np.where(t["site"] == "embd", -1, n_layer)).astype(int)
    t = t.assign(_x=x)
    fams = [f for f in FAMILY_ORDER if f in set(t["family"])]
    ncols = 4
    nrows = math.ceil((len(fams) + 1) / ncols)
    fig = new_figure(width, height, dpi, layout=None)      # fixed margins: constrained layout of 12 log
    fig.subplots_adjust(left=0.075, right=0.99, bottom=0.05, top=0.91, hspace=0.42, wspace=0.28)  # panels is slow
    axes = fig.subplots(nrows, ncols, sharex=True, squeeze=False).ravel()
    first = cmp.first
    first_x = None
    if first is not None:
        first_x = first.layer if first.layer is not None else (-1 if first.site == "embd" else n_layer)
    ticks = [-1] + list(range(n_layer)) + [n_layer]
    step_every = max(1, math.ceil(len(ticks) / 10))
    labels = ["embd" if v == -1 else ("out" if v == n_layer else str(v)) for v in ticks]
    for ax, fam in zip(axes, fams):
        part = t[t["family"] == fam]
        g = part.groupby("_x", sort=True)
        xs = np.array(list(g.groups.keys()), dtype=int)
        ax.plot(xs, _pos(g["rel_l2"].max().to_numpy(dtype=float)), "o-", color=E2E_COLOR, ms=3.5, lw=1.4)
        ax.axhline(float(part["tol_rel"].max()), color=E2E_COLOR, ls=":", lw=1)
        if has_local:
            ax.plot(xs, _pos(g["local_rel_l2"].max().to_numpy(dtype=float)), "s--", color=LOCAL_COLOR, ms=3, lw=1.2)
            ax.axhline(float(part["local_tol_rel"].astype(float).max()), color=LOCAL_COLOR, ls=":", lw=1)
        col = "local_rel_l2" if has_local else "rel_l2"
        bad = part[part[verdict].map(_failed)]
        if len(bad):
            bg = bad.groupby("_x")[col].max()
            ax.plot(bg.index.to_numpy(dtype=int), _pos(bg.to_numpy(dtype=float)), "x", color=FAIL_COLOR, ms=8, mew=2)
        if first_x is not None:
            ax.axvline(first_x, color=FIRST_COLOR, lw=0.8, alpha=0.35)
            if first.row.get("family") == fam:
                y = first.row.get("local_rel_l2" if has_local else "rel_l2")
                ax.plot([first_x], _pos([y]), "*", color=FIRST_COLOR, ms=15, mec="white", zorder=5)
        _log_y(ax, 5)
        keys = list(dict.fromkeys(part["op"]))
        ax.set_title(f"{fam}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}", fontsize=9.5)
        ax.grid(True, which="major", alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0].set_xticks(ticks[::step_every], labels[::step_every])     # shared by every panel (sharex)
    for ax in axes[len(fams):]:
        ax.axis("off")
    handles = [Line2D([], [], color=E2E_COLOR, marker="o", ms=4, label="end to end (max over sites, steps)"),
               Line2D([], [], color=E2E_COLOR, ls=":", label="end-to-end tolerance")]
    if has_local:
        handles += [Line2D([], [], color=LOCAL_COLOR, marker="s", ls="--", ms=4, label="local (on reference inputs)"),
                    Line2D([], [], color=LOCAL_COLOR, ls=":", label="local tolerance")]
    handles.append(Line2D([], [], color=FAIL_COLOR, marker="x", ls="", ms=8, mew=2, label="over tolerance"))
    if first is not None:
        handles.append(Line2D([], [], color=FIRST_COLOR, marker="*", ls="", ms=12,
                              label=f"first divergence: {first.site} @ {step_label(first.step)}"))
    axes[len(fams)].legend(handles=handles, loc="center", fontsize=8.5, frameon=False)
    which = "all steps" if step is None else f"step {step}"
    fig.suptitle(f"relative L2 error per layer by site family ({which}; x: layer, embd = embedding, "
                 f"out = output norm / logits)", fontsize=11)
    fig.supylabel("||ours - ref|| / ||ref||", fontsize=10)
    return fig


# -- error over steps --------------------------------------------------------------------------
def step_errors(res, site: str, *, max_lines: int = 10, width: float = 9.0, height: float = 4.5,
                dpi: float = 100) -> Plot:
    """Relative error of ``site`` over the steps (prefill = 0); a glob (``blk.*.q``, several
    comma-separated) draws one line per matching site (at most ``max_lines``)."""
    t = _comparison(res).table
    names = [n for n in dict.fromkeys(t["site"]) if matches(n, site)]
    if not names:
        raise KeyError(f"no site matching {site!r} in the comparison")
    has_local = _has_local(t)
    fig = new_figure(width, height, dpi)
    ax = fig.subplots()
    colors = [f"C{i}" for i in range(10)]
    for i, name in enumerate(names[:max_lines]):
        part = t[t["site"] == name].sort_values("step")
        c = colors[i % 10] if len(names) > 1 else E2E_COLOR
        ax.plot(part["step"], _pos(part["rel_l2"]), "o-", color=c, ms=4,
                label=f"{name} end to end" if has_local else name)
        if has_local:
            lc = c if len(names) > 1 else LOCAL_COLOR
            ax.plot(part["step"], _pos(part["local_rel_l2"].astype(float)), "s--", color=lc, ms=3.5,
                    label=f"{name} local")
    part = t[t["site"] == names[0]]
    ax.axhline(float(part["tol_rel"].max()), color="grey", ls=":", lw=1, label="end-to-end tolerance")
    if has_local:
        ax.axhline(float(part["local_tol_rel"].astype(float).max()), color=FAIL_COLOR, ls=":", lw=1,
                   label="local tolerance")
    _log_y(ax)
    steps = sorted(set(int(s) for s in t["step"]))
    ax.set_xticks(steps, ["prefill" if s == 0 else str(s) for s in steps])
    ax.set_xlabel("step (0 = prefill, k = k-th decode step)")
    ax.set_ylabel("||ours - ref|| / ||ref||")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    more = f" (first {max_lines} of {len(names)} sites)" if len(names) > max_lines else ""
    ax.set_title(f"error over steps: {site}{more}", fontsize=11)
    return fig


# -- attention ---------------------------------------------------------------------------------
def attention(res, layer: int, head: int, *, step: int = 0, site: str = "attn_weights", local: bool = False,
              width: float = 13.0, height: float = 4.2, dpi: float = 100) -> Plot:
    """One head of ``blk.{layer}.{site}`` (``attn_weights`` or ``kq``, layout H x T x P) at
    ``step``: ours, reference, and ours - reference (``local=True``: our op on the reference's
    inputs instead of our end-to-end value)."""
    name = f"blk.{layer}.{site}"
    spec = parse_site(name)[1]
    if spec.layout[0] != "H":
        raise ValueError(f"{name} is not a per-head attention site (layout {spec.layout})")
    ours = _tensor(res.local if local else res.ours, step, name)
    ref = _tensor(res.ref, step, name)
    if not 0 <= head < ref.shape[0]:
        raise IndexError(f"head {head} out of range ({ref.shape[0]} heads)")
    o, r = ours[head].numpy(), ref[head].numpy()
    d = o - r
    fig = new_figure(width, height, dpi, layout=None)        # fixed margins: faster than constrained
    fig.subplots_adjust(left=0.05, right=0.95, bottom=0.14, top=0.84, wspace=0.42)
    axes = fig.subplots(1, 3)
    finite = np.concatenate([o[np.isfinite(o)], r[np.isfinite(r)]])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    who = "ours (local)" if local else "ours"
    for ax, img, title in ((axes[0], o, who), (axes[1], r, "reference (llama.cpp)")):
        im = ax.imshow(img, aspect="auto", interpolation="nearest", cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.06, pad=0.03)
    lim = float(np.nanmax(np.abs(np.where(np.isfinite(d), d, 0)))) or 1e-12
    im = axes[2].imshow(d, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-lim, vmax=lim)
    fig.colorbar(im, ax=axes[2], fraction=0.06, pad=0.03)
    rel = float(np.linalg.norm(np.nan_to_num(d)) / max(np.linalg.norm(np.nan_to_num(r)), 1e-30))
    axes[2].set_title(f"{who} - reference (max |diff| {lim:.3g}, rel {rel:.3g})", fontsize=10)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlabel("cached position (P)")
        ax.set_ylabel("token row (T)")
        ax.tick_params(labelsize=8)
    fig.suptitle(f"{name} head {head} at {step_label(step)}", fontsize=11)
    return fig


# -- logits ------------------------------------------------------------------------------------
def logits(res, *, step: int = 0, row: int = -1, k: int = 8, vocab: list[str] | None = None,
           width: float = 13.0, height: float = 5.0, dpi: float = 100) -> Plot:
    """Logits of one token row (``row`` of ``step``, default the last): ours against the
    reference (left) and ours - reference per token id (right); the ``k`` tokens with the largest
    |difference| are labelled with their id and, given ``vocab`` (``harness.gguf.load.read_tokens``),
    their text."""
    o_all, r_all = _tensor(res.ours, step, "logits"), _tensor(res.ref, step, "logits")
    row = row if row >= 0 else r_all.shape[0] + row
    o, r = o_all[row].double().numpy(), r_all[row].double().numpy()
    d = o - r
    order = np.argsort(-np.nan_to_num(np.abs(d), nan=np.inf))[:k]
    fig = new_figure(width, height, dpi)
    ax, bx = fig.subplots(1, 2)
    ax.scatter(r, o, s=5, alpha=0.5, color=E2E_COLOR, lw=0)
    lo = float(np.nanmin(np.concatenate([o, r])))
    hi = float(np.nanmax(np.concatenate([o, r])))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    ax.scatter(r[order], o[order], s=22, color=FAIL_COLOR, zorder=3)
    bx.plot(np.arange(d.size), d, lw=0.6, color=E2E_COLOR)
    bx.scatter(order, d[order], s=22, color=FAIL_COLOR, zorder=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # glyphs a font lacks
        for i, tok in enumerate(order):
            label = _token_label(int(tok), vocab)
            off = (6, 6 - 11 * (i % 3))
            ax.annotate(label, (r[tok], o[tok]), xytext=off, textcoords="offset points", fontsize=7.5,
                        color=FAIL_COLOR)
            bx.annotate(label, (tok, d[tok]), xytext=off, textcoords="offset points", fontsize=7.5,
                        color=FAIL_COLOR)
    ax.set_xlabel("reference logit")
    ax.set_ylabel("our logit")
    ax.set_title("ours vs reference (dashed: equal)", fontsize=10)
    bx.set_xlabel("token id")
    bx.set_ylabel("ours - reference")
    bx.set_title(f"difference per token; top {len(order)} |diff| labelled", fontsize=10)
    for a in (ax, bx):
        a.grid(True, alpha=0.3)
        a.tick_params(labelsize=8)
    tokens = getattr(res.ref, "step_tokens", lambda s: [])(step)
    fed = f", token fed {_token_label(int(tokens[row]), vocab)}" if row < len(tokens) else ""
    top = f"top-1 ours {_token_label(int(np.nanargmax(o)), vocab)}, ref {_token_label(int(np.nanargmax(r)), vocab)}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.suptitle(f"logits at {step_label(step)}, row {row}{fed}; {top}", fontsize=11)
    return fig


# -- element error histogram -------------------------------------------------------------------
def _elem_err(ours: torch.Tensor, ref: torch.Tensor) -> tuple[np.ndarray, float]:
    b = ref.double().numpy().ravel()
    fin = np.isfinite(b)
    rms = float(np.sqrt(np.mean(b[fin] ** 2))) if fin.any() else 1.0
    err = abs_error(ours, ref).numpy().ravel()
    return err / max(rms, 1e-30), rms


def error_hist(res, site: str, *, step: int = 0, bins: int = 60, width: float = 9.0, height: float = 4.5,
               dpi: float = 100) -> Plot:
    """Histogram of element errors ``|ours - ref| / rms(ref)`` of ``site`` at ``step`` (log x),
    end to end and, when measured, local; the max-element tolerances drawn; exact zeros counted."""
    ref = _tensor(res.ref, step, site)
    series = [("end to end", _tensor(res.ours, step, site), E2E_COLOR, "-")]
    local = getattr(res, "local", None)
    if local is not None and (step, site) in local:
        series.append(("local", _tensor(local, step, site), LOCAL_COLOR, "--"))
    errs = [(name, _elem_err(o, ref)[0], c, ls) for name, o, c, ls in series]
    pos = np.concatenate([e[np.isfinite(e) & (e > 0)] for _, e, _, _ in errs])
    lo = math.floor(math.log10(pos.min())) if pos.size else -12
    hi = math.ceil(math.log10(pos.max())) if pos.size else 0
    edges = np.logspace(lo, max(hi, lo + 1), bins + 1)
    fig = new_figure(width, height, dpi)
    ax = fig.subplots()
    notes = []
    for name, e, c, ls in errs:
        zeros, nonfin = int((e == 0).sum()), int((~np.isfinite(e)).sum())
        ax.hist(e[np.isfinite(e) & (e > 0)], bins=edges, histtype="step", lw=1.6, color=c, ls=ls, label=name)
        notes.append(f"{name}: {zeros} exact zeros" + (f", {nonfin} non-finite" if nonfin else ""))
    cmp = _comparison(res)
    row = cmp.table[(cmp.table["step"] == step) & (cmp.table["site"] == site)]
    if len(row):
        r = row.iloc[0]
        ax.axvline(float(r["tol_max"]), color=E2E_COLOR, ls=":", lw=1, label="end-to-end max tolerance")
        if "local_tol_max" in r and not _na(r["local_tol_max"]):
            ax.axvline(float(r["local_tol_max"]), color=LOCAL_COLOR, ls=":", lw=1, label="local max tolerance")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, numticks=12))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("element error |ours - ref| / rms(ref)")
    ax.set_ylabel("elements")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{site} at {step_label(step)}: {ref.numel()} elements; {'; '.join(notes)}", fontsize=10)
    return fig
