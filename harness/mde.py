"""Minimum detectable effect (MDE): the smallest generic bug at one site that the comparison
localizes at its exact (step, site), found by bisection on its magnitude e.

A bug is one of :data:`KINDS` applied at one site of a family (:data:`FAMILY_SITES`, in the
model's middle layer) at one step: ``scale`` x -> x (1 + e); ``shift`` x -> x + e rms(x);
``squash`` x -> (1 - e) x + e s tanh(x / s) with s = rms(x) (smooth, monotonic for e < 1, shrinks
large values by up to a factor 1 - e, leaves small ones). llama.cpp is captured once per (regime,
seed); per e only our side runs again (:func:`evaluate`), recording and comparing the perturbed
site alone: a perturbation at (step, site) cannot change the local error of any op before it, so
"first local divergence is (step, site)" is exactly "no site before it fails on the clean run
(checked once, in full) and (step, site) fails". Each evaluation gives two verdicts from one
comparison: ``before`` (element-wise local tolerance only, ``local_elem_passed``) and
``after`` (also the calibrated systematic statistics, ``local_passed``); each has its own
bisection over cached evaluations. Plain data only; ``benchmarks/mde.py`` runs and renders it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from harness.compare.comparator import compare_traces
from harness.compare.systematic import Null
from harness.diff import model_policy, run_ours
from harness.ours.inject import Fault
from harness.sites import SiteFilter, site_name

KINDS = ("scale", "shift", "squash")
# family -> the site key perturbed (per-layer keys in the middle layer; embd and logits are global)
FAMILY_SITES = {"embed": "embd", "norm": "ffn_norm", "matmul": "ffn_up", "bias": "q", "rope": "q_rope",
                "scores": "kq", "softmax": "attn_weights", "attn": "kqv", "residual": "ffn_inp",
                "act": "ffn_act", "logits": "logits"}
GLOBAL = ("embd", "output_norm", "logits")
E_LO, E_HI, ITERS = 1e-7, 1.0, 6       # bisection in log space: (1e7)^(1/64) ~ 29% resolution


def _rms(x: torch.Tensor) -> torch.Tensor:
    f = x[torch.isfinite(x)].double()
    return f.pow(2).mean().sqrt().to(x.dtype) if f.numel() else torch.zeros((), dtype=x.dtype, device=x.device)


def perturbation(kind: str, e: float):
    """The function x -> perturbed x of a kind and magnitude (non-finite elements kept)."""
    if kind == "scale":
        return lambda x: x * (1.0 + e)
    if kind == "shift":
        return lambda x: x + e * _rms(x)

    def squash(x):
        s = _rms(x).clamp_min(1e-30)
        y = (1.0 - e) * x + e * s * torch.tanh(x / s)
        return torch.where(torch.isfinite(x), y, x)
    if kind == "squash":
        return squash
    raise ValueError(f"unknown perturbation kind {kind!r} (choose from {', '.join(KINDS)})")


def target_site(family: str, n_layer: int) -> str:
    key = FAMILY_SITES[family]
    return key if key in GLOBAL else site_name(key, n_layer // 2)


def perturb_fault(kind: str, e: float, site: str, step: int) -> Fault:
    """A Fault applying the perturbation at exactly (step, site)."""
    fn = perturbation(kind, e)

    def hook(x, ctx):
        return fn(x) if ctx.step == step else None
    return Fault(f"mde_{kind}_{e:.3g}", [(site, hook)])


@dataclass
class Verdicts:
    before: tuple | None     # first local divergence (step, site) by the element-wise tolerance
    after: tuple | None      # ... by the element-wise tolerance or a systematic statistic


def first_failure(table, col: str) -> tuple | None:
    if col not in table:
        return None
    bad = table[table[col] == False]  # noqa: E712
    return None if bad.empty else (int(bad.iloc[0]["step"]), str(bad.iloc[0]["site"]))


def evaluate(model, ref, faults=(), null: Null | None = None, filt: SiteFilter | None = None,
             local_only: bool = False):
    """One comparison of our model (with ``faults``) against the captured ``ref`` over the sites
    of ``filt`` (None: all): (table, Verdicts), the first local divergence before and after the
    systematic statistics. ``local_only``: skip the end-to-end run (its columns then repeat the
    local ones; the verdicts read only the local columns)."""
    local = run_ours(model, ref, faults, filt, anchor=ref)
    ours = local if local_only else run_ours(model, ref, faults, filt)
    policy = model_policy(model, ref.meta.get("backend", "cpu"))
    table = compare_traces(ours, ref, policy, local, systematic=null if null is not None else True).table
    return table, Verdicts(first_failure(table, "local_elem_passed"), first_failure(table, "local_passed"))


def fails_before(table, step: int, site: str, col: str) -> bool:
    """Does any row before (step, site) (execution order) fail ``col`` in a full table?"""
    keys = list(zip(table["step"].astype(int), table["site"]))
    stop = keys.index((step, site)) if (step, site) in keys else len(keys)
    head = table.iloc[:stop]
    return bool((head[col] == False).any()) if col in head else False  # noqa: E712


@dataclass
class Search:
    """Bisection of one (site, kind) on one captured run; ``evals`` caches e -> Verdicts."""
    model: object
    ref: object
    site: str
    kind: str
    step: int = 0
    null: Null | None = None
    clean: object = None          # the full clean comparison table (None: assume nothing fails before)
    evals: dict = field(default_factory=dict)

    def verdicts(self, e: float) -> Verdicts:
        if e not in self.evals:
            fault = perturb_fault(self.kind, e, self.site, self.step)
            self.evals[e] = evaluate(self.model, self.ref, [fault], self.null, SiteFilter(self.site), True)[1]
        return self.evals[e]

    def localized(self, e: float, mode: str) -> bool:
        col = "local_elem_passed" if mode == "before" else "local_passed"
        if self.clean is not None and fails_before(self.clean, self.step, self.site, col):
            return False
        return getattr(self.verdicts(e), mode) == (self.step, self.site)

    def mde(self, mode: str, lo: float = E_LO, hi: float = E_HI, iters: int = ITERS) -> float:
        """Smallest e (to the bisection's resolution) localized at (step, site): inf when not
        even ``hi`` is, ``lo`` when ``lo`` already is."""
        if not self.localized(hi, mode):
            return math.inf
        if self.localized(lo, mode):
            return lo
        for _ in range(iters):
            mid = math.sqrt(lo * hi)
            if self.localized(mid, mode):
                hi = mid
            else:
                lo = mid
        return hi


def measure_run(model, ref, families, kinds=KINDS, step: int = 0, null: Null | None = None,
                iters: int = ITERS) -> list[dict]:
    """MDE before/after of every (family, kind) on one captured run: rows of plain data."""
    rows = []
    n_layer = model.config.n_layer
    clean = evaluate(model, ref, (), null)[0]
    for fam in families:
        site = target_site(fam, n_layer)
        if (step, site) not in ref.tensors:
            rows += [dict(family=fam, site=site, kind=k, before=None, after=None, evals=0,
                          note="site not in this model") for k in kinds]
            continue
        for kind in kinds:
            s = Search(model, ref, site, kind, step, null, clean)
            rows.append(dict(family=fam, site=site, kind=kind, before=s.mde("before", iters=iters),
                             after=s.mde("after", iters=iters), evals=len(s.evals)))
    return rows


def clean_verdicts(model, ref, null: Null | None = None) -> Verdicts:
    """The verdicts of a clean run (any divergence is a false alarm)."""
    return evaluate(model, ref, (), null)[1]


def summarize(rows: list[dict]) -> list[dict]:
    """Per (regime, family, kind): the worst MDE over seeds (the e localized on every seed)."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["regime"], r["family"], r["kind"])
        cur = out.setdefault(key, dict(regime=r["regime"], family=r["family"], site=r["site"], kind=r["kind"],
                                       before=None, after=None, seeds=0))
        for mode in ("before", "after"):
            if r[mode] is not None:
                cur[mode] = r[mode] if cur[mode] is None else max(cur[mode], r[mode])
        cur["seeds"] += 1
    return list(out.values())


def fmt(e: float | None) -> str:
    if e is None:
        return "n/a"
    if math.isinf(e):
        return f">{E_HI:g}"
    if e <= E_LO:
        return f"<={E_LO:g}"
    return f"{e:.2g}"
