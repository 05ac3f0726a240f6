"""Error metrics between two tensors of one site, and logit-specific checks. Pure functions."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from harness.budget import BATCH_ELEMENTS, STATS_ELEMENTS
from harness.compare import cuda_stats


@dataclass(frozen=True)
class PairStats:
    max_abs: float          # max |ours - ref|
    rel_l2: float           # ||ours - ref|| / ||ref||
    max_norm: float         # max |ours - ref| / rms(ref): catches a few wild elements
    cosine: float
    ref_rms: float
    worst_index: tuple[int, ...]
    ours_value: float
    ref_value: float
    nonfinite: int          # elements that are NaN/inf on exactly one side, or differ in inf sign


def stats_vector(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The raw reductions behind :class:`PairStats`, as one float64 tensor on ``ours``'s device
    (a GPU caller can queue many and transfer them together). The finiteness check synchronises
    once; the streaming ``Comparator`` avoids it with :func:`optimistic_stats` (large pairs) and
    :func:`batch_stats` (small pairs). A pair over :data:`STATS_ELEMENTS` elements is reduced
    in slices of its first axis, combined (bounded float64 temporaries)."""
    if tuple(ours.shape) != tuple(ref.shape):
        raise ValueError(f"shape mismatch: ours {tuple(ours.shape)} vs reference {tuple(ref.shape)}")
    return _sliced(_one_stats_vector, ours, ref)


