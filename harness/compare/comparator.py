"""Compare two traces into a divergence table, and find the first divergent op.

Knows nothing about where the traces came from: any two :class:`~harness.trace.Trace` objects
with canonical site names. ``local`` (optional) is a third trace holding each op recomputed on the
reference's own inputs (see ``Model.run_with_cache(anchor=...)``): its error against the reference
is the op's *local* error, free of upstream drift, and decides the verdict when present.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import pandas as pd
import torch

import harness.compare.systematic as sysmod
from harness.compare.metrics import PairStats, batch_stats, finish_many, logit_stats, optimistic_stats, pair_stats, stats_vector
from harness.gguf.arch import ARCHS, ArchSpec
from harness.sites import DIM_NAMES, SITES, SiteSpec, input_sites, parse_site
from harness.compare.tolerance import Policy, Tol, at_positions, max_error
from harness.trace import Trace


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


_LABELS = {spec.key: tuple(DIM_NAMES[d].replace("_", " ") for d in spec.layout) for spec in SITES}
_FORMATS = {key: " ".join(f"{n} {{}}" for n in labels) for key, labels in _LABELS.items()}


def _describe_index(spec: SiteSpec, idx: tuple[int, ...]) -> str:
    """``(3, 1, 8)`` at a (T, H, Dh) site -> "token 3 head 1 dim 8"."""
    labels = _LABELS[spec.key]
    if len(idx) == len(labels):
        return _FORMATS[spec.key].format(*idx)
    return " ".join([f"{n} {i}" for n, i in zip(labels, idx)])


def _rows_like(ours, ref, spec):
    """Our last rows when the reference kept only its output rows (token-major layouts)."""
    if spec.layout[0] == "T" and ours.dim() == ref.dim() and ref.shape[0] < ours.shape[0]:
        return ours[-ref.shape[0]:]
    return ours


def _values(s: PairStats) -> tuple:
    """What a table row takes from a PairStats, in the order :func:`finish_many`'s columns zip to."""
    return s.max_abs, s.rel_l2, s.max_norm, s.cosine, s.worst_index, s.ours_value, s.ref_value, s.nonfinite


