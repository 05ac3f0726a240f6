"""Views of a :class:`~harness.notebook.run.Drilldown` for notebooks: styled tables, one site's tensor pair
with its worst elements and hints, and the first divergence with its context."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from harness.compare.comparator import FirstDivergence, op_inputs, step_label
from harness.compare.metrics import abs_error
from harness.report.html import CSS, esc, first_html, frame_html
from harness.sites import DIM_NAMES, input_sites, order_key, parse_site

if TYPE_CHECKING:
    from harness.notebook.run import Drilldown

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


def diff_table(df: pd.DataFrame, first: tuple[int, str] | None = None) -> DiffTable:
    """``df`` as a DiffTable; ``first`` (step, site) marks the first divergence's row."""
    t = DiffTable(df)
    if first is not None:
        t.attrs["first"] = first
    return t


def as_list(x) -> list | None:
    """None stays None; a scalar or string becomes ``[x]``, an iterable a list."""
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

    def __init__(self, run: "Drilldown", site: str, step: int):
        self.run, self.site, self.step = run, site, int(step)
        self.layer, spec = parse_site(site)
        self.op, self.layout = spec.key, spec.layout
        self.dims = tuple(DIM_NAMES[d] for d in spec.layout)
        self.row: dict | None = run.table_row(self.step, site)
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
        """:class:`harness.compare.metrics.PairStats` of ours (or local) against the reference."""
        from harness.compare.metrics import pair_stats
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
        return diff_table(pd.DataFrame(rows))

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


def _worst_elements(run: "Drilldown", site: str, step: int, ours: torch.Tensor, ref: torch.Tensor, k: int) -> DiffTable:
    a, b = ours.detach().double(), ref.detach().double()
    mag = abs_error(a, b).reshape(-1)
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
    return diff_table(pd.DataFrame(rows))


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
    for name in input_sites(p.site, op_inputs(p.run.comparison.meta)):
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
    """The first divergent op (:class:`~harness.compare.comparator.FirstDivergence` fields: ``step``,
    ``layer``, ``site``, ``kind``, ``row``, ``inputs``, ``explanation``,
    ``also_failing_locally``) plus ``context`` (its inputs' rows and the ops after it),
    ``pair`` (both tensors), ``worst(k)``, ``heads`` and ``hints``."""

    def __init__(self, run: "Drilldown", fd: FirstDivergence):
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
        inputs = [n for n in input_sites(self.site, op_inputs(self.run.comparison.meta)) if n in names]
        i = names.index(self.site)
        after = [n for n in names[i + 1:i + 6] if parse_site(n)[0] == self.layer][:4]
        role = {**{n: "input" for n in inputs}, self.site: "first divergence", **{n: "after" for n in after}}
        part = at[at["site"].isin(role)].copy()
        part.insert(0, "role", part["site"].map(role))
        part["_o"] = part["site"].map(lambda n: order_key(n, self.run.n_layer))
        return diff_table(part.sort_values("_o").drop(columns="_o"), first=(self.step, self.site))

    def __repr__(self) -> str:
        from harness.report.text import first_lines
        return "\n".join(first_lines(self.run.comparison))

    def _repr_html_(self) -> str:
        ctx = self.context._repr_html_()
        return f'<div class="llamadiff"><style>{CSS}</style>{first_html(self.run.comparison)}' \
               f"<p>context at {esc(step_label(self.step))}:</p></div>{ctx}"


# -- a run -------------------------------------------------------------------------------------