def _one_stats_vector(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    a, b = _flat64(ours, ref)
    if a.numel() == 0:
        return torch.zeros(9, dtype=torch.float64, device=a.device)
    if bool(torch.isfinite(a).all() & torch.isfinite(b).all()):
        return _finite_stats(a, b)      # the common case, in fewer ops: nothing to mask
    return _masked_stats(a, b)


def _sliced(fn, ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``fn``'s stats vector of a pair, computed on slices of the first axis of at most about
    :data:`STATS_ELEMENTS` elements and combined as the reductions compose (the worst element
    the first of the largest, as ``argmax`` picks; squared norms and dot products summed)."""
    n = ours.numel()
    if n <= STATS_ELEMENTS or ours.dim() == 0 or ours.shape[0] < 2:
        return fn(ours, ref)
    row = n // ours.shape[0]
    step = max(1, STATS_ELEMENTS // max(row, 1))
    parts = torch.stack([fn(ours[i:i + step], ref[i:i + step]) for i in range(0, ours.shape[0], step)])
    offsets = torch.arange(0, ours.shape[0], step, device=parts.device, dtype=torch.float64) * row
    k = parts[:, 1].argmax()
    best = _at(parts, k)
    sq = parts[:, 2:5].pow(2).sum(0).sqrt()
    return torch.stack([_at(offsets, k) + best[0], best[1], sq[0], sq[1], sq[2], parts[:, 5].sum(),
                        parts[:, 6].sum(), best[7], best[8]])


def _at(t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """``t[i]`` for a 0-d index tensor without a host synchronisation (``t[i]`` reads ``i``'s
    value on the host first: a device-to-host copy and a stall per pair on a GPU)."""
    return t.index_select(0, i.reshape(1))[0]


def _flat64(ours: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as flat float64 copies on ``ours``'s device (fresh copies: the same memory layout
    whichever path then runs)."""
    a = ours.detach().to(torch.float64, copy=True).flatten()
    b = ref.detach().to(device=a.device, dtype=torch.float64, copy=True).flatten()
    return a, b


def _finite_stats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """stats_vector of flat float64 ``a``, ``b`` without non-finite values. A GPU takes a @ b
    (one kernel); the CPU the masked path's sum, so its values do not depend on the path taken."""
    d = a - b
    flat = d.abs().argmax()
    dot = a @ b if a.is_cuda else (a * b).sum()
    return torch.stack([flat.double(), _at(d, flat).abs(), d.norm(), b.norm(), a.norm(), dot,
                        torch.zeros((), dtype=torch.float64, device=a.device), _at(a, flat), _at(b, flat)])


def optimistic_stats(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """:func:`stats_vector` assuming every value is finite, without the host synchronisation.
    Valid exactly when its three norms (columns 2-4) are finite: float32 values squared and summed
    in float64 cannot overflow, so a non-finite norm means a non-finite input, and the caller
    must then use :func:`stats_vector` (see ``Comparator``). A float32 pair on a GPU in one pass
    (:mod:`harness.compare.cuda_stats`), else sliced as :func:`stats_vector` is."""
    fused = cuda_stats.pair_stats_vector(ours, ref)
    if fused is not None:
        return fused
    return _sliced(lambda a, b: _finite_stats(*_flat64(a, b)), ours, ref)


def nonfinite_masks(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bad, both_inf) of two same-shaped tensors: ``both_inf`` where both hold the same infinity
    (a masked -inf agrees), ``bad`` where any other non-finite value is on either side."""
    both_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
    bad = ~(torch.isfinite(a) & torch.isfinite(b)) & ~both_inf
    return bad, both_inf


def abs_error(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Elementwise |ours - ref| in float64 as the metrics count it: 0 where both hold the same
    infinity, inf where any other non-finite value is on either side (see :func:`nonfinite_masks`)."""
    a, b = ours.detach().double(), ref.detach().to(ours.device).double()
    bad, both_inf = nonfinite_masks(a, b)
    return torch.where(bad, torch.inf, torch.where(both_inf, 0.0, a - b).abs())


def _masked(a: torch.Tensor, b: torch.Tensor):
    """Elementwise part of the reductions (see :func:`nonfinite_masks`). Returns
    (bad, fa, fb, d, diff): both kinds zeroed in fa and fb, d = fa - fb, diff = |d| or inf."""
    bad, both_inf = nonfinite_masks(a, b)
    skip = bad | both_inf
    fa, fb = torch.where(skip, 0.0, a), torch.where(skip, 0.0, b)
    d = fa - fb
    return bad, fa, fb, d, torch.where(bad, torch.inf, d.abs())


def _masked_stats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """stats_vector of flat float64 ``a``, ``b`` with non-finite values (see :func:`_masked`)."""
    bad, fa, fb, d, diff = _masked(a, b)
    flat = diff.argmax()
    return torch.stack([flat.double(), _at(diff, flat), d.norm(), fb.norm(), fa.norm(), (fa * fb).sum(),
                        bad.sum().double(), _at(a, flat), _at(b, flat)])


PIECE = 1 << 16     # segment pieces: a segmented reduction runs one thread block per segment


def _on(dev: torch.device, values: list[int]) -> torch.Tensor:
    """int64 ``values`` on ``dev`` without a blocking host->device copy (through pinned memory)."""
    t = torch.tensor(values, dtype=torch.int64)
    return t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t


def segment_reduce(values: torch.Tensor, how: str, lens: torch.Tensor) -> torch.Tensor:
    """``how`` ("sum", "max", "min") of each contiguous segment of ``values`` (its last axis),
    one row at a time: a segmented reduction, not atomics into a few slots (float64 atomics all
    hitting one address per pair were a third of a long report's GPU time)."""
    if values.dim() == 1:
        return torch.segment_reduce(values, how, lengths=lens, unsafe=True)
    return torch.stack([torch.segment_reduce(v, how, lengths=lens, unsafe=True) for v in values])


class Segments:
    """The pairs of a concatenation as contiguous segments, reduced in two levels: pieces of at
    most :data:`PIECE` elements (many thread blocks for a large pair), then each pair's pieces.
    ``starts``: each pair's first element; :attr:`seg`: each element's pair."""

    def __init__(self, sizes: list[int], dev: torch.device):
        pieces = [max(1, -(-n // PIECE)) for n in sizes]
        plens = [m for n, k in zip(sizes, pieces) for m in [PIECE] * (k - 1) + [n - PIECE * (k - 1)]]
        self.plen, self.count, lens = _on(dev, plens), _on(dev, pieces), _on(dev, sizes)
        self.pair_of_piece = torch.repeat_interleave(torch.arange(len(sizes), device=dev), self.count,
                                                     output_size=len(plens))
        self.piece_of = torch.repeat_interleave(torch.arange(len(plens), device=dev), self.plen,
                                                output_size=sum(sizes))
        self.starts = torch.cumsum(lens, 0) - lens

    @property
    def seg(self) -> torch.Tensor:
        """Each element's pair (made when asked: the batched pair statistics do not need it)."""
        return self.pair_of_piece[self.piece_of]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Per pair sums of ``values`` (its last axis runs over the concatenation)."""
        return segment_reduce(segment_reduce(values, "sum", self.plen), "sum", self.count)

    def first_max(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pair: the largest of ``values`` (1-D, no NaN) and the first position holding it."""
        pos = torch.arange(values.numel(), device=values.device, dtype=torch.float64)
        mp = segment_reduce(values, "max", self.plen)
        fp = segment_reduce(torch.where(values == mp[self.piece_of], pos, torch.inf), "min", self.plen)
        m = segment_reduce(mp, "max", self.count)
        return m, segment_reduce(torch.where(mp == m[self.pair_of_piece], fp, torch.inf), "min", self.count)


def numel_groups(tensors: list[torch.Tensor], limit: int | None = None) -> list[slice]:
    """Consecutive runs of ``tensors`` of at most ``limit`` (default :data:`BATCH_ELEMENTS`)
    elements together, a larger tensor alone: a batched reduction's temporaries stay bounded."""
    limit = BATCH_ELEMENTS if limit is None else limit
    out, start, n = [], 0, 0
    for i, t in enumerate(tensors):
        if n and n + t.numel() > limit:
            out.append(slice(start, i))
            start, n = i, 0
        n += t.numel()
    return out + [slice(start, len(tensors))] if tensors else out


def batch_stats(ours: list[torch.Tensor], refs: list[torch.Tensor]) -> torch.Tensor:
    """:func:`stats_vector` of many pairs at once, as an (N, 9) tensor on their device: the pairs
    are concatenated and reduced per segment, so a GPU runs a dozen kernels for each group of
    :data:`BATCH_ELEMENTS` elements instead of a dozen per pair, with no host synchronisation
    (float32 pairs on a GPU: two launches per group, :func:`~harness.compare.cuda_stats.batch_vectors`).
    Non-finite values are handled as :func:`stats_vector` does (an inf equal on both sides is
    ignored; any other non-finite element counts in ``nonfinite`` and makes its pair's worst
    error inf)."""
    groups = numel_groups(ours)
    if len(groups) > 1:
        return torch.cat([_batch_stats(ours[g], refs[g]) for g in groups])
    return _batch_stats(ours, refs)


def _batch_stats(ours: list[torch.Tensor], refs: list[torch.Tensor]) -> torch.Tensor:
    fused = cuda_stats.batch_vectors(ours, refs)        # float32 CUDA pairs: two launches in all
    if fused is not None:
        return fused[0]
    dev = ours[0].device
    if any(o.numel() == 0 for o in ours):
        return torch.stack([stats_vector(o, r) for o, r in zip(ours, refs)])
    a = torch.cat([o.detach().reshape(-1) for o in ours]).double()
    b = torch.cat([r.detach().to(dev).reshape(-1) for r in refs]).double()
    segs = Segments([o.numel() for o in ours], dev)
    bad, fa, fb, d, diff = _masked(a, b)
    mx, first = segs.first_max(diff)
    first = first.long()
    sums = segs.sum(torch.stack([d * d, fb * fb, fa * fa, fa * fb, bad.double()]))
    return torch.stack([(first - segs.starts).double(), mx, sums[0].sqrt(), sums[1].sqrt(), sums[2].sqrt(), sums[3],
                        sums[4], a[first], b[first]], dim=1)


def finish_stats(vals: list[float], shape: tuple[int, ...]) -> PairStats:
    """PairStats from a :func:`stats_vector` brought to the host."""
    flat_i, max_abs, nd, nb, na, dot, nonfinite, ov, rv = vals
    n = 1
    for s in shape:
        n *= s
    if n == 0:
        return PairStats(0.0, 0.0, 0.0, 1.0, 0.0, (), 0.0, 0.0, 0)
    tiny = 1e-30
    rms = nb / n ** 0.5
    rel = nd / max(nb, tiny) if nb > tiny or nd > 0 else 0.0
    cos = dot / max(na * nb, tiny) if na > tiny and nb > tiny else float(na == nb)
    if nonfinite:
        rel, max_abs = float("inf"), float("inf")
    idx, rest = [], int(flat_i)
    for s in reversed(shape):
        idx.append(rest % s)
        rest //= s
    return PairStats(max_abs=max_abs, rel_l2=rel, max_norm=max_abs / max(rms, tiny) if max_abs else 0.0,
                     cosine=cos, ref_rms=rms, worst_index=tuple(reversed(idx)), ours_value=ov, ref_value=rv,
                     nonfinite=int(nonfinite))


def finish_many(vals: np.ndarray, shapes: list[tuple[int, ...]]) -> dict[str, list]:
    """:func:`finish_stats` of many :func:`stats_vector` rows (an (N, 9) float64 array) at once,
    as columns named like PairStats' fields. The same float64 arithmetic, so the same values."""
    flat_i, max_abs, nd, nb, na, dot, nonfinite, ov, rv = vals.T
    sizes = [math.prod(s) for s in shapes]
    roots = {n: n ** 0.5 for n in set(sizes)}
    tiny, inf = 1e-30, float("inf")
    with np.errstate(all="ignore"):
        rms = nb / np.array([roots[n] for n in sizes], dtype=np.float64)
        rel = np.where((nb > tiny) | (nd > 0), nd / np.maximum(nb, tiny), 0.0)
        cos = np.where((na > tiny) & (nb > tiny), dot / np.maximum(na * nb, tiny), (na == nb).astype(np.float64))
        bad = nonfinite != 0
        rel, max_abs = np.where(bad, inf, rel), np.where(bad, inf, max_abs)
        max_norm = np.where(max_abs != 0, max_abs / np.maximum(rms, tiny), 0.0)
    empty = np.array([n == 0 for n in sizes], dtype=bool)
    cols = dict(max_abs=max_abs, rel_l2=rel, max_norm=max_norm, cosine=cos, ref_rms=rms, ours_value=ov,
                ref_value=rv)
    out = {k: np.where(empty, 1.0 if k == "cosine" else 0.0, v).tolist() for k, v in cols.items()}
    out["nonfinite"] = np.where(empty, 0, nonfinite).astype(np.int64).tolist()
    out["worst_index"] = _unravel_all(flat_i, shapes, empty)
    return out


def _unravel_all(flat: np.ndarray, shapes: list[tuple[int, ...]], empty: np.ndarray) -> list[tuple[int, ...]]:
    """Each row's flat index as a tuple of Python ints in its shape (``()`` for an empty one),
    one numpy call per distinct shape."""
    rows: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(shapes):
        rows.setdefault(s, []).append(i)
    out: list = [()] * len(shapes)
    for shape, idx in rows.items():
        if shape and not empty[idx[0]]:                      # a scalar's index is ()
            coords = np.unravel_index(flat[idx].astype(np.int64), shape)
            for i, t in zip(idx, zip(*[c.tolist() for c in coords])):
                out[i] = t
    return out


def pair_stats(ours: torch.Tensor, ref: torch.Tensor) -> PairStats:
    """Metrics of ``ours`` against ``ref`` (same shape), computed in float64 on ``ours``'s device."""
    return finish_stats(stats_vector(ours, ref).tolist(), tuple(ref.shape))


def _robust_z(x: torch.Tensor) -> torch.Tensor:
    """Per-row robust z-score: (x - median) / (1.4826 * MAD)."""
    med = x.median(dim=-1, keepdim=True).values
    mad = (x - med).abs().median(dim=-1, keepdim=True).values * 1.4826
    return (x - med) / mad.clamp_min(1e-12)


def logit_stats(ours: torch.Tensor, ref: torch.Tensor, k: int = 10, spike_z: float = 8.0) -> tuple[list, list]:
    """Per token row of (T, V) logits: top-1 agreement, top-k overlap, KL(ref || ours); and the
    tokens whose logit is an outlier (robust z-score above ``spike_z``) on one side and
    unremarkable (below half of it) on the other (the first 1000 in row order, largest z first).
    Vectorized over rows, on the tensors' device, at most :data:`STATS_ELEMENTS` logits at once."""
    step = max(1, STATS_ELEMENTS // max(ours.shape[-1], 1))
    rows, spikes = [], []
    for t0 in range(0, ours.shape[0], step):
        r, sp = _logit_stats(ours[t0:t0 + step], ref[t0:t0 + step], k, spike_z)
        rows += [dict(x, row=x["row"] + t0) for x in r]
        spikes += [dict(x, row=x["row"] + t0) for x in sp]
    spikes = sorted(spikes, key=lambda x: x["row"])[:1000]
    spikes.sort(key=lambda s: -s["z"])
    return rows, spikes


def _logit_stats(ours: torch.Tensor, ref: torch.Tensor, k: int, spike_z: float) -> tuple[list, list]:
    a, b = ours.detach().float(), ref.detach().to(ours.device).float()
    k = min(k, a.shape[-1])
    fin = torch.isfinite(a).all(-1) & torch.isfinite(b).all(-1)
    pa, pb = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    kl = torch.where(fin, (pb.exp() * (pb - pa)).sum(-1), torch.full_like(fin, float("inf"), dtype=torch.float64))
    ta, tb = a.topk(k, dim=-1).indices, b.topk(k, dim=-1).indices
    overlap = (ta[:, :, None] == tb[:, None, :]).any(-1).sum(-1).float() / k
    top_a, top_b = a.argmax(-1), b.argmax(-1)
    za, zb = _robust_z(a).abs(), _robust_z(b).abs()
    one_sided = ((za > spike_z) & (zb < spike_z / 2)) | ((zb > spike_z) & (za < spike_z / 2))
    rows = [dict(row=t, top1_ours=int(x), top1_ref=int(y), top1_agree=int(x) == int(y), topk_overlap=float(o),
                 kl=float(d)) for t, (x, y, o, d) in enumerate(zip(top_a.tolist(), top_b.tolist(),
                                                                   overlap.tolist(), kl.tolist()))]
    spikes = []
    for t, tok in torch.nonzero(one_sided).tolist()[:1000]:
        side = "ours" if za[t, tok] > spike_z else "reference"
        spikes.append(dict(row=t, token=tok, ours=float(a[t, tok]), ref=float(b[t, tok]), side=side,
                           z=float(max(za[t, tok], zb[t, tok]))))
    return rows, spikes