class Comparator:
    """Builds a Comparison one tensor pair at a time, so tensors can be dropped as they are
    compared (the streaming GPU path) or fed from whole traces (:func:`compare_traces`).

    ``batched``: queue pairs and reduce them in segmented batches, brought to the host together
    in :meth:`result`; None (default) does so for GPU tensors and compares CPU pairs at once.

    ``systematic``: also test each local pair for systematic error below the element-wise
    tolerance (:mod:`harness.compare.systematic`; a :class:`~harness.compare.systematic.Null`,
    True for the calibrated one, False for none). A site then fails locally when its element-wise
    error or a calibrated systematic statistic fails (``local_elem_passed``, ``sys_passed``)."""

    BATCH_NUMEL = 1 << 22
    LARGE = 1 << 22           # a pair this large is reduced on its own (a GPU's float32 pair in one pass)
    BATCH_SYS = True          # small pairs' systematic sums reduced per batch (False: one pair at a time)
    LARGE_HOLD = 1 << 27      # elements of large pairs held until their finiteness is checked

    def __init__(self, policy: Policy, batched: bool | None = None, systematic: "sysmod.Null | bool" = True,
                 n_prompt: int | None = None, judge_unanchored: bool = True):
        self.policy, self.batched = policy, batched
        # False (a run of our model on a --sites subset): a local row whose op's inputs the reference
        # lacks holds our own upstream drift, not the op's error, and takes the end-to-end verdict
        self.judge_unanchored = judge_unanchored
        self.n_prompt = n_prompt      # step s attends n_prompt + s positions (tolerance.at_positions)
        self.null = (_default_null() if systematic is True else systematic) or None
        if getattr(policy, "storage", "float32") != "float32":
            self.null = None      # a reference stored rounded (float16 runs): never calibrated for it
        self.sys_pending: list = []   # ([(step, site)], (N, 8) sys_pair vectors on the device)
        self.sys_batch: list = []     # ((step, site), local, ref, token-major) reduced with the batch
        self.rows: dict[tuple[int, str], dict] = {}
        self.logit_rows: list[dict] = []
        self.spikes: list[dict] = []
        self.has_local = False
        self.batch: list = []     # pairs waiting to be reduced together
        self.batch_numel = 0
        self.pending: list = []   # ([(kind, step, site, shape)], (N, 9) stats on the device)
        self.large: list = []     # large pairs reduced optimistically, finiteness not yet checked
        self.large_numel = 0
        self.logit_pairs: list = []   # (step, ours, ref) logits compared at the flush
        self._tols: dict[tuple[str, str, str], tuple[Tol, str]] = {}

    def _tol(self, site: str, family: str, kind: str, step: int | None = None) -> tuple[Tol, str]:
        """(tolerance, regime name) at ``site``: the policy picks the regime (per-weight classes
        for weight matmuls, see :meth:`Policy.class_of`), cached per (class, family, kind); at
        ``step`` scaled for the positions it attends where the prompt length is known."""
        key = (self.policy.class_of(site, family, kind), family, kind)
        hit = self._tols.get(key)
        if hit is None:
            hit = self._tols[key] = self.policy.lookup(site, family, kind)
        if step is None or self.n_prompt is None:
            return hit
        return at_positions(hit[0], family, self.n_prompt + step), hit[1]

    def _defer(self, t) -> bool:
        return t.is_cuda if self.batched is None else self.batched

    def add(self, step: int, site: str, ours, ref) -> None:
        """End-to-end pair: our tensor and the reference's at (step, site)."""
        spec = parse_site(site)[1]                  # (cached) raises SiteError for a bad name now
        if ours.shape != ref.shape:
            ours = _rows_like(ours, ref, spec)
            if ours.shape != ref.shape:
                self._shape_mismatch(step, site, ours, ref)
                return
        deferred = self._defer(ours)
        if site == "logits" and deferred:
            self.logit_pairs.append((step, ours, ref))      # their host syncs wait for the flush
        elif site == "logits":
            self._logit_rows(step, ours, ref)
        if deferred:
            self._queue("e2e", step, site, ours, ref)
        else:
            self._e2e_row(step, site, tuple(ref.shape), _values(pair_stats(ours, ref)))

    def _logit_rows(self, step: int, ours, ref) -> None:
        lr, sp = logit_stats(ours, ref)
        self.logit_rows += [dict(step=step, **x) for x in lr]
        self.spikes += [dict(step=step, **x) for x in sp]

    def _e2e_row(self, step: int, site: str, shape: tuple, v: tuple) -> None:
        max_abs, rel, max_norm, cos, widx, ov, rv, nonfinite = v
        layer, spec = parse_site(site)
        max_norm = max_error(spec.family, max_abs, max_norm)
        tol, regime = self._tol(site, spec.family, "e2e", step)
        self.rows.setdefault((step, site), {}).update(
            step=step, layer=layer, site=site, op=spec.key, family=spec.family, shape=shape,
            max_abs=max_abs, rel_l2=rel, max_norm=max_norm, cosine=cos, worst=_describe_index(spec, widx),
            worst_index=widx, ours=ov, ref=rv, nonfinite=nonfinite,
            tol_rel=tol.rel, tol_max=tol.max, tol_regime=regime, passed=tol.passes(rel, max_norm))

    def _shape_mismatch(self, step: int, site: str, ours, ref) -> None:
        """A tensor of the wrong shape is a divergence at that site (e.g. a KV cache that does
        not grow), reported as a failing row rather than a crash."""
        layer, spec = parse_site(site)
        inf = float("inf")
        self.rows.setdefault((step, site), {}).update(
            step=step, layer=layer, site=site, op=spec.key, family=spec.family, shape=tuple(ref.shape),
            max_abs=inf, rel_l2=inf, max_norm=inf, cosine=0.0,
            worst=f"shape {tuple(ours.shape)} instead of {tuple(ref.shape)}", worst_index=(),
            ours=float("nan"), ref=float("nan"), nonfinite=0, tol_rel=0.0, tol_max=0.0,
            tol_regime=self._tol(site, spec.family, "e2e")[1], passed=False)

    def add_reduced(self, kind: str, step: int, site: str, shape: tuple, vec) -> None:
        """A pair reduced elsewhere: ``vec`` is a :func:`~harness.compare.metrics.stats_vector`
        (9 floats, the worst element's flat index in ``shape``) over the pair's whole ``shape``,
        e.g. merged from a micro-batched run's batches (:mod:`harness.stream`). ``kind``: "e2e"
        or "local"."""
        import numpy as np
        c = finish_many(np.asarray([list(vec)], dtype=np.float64), [tuple(shape)])
        v = tuple(c[k][0] for k in ("max_abs", "rel_l2", "max_norm", "cosine", "worst_index", "ours_value",
                                    "ref_value", "nonfinite"))
        if kind == "local":
            self.has_local = True
        (self._e2e_row if kind == "e2e" else self._local_row)(step, site, tuple(shape), v)

    def add_local(self, step: int, site: str, local, ref) -> None:
        """Local pair: our op recomputed on the reference's inputs, and the reference's output."""
        self.has_local = True
        spec = parse_site(site)[1]
        if local.shape != ref.shape:
            local = _rows_like(local, ref, spec)
        if local.shape != ref.shape:
            self.rows.setdefault((step, site), {}).update(
                local_rel_l2=float("inf"), local_max_norm=float("inf"),
                local_worst=f"shape {tuple(local.shape)} instead of {tuple(ref.shape)}",
                local_ours=float("nan"), local_ref=float("nan"), local_tol_rel=0.0, local_tol_max=0.0,
                local_tol_regime=self._tol(site, spec.family, "local")[1], local_passed=False)
            return
        if self._defer(local):
            self._queue("local", step, site, local, ref)
        else:
            self._local_row(step, site, tuple(ref.shape), _values(pair_stats(local, ref)))
        if self.wants_systematic(site, ref.numel()):
            tm = spec.layout[0] == "T"
            if self._defer(local) and self.BATCH_SYS and ref.numel() < self.LARGE:   # with the batch
                self.sys_batch.append(((step, site), local, ref, tm))
            elif self._defer(local):       # finished at the flush, all pairs at once
                self.sys_pending.append(([(step, site)], sysmod.sys_pair(local, ref, tm)[None]))
            else:
                self.add_systematic(step, site, sysmod.sys_vector(local, ref, tm).tolist())

    def wants_systematic(self, site: str, numel: int) -> bool:
        """Are the systematic statistics of a local pair at ``site`` of ``numel`` elements wanted?
        Only where a verdict can follow (calibrated regime/family, size within the calibrated):
        no float64 temporaries for a vocabulary-wide prefill on the GPU that would not be judged."""
        if self.null is None:
            return False
        family = parse_site(site)[1].family
        return numel <= self.null.n_max(self._tol(site, family, "local")[1], family)

    def add_systematic(self, step: int, site: str, vec) -> None:
        """The six :data:`~harness.compare.systematic.COLUMNS` of the local pair at (step, site),
        computed here or elsewhere (merged over a micro-batched prefill's batches)."""
        self.rows.setdefault((step, site), {}).update(sysmod.row_values(vec))

    def _local_row(self, step: int, site: str, shape: tuple, v: tuple) -> None:
        max_abs, rel, max_norm, _, widx, ov, rv, _ = v
        spec = parse_site(site)[1]
        max_norm = max_error(spec.family, max_abs, max_norm)
        lt, regime = self._tol(site, spec.family, "local", step)
        self.rows.setdefault((step, site), {}).update(
            local_rel_l2=rel, local_max_norm=max_norm, local_worst=_describe_index(spec, widx),
            local_ours=ov, local_ref=rv, local_tol_rel=lt.rel, local_tol_max=lt.max,
            local_tol_regime=regime, local_passed=lt.passes(rel, max_norm),
            local_elem_passed=lt.passes(rel, max_norm))

    def _queue(self, kind: str, step: int, site: str, ours, ref) -> None:
        """Hold a small pair until a batch is full (bounded memory), then reduce the batch at
        once (segmented, in pieces: :class:`~harness.compare.metrics.Segments`); a large pair is
        reduced on its own (:func:`~harness.compare.metrics.optimistic_stats`). Below 2^22
        elements, a pair reduced on its own cost ~0.7 ms of Python and launches on the H100,
        30k of them in a 16k-token report."""
        n = ref.numel()
        if n >= self.LARGE:
            self.large.append(((kind, step, site, tuple(ref.shape)), ours, ref, optimistic_stats(ours, ref)))
            self.large_numel += n
            if self.large_numel >= self.LARGE_HOLD:
                self._check_large()
            return
        self.batch.append((kind, step, site, tuple(ref.shape), ours, ref))
        self.batch_numel += n
        if self.batch_numel >= self.BATCH_NUMEL or len(self.batch) >= 512:
            self._reduce_batch()

    def _check_large(self) -> None:
        """One host sync for many large pairs (instead of one each, which stalls the GPU queue):
        pairs whose optimistic norms are not finite are reduced again on the masked path."""
        if not self.large:
            return
        stats = torch.stack([p[3] for p in self.large])
        finite = torch.isfinite(stats[:, 2:5]).all(1).tolist()
        for i, ok in enumerate(finite):
            if not ok:
                stats[i] = stats_vector(self.large[i][1], self.large[i][2])
        self.pending.append(([p[0] for p in self.large], stats))
        self.large, self.large_numel = [], 0

    def _reduce_batch(self) -> None:
        if self.sys_batch:
            b = self.sys_batch
            self.sys_pending.append(([p[0] for p in b], sysmod.sys_pairs([p[1] for p in b], [p[2] for p in b],
                                                                         [p[3] for p in b])))
            self.sys_batch = []
        if self.batch:
            stats = batch_stats([p[4] for p in self.batch], [p[5] for p in self.batch])
            self.pending.append(([p[:4] for p in self.batch], stats))
            self.batch, self.batch_numel = [], 0

    def flush(self) -> None:
        """Reduce what is queued, bring every result to the host in one transfer, fill the rows."""
        self._reduce_batch()
        self._check_large()
        for step, ours, ref in self.logit_pairs:
            self._logit_rows(step, ours, ref)
        self.logit_pairs = []
        if self.pending:
            self._fill_pending()
        if self.sys_pending:      # after the rows exist: the same column order as the per-pair path
            vals = sysmod.sys_finish_pairs(torch.cat([p[1] for p in self.sys_pending]).cpu()).tolist()
            for (step, site), v in zip([k for p in self.sys_pending for k in p[0]], vals):
                self.add_systematic(step, site, v)
            self.sys_pending = []

    def _fill_pending(self) -> None:
        vals = torch.cat([p[1] for p in self.pending]).cpu().numpy()
        keys = [k for p in self.pending for k in p[0]]
        self.pending = []
        c = finish_many(vals, [k[3] for k in keys])
        values = zip(c["max_abs"], c["rel_l2"], c["max_norm"], c["cosine"], c["worst_index"], c["ours_value"],
                     c["ref_value"], c["nonfinite"])
        for (kind, step, site, shape), v in zip(keys, values):
            (self._e2e_row if kind == "e2e" else self._local_row)(step, site, shape, v)

    def _unanchored(self, ref: Trace, op_in) -> set[tuple[int, str]]:
        """The local rows whose op's inputs the reference lacks: our "local" value of them was not
        recomputed on the reference's inputs and carries upstream drift."""
        have = set(ref.keys())
        return {(step, site) for (step, site), row in self.rows.items()
                if "local_elem_passed" in row and not _anchored(step, site, have, ref.n_layer, op_in)}

    def _systematic_verdicts(self, unanchored: set) -> None:
        """Each local row's systematic verdict (``sys_passed``: None where the regime and family
        were never calibrated, or for an ``unanchored`` row), folded into ``local_passed``."""
        for key, row in self.rows.items():
            if "local_elem_passed" not in row or "sys_z_slope" not in row:
                continue
            if key in unanchored:
                row.update(sys_passed=None, sys_score=float("nan"), sys_stat="")
                continue
            ok, score, stat = self.null.verdict(row["local_tol_regime"], row["family"], row)
            row.update(sys_passed=ok, sys_score=score, sys_stat=stat)
            row["local_passed"] = bool(row["local_elem_passed"]) and ok is not False

    def _judge_end_to_end(self, unanchored: set) -> list[str]:
        """``unanchored`` rows take the end-to-end verdict (upstream drift is what its tolerance
        allows for, not the op's own); the sites this happened to."""
        out = set()
        for key in unanchored:
            row = self.rows[key]
            if "passed" in row:
                row.update(local_passed=bool(row["passed"]), sys_passed=None)
                out.add(key[1])
        return sorted(out)

    def result(self, ours_meta: dict, ref: Trace) -> Comparison:
        self.flush()
        keys = [k for k in ref.keys() if k in self.rows and "rel_l2" in self.rows[k]]
        spec = trace_arch(ours_meta, ref.meta, {k[1] for k in keys})
        unanchored = self._unanchored(ref, spec.inputs if spec is not None else None)
        if self.null is not None:
            self._systematic_verdicts(unanchored)
        e2e_only = [] if self.judge_unanchored else self._judge_end_to_end(unanchored)
        table = pd.DataFrame([self.rows[k] for k in keys])
        if len(table) and "local_passed" not in table:
            table["local_passed"] = pd.NA
        ref_name = ref.meta.get("source") or "the reference"
        first = _first_divergence(table, self.has_local, ref_name, spec.inputs if spec is not None else None)
        if first is not None and first.site in e2e_only:      # decided by its end-to-end error
            first = replace(first, kind="end-to-end", explanation=_explain(
                first.step, first.site, first.row, first.inputs, "end-to-end", ref_name))
        meta = dict(ours=ours_meta, ref=ref.meta, tokens=ref.tokens, n_prompt=ref.n_prompt,
                    architecture=spec.name if spec is not None else None,
                    policy=self.policy.describe(), compared=len(table), missing_in_ours=len(ref) - len(table),
                    end_to_end_sites=e2e_only)
        return Comparison(table, pd.DataFrame(self.logit_rows), pd.DataFrame(self.spikes), first,
                          _first(table, "passed"), meta)


