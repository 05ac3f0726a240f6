"""Compare two traces into a divergence table, and find the first divergent op.

Knows nothing about where the traces came from: any two :class:`~harness.trace.Trace` objects
with canonical site names. ``local`` (optional) is a third trace holding each op recomputed on the
reference's own inputs (see ``Qwen2.run_with_cache(anchor=...)``): its error against the reference
is the op's *local* error, free of upstream drift, and decides the verdict when present.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch

from .metrics import batch_stats, finish_stats, logit_stats, pair_stats, stats_vector
from .sites import DIM_NAMES, input_sites, parse_site
from .tolerance import Policy
from .trace import Trace


@dataclass
class FirstDivergence:
    step: int
    layer: int | None
    site: str
    kind: str                     # "local" (op's own error) or "end-to-end"
    row: dict                     # the table row
    inputs: list[dict]            # [{site, passed, rel_l2, local_rel_l2}] of the op's input sites
    explanation: str
    also_failing_locally: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class Comparison:
    table: pd.DataFrame           # one row per (step, site) in execution order
    logit_rows: pd.DataFrame      # per (step, token row): top-1 agreement, top-k overlap, KL
    spikes: pd.DataFrame          # one-sided logit outliers
    first: FirstDivergence | None
    first_e2e: tuple[int, str] | None
    meta: dict

    @property
    def diverged(self) -> bool:
        return self.first is not None


def _describe_index(site: str, idx: tuple[int, ...]) -> str:
    layout = parse_site(site)[1].layout
    return " ".join(f"{DIM_NAMES[d].replace('_', ' ')} {i}" for d, i in zip(layout, idx))


def _rows_like(ours, ref, spec):
    """Our last rows when the reference kept only its output rows (token-major layouts)."""
    if spec.layout[0] == "T" and ours.dim() == ref.dim() and ref.shape[0] < ours.shape[0]:
        return ours[-ref.shape[0]:]
    return ours


class Comparator:
    """Builds a Comparison one tensor pair at a time, so tensors can be dropped as they are
    compared (the streaming GPU path) or fed from whole traces (:func:`compare`)."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.rows: dict[tuple[int, str], dict] = {}
        self.logit_rows: list[dict] = []
        self.spikes: list[dict] = []
        self.has_local = False
        self.batch: list = []     # GPU pairs waiting to be reduced together
        self.batch_numel = 0
        self.pending: list = []   # ([(row builder, step, site, shape)], (N, 9) stats on the GPU)

    def add(self, step: int, site: str, ours, ref) -> None:
        """End-to-end pair: our tensor and the reference's at (step, site). On a GPU the
        reductions are queued and brought to the host together in :meth:`result`."""
        layer, spec = parse_site(site)
        ours = _rows_like(ours, ref, spec)
        if tuple(ours.shape) != tuple(ref.shape):
            self._shape_mismatch(step, site, ours, ref)
            return
        if site == "logits":
            lr, sp = logit_stats(ours, ref)
            self.logit_rows += [dict(step=step, **x) for x in lr]
            self.spikes += [dict(step=step, **x) for x in sp]
        if ours.is_cuda:
            self._queue(self._e2e_row, step, site, ours, ref)
        else:
            self._e2e_row(step, site, tuple(ref.shape), pair_stats(ours, ref))

    def _e2e_row(self, step: int, site: str, shape: tuple, s) -> None:
        layer, spec = parse_site(site)
        tol = self.policy.tolerance(spec.family, "e2e")
        row = self.rows.setdefault((step, site), {})
        row.update(step=step, layer=layer, site=site, op=spec.key, family=spec.family, shape=shape,
                   max_abs=s.max_abs, rel_l2=s.rel_l2, max_norm=s.max_norm, cosine=s.cosine,
                   worst=_describe_index(site, s.worst_index), worst_index=s.worst_index,
                   ours=s.ours_value, ref=s.ref_value, nonfinite=s.nonfinite,
                   tol_rel=tol.rel, tol_max=tol.max, passed=tol.passes(s.rel_l2, s.max_norm))

    def _shape_mismatch(self, step: int, site: str, ours, ref) -> None:
        """A tensor of the wrong shape is a divergence at that site (e.g. a KV cache that does
        not grow), reported as a failing row rather than a crash."""
        layer, spec = parse_site(site)
        inf = float("inf")
        self.rows.setdefault((step, site), {}).update(
            step=step, layer=layer, site=site, op=spec.key, family=spec.family, shape=tuple(ref.shape),
            max_abs=inf, rel_l2=inf, max_norm=inf, cosine=0.0,
            worst=f"shape {tuple(ours.shape)} instead of {tuple(ref.shape)}", worst_index=(),
            ours=float("nan"), ref=float("nan"), nonfinite=0, tol_rel=0.0, tol_max=0.0, passed=False)

    def add_local(self, step: int, site: str, local, ref) -> None:
        """Local pair: our op recomputed on the reference's inputs, and the reference's output."""
        self.has_local = True
        local = _rows_like(local, ref, parse_site(site)[1])
        if tuple(local.shape) != tuple(ref.shape):
            self.rows.setdefault((step, site), {}).update(
                local_rel_l2=float("inf"), local_max_norm=float("inf"),
                local_worst=f"shape {tuple(local.shape)} instead of {tuple(ref.shape)}",
                local_ours=float("nan"), local_ref=float("nan"), local_tol_rel=0.0, local_tol_max=0.0,
                local_passed=False)
            return
        if local.is_cuda:
            self._queue(self._local_row, step, site, local, ref)
        else:
            self._local_row(step, site, tuple(ref.shape), pair_stats(local, ref))

    def _local_row(self, step: int, site: str, shape: tuple, ls) -> None:
        lt = self.policy.tolerance(parse_site(site)[1].family, "local")
        self.rows.setdefault((step, site), {}).update(
            local_rel_l2=ls.rel_l2, local_max_norm=ls.max_norm, local_worst=_describe_index(site, ls.worst_index),
            local_ours=ls.ours_value, local_ref=ls.ref_value, local_tol_rel=lt.rel, local_tol_max=lt.max,
            local_passed=lt.passes(ls.rel_l2, ls.max_norm))

    BATCH_NUMEL = 1 << 22
    LARGE = 1 << 18

    def _queue(self, build, step, site, ours, ref) -> None:
        """Hold a small GPU pair until a batch is full (bounded memory), then reduce the batch at
        once; a large pair is reduced on its own (segmented reductions with float64 atomics are
        slow on big tensors: measured 69 s instead of 9 s at 2048 tokens)."""
        if ref.numel() >= self.LARGE:
            self.pending.append(([(build, step, site, tuple(ref.shape))], stats_vector(ours, ref)[None]))
            return
        self.batch.append((build, step, site, tuple(ref.shape), ours, ref))
        self.batch_numel += ref.numel()
        if self.batch_numel >= self.BATCH_NUMEL or len(self.batch) >= 512:
            self._reduce_batch()

    def _reduce_batch(self) -> None:
        if self.batch:
            stats = batch_stats([p[4] for p in self.batch], [p[5] for p in self.batch])
            self.pending.append(([p[:4] for p in self.batch], stats))
            self.batch, self.batch_numel = [], 0

    def flush(self) -> None:
        """Reduce what is queued and bring every GPU result to the host in one transfer."""
        self._reduce_batch()
        if self.pending:
            values = torch.cat([p[1] for p in self.pending]).tolist()
            keys = [k for p in self.pending for k in p[0]]
            for (build, step, site, shape), vals in zip(keys, values):
                build(step, site, shape, finish_stats(vals, shape))
            self.pending = []

    def result(self, ours_meta: dict, ref: Trace) -> Comparison:
        self.flush()
        keys = [k for k in ref.keys() if k in self.rows and "rel_l2" in self.rows[k]]
        table = pd.DataFrame([self.rows[k] for k in keys])
        if len(table) and "local_passed" not in table:
            table["local_passed"] = pd.NA
        first = _first_divergence(table, self.has_local, ref.meta.get("source") or "the reference")
        meta = dict(ours=ours_meta, ref=ref.meta, tokens=ref.tokens, n_prompt=ref.n_prompt,
                    policy=self.policy.describe(), compared=len(table), missing_in_ours=len(ref) - len(table))
        return Comparison(table, pd.DataFrame(self.logit_rows), pd.DataFrame(self.spikes), first,
                          _first(table, "passed"), meta)