_NULL: list = []


def _anchored(step: int, site: str, have: set, n_layer: int, op_in) -> bool:
    """Did the reference hold every input of the op at ``site`` (so our local value of it was
    computed on the reference's inputs)?"""
    names = input_sites(site, op_in, n_layer)
    # attention reads the cache of every earlier step too (k_rope for kq, v for kqv)
    steps = range(step + 1) if parse_site(site)[1].key in ("kq", "kqv") else (step,)
    return all((s, n) in have for n in names for s in steps)


def _default_null() -> "sysmod.Null":
    """The calibrated null of ``systematic.json``, read once."""
    if not _NULL:
        _NULL.append(sysmod.Null())
    return _NULL[0]


def compare_traces(ours: Trace, ref: Trace, policy: Policy, local: Trace | None = None,
            batched: bool | None = None, systematic: "sysmod.Null | bool" = True,
            judge_unanchored: bool = True) -> Comparison:
    """Divergence table of ``ours`` against ``ref`` over the (step, site) pairs both hold
    (``batched``, ``systematic``, ``judge_unanchored``: see :class:`Comparator`)."""
    c = Comparator(policy, batched, systematic, n_prompt=ref.n_prompt if ref.tokens else None,
                   judge_unanchored=judge_unanchored)
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


def trace_arch(ours_meta: dict | None, ref_meta: dict | None, sites=()) -> ArchSpec | None:
    """The architecture two traces were run on, whose op inputs explain a divergence
    (``ArchSpec.inputs``: on qwen3, q_rope reads q_norm): the one either meta names
    (``architecture``: our model's describe(), a recorded run's config), else the first
    registered architecture that has every site key of ``sites`` (an engine's dump without
    the key), else None."""
    for meta in (ours_meta or {}, ref_meta or {}):
        spec = ARCHS.get(str(meta.get("architecture")))
        if spec is not None:
            return spec
    keys = {parse_site(n)[1].key for n in sites}
    return next((a for a in ARCHS.values() if keys and keys <= set(a.sites)), None)


def op_inputs(meta: dict) -> dict[str, tuple[str, ...]] | None:
    """The op-input overrides (``ArchSpec.inputs``) of a Comparison's architecture (its
    ``meta["architecture"]``, else what its traces' metas name), for :func:`harness.sites.input_sites`."""
    spec = ARCHS.get(str(meta.get("architecture"))) or trace_arch(meta.get("ours"), meta.get("ref"))
    return spec.inputs if spec is not None else None


def _first_divergence(table: pd.DataFrame, has_local: bool, ref_name: str,
                      op_in: dict[str, tuple[str, ...]] | None = None) -> FirstDivergence | None:
    col = "local_passed" if has_local else "passed"
    hit = _first(table, col)
    if hit is None:
        return None
    step, site = hit
    rows = {(r["step"], r["site"]): r for r in table.to_dict("records")}
    row = rows[(step, site)]
    inputs = []
    for name in input_sites(site, op_in):
        r = rows.get((step, name))
        if r is not None:
            inputs.append(dict(site=name, passed=bool(r["passed"]), rel_l2=r["rel_l2"],
                               local_rel_l2=r.get("local_rel_l2"), local_passed=r.get("local_passed")))
    bad = table[table[col] == False]  # noqa: E712
    others = [(int(s), n) for s, n in zip(bad["step"], bad["site"])][1:]
    kind = "local" if has_local else "end-to-end"
    return FirstDivergence(step, parse_site(site)[0], site, kind, row, inputs,
                           _explain(step, site, row, inputs, kind, ref_name), others)