def compare(ours: Trace, ref: Trace, policy: Policy, local: Trace | None = None) -> Comparison:
    """Divergence table of ``ours`` against ``ref`` over the (step, site) pairs both hold."""
    c = Comparator(policy)
    for key, r in ref.items():
        if key in ours:
            c.add(*key, ours[key], r)
            if local is not None and key in local:
                c.add_local(*key, local[key], r)
    return c.result(ours.meta, ref)


def _first(table: pd.DataFrame, col: str):
    if not len(table) or col not in table:
        return None
    bad = table[table[col] == False]  # noqa: E712  (NA-safe: NA rows are not failures)
    return None if bad.empty else (int(bad.iloc[0]["step"]), bad.iloc[0]["site"])


def _first_divergence(table: pd.DataFrame, has_local: bool, ref_name: str) -> FirstDivergence | None:
    col = "local_passed" if has_local else "passed"
    hit = _first(table, col)
    if hit is None:
        return None
    step, site = hit
    rows = {(r["step"], r["site"]): r for r in table.to_dict("records")}
    row = rows[(step, site)]
    inputs = []
    for name in input_sites(site):
        r = rows.get((step, name))
        if r is not None:
            inputs.append(dict(site=name, passed=bool(r["passed"]), rel_l2=r["rel_l2"],
                               local_rel_l2=r.get("local_rel_l2"), local_passed=r.get("local_passed")))
    bad = table[table[col] == False]  # noqa: E712
    others = [(int(s), n) for s, n in zip(bad["step"], bad["site"])][1:]
    kind = "local" if has_local else "end-to-end"
    return FirstDivergence(step, parse_site(site)[0], site, kind, row, inputs,
                           _explain(step, site, row, inputs, kind, ref_name), others)


def step_label(step: int) -> str:
    return "prefill" if step == 0 else f"decode step {step}"


def _explain(step, site, row, inputs, kind, ref_name) -> str:
    op = parse_site(site)[1].key
    ok = [i["site"] for i in inputs if i.get("local_passed", i["passed"]) is not False and i["passed"]]
    parts = [f"the first op that diverges is {site} at {step_label(step)}"]
    if ok:
        parts.append(f"{' and '.join(ok)} match{'es' if len(ok) == 1 else ''} {ref_name}, {op} does not")
    pre = "local_" if kind == "local" else ""
    parts.append(f"worst element {row[pre + 'worst'] if pre + 'worst' in row else row['worst']}: "
                 f"ours {row[pre + 'ours']:.4g}, {ref_name} {row[pre + 'ref']:.4g} "
                 f"(relative error {row[pre + 'rel_l2']:.3g})")
    return "; ".join(parts)