def decisive_column(table: pd.DataFrame) -> str:
    """The verdict column that decides: ``local_passed`` when local errors were measured, else
    ``passed`` (end to end)."""
    return "local_passed" if "local_passed" in table and table["local_passed"].notna().any() else "passed"


def group_of(layer: int | None, site: str) -> str:
    """A site's group in per-layer summaries: ``blk.{i}`` for the sites of layer i, the site's own
    name for the global sites (``embd``, ``output_norm``, ``logits``)."""
    return f"blk.{int(layer)}" if layer is not None and pd.notna(layer) else site


def layer_group(table: pd.DataFrame) -> pd.Series:
    """:func:`group_of` of every row of a divergence table."""
    return table["layer"].map(lambda x: f"blk.{int(x)}" if pd.notna(x) else None).fillna(table["site"])


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
    if kind == "local" and row.get("sys_passed") is False and row.get("local_elem_passed", True):
        parts.append(systematic_words(row))
    return "; ".join(parts)


def systematic_words(row: dict, ours: str = "ours", ref: str = "reference") -> str:
    """Why a site whose elements are all within tolerance still fails: its worst statistic
    (``ours``/``ref``: what the local pair's two sides are called)."""
    stat = row.get("sys_stat")
    what = {"slope": f"{ours} = (1 {row.get('sys_slope', 0):+.3g}) x {ref}, z = {row.get('sys_z_slope', 0):.3g}",
            "offset": f"mean error {row.get('sys_offset', 0):+.3g} x rms, z = {row.get('sys_z_offset', 0):.3g}",
            "chan": f"per-channel mean error {row.get('sys_chan', 0):.3g} x rms, z = {row.get('sys_z_chan', 0):.3g}"}
    return (f"every element is within tolerance but the error is systematic ({stat}: {what.get(stat, '')}, "
            f"{row.get('sys_score', 0):.3g}x its calibrated clean-run threshold)")
