"""Systematic error below the element-wise tolerance: per-site statistics with a calibrated null.

Rounding noise is (nearly) unbiased and uncorrelated with the value; a bug that scales, shifts or
squashes a tensor is not. On the *local* pair of a site (our op on the reference's inputs, and
the reference's output; d = ours - ref) three statistics each give a z-score and an effect size:

``slope``   least-squares slope of d on ref, beta = <d, ref> / <ref, ref> (ours ~ (1 + beta) ref),
            against its standard error from the residual: catches scale errors and squashing
            (any error correlated with the value). Effect: |beta|.
``offset``  mean of d against its standard error: catches a constant added. Effect: |mean d| / rms(ref).
``chan``    token-major sites with at least 2 tokens (layout (T, ...)): the per-channel means of d
            over tokens, as a chi-square against the pooled within-channel variance, turned
            into a z-score (chi - C) / sqrt(2C): catches a per-channel vector added (a bias added
            twice). Effect: rms of the channel means / rms(ref).

A statistic fails at a site only when its |z| exceeds the threshold calibrated for the site's
regime and family on clean runs (:class:`Null`: ``max(Z_FLOOR, SAFETY x worst clean |z|)``) *and*
its effect exceeds EFFECT_FLOOR (64 float32 unit roundoffs, 3.8e-6: a bias at rounding level is
never a finding, however many elements make it significant; at 16 units, 9.5e-7, a clean prefill
of the mixed-type 0.5B Q4_K_M file was flagged once in 20 runs, logits slope 1.6e-6 at z 16.9). A regime or family never calibrated
is not tested (``sys_passed`` NA): the element-wise verdict alone decides there. Nor is a tensor
larger than any the calibration saw for its regime and family (``n_max``): a small clean bias
(CUDA kernels have some) has a z growing as the square root of the element count, so a threshold
holds only up to the sizes it was measured on (measured: tiny-calibrated CUDA thresholds flagged
2 of 3 clean prefill logits of the 0.5B-shaped files, 2 to 9x more elements).

The null lives in ``systematic.json`` next to ``tolerances.json`` (kept apart so that
``harness.calibrate`` rewriting the tolerance table never drops it); ``benchmarks/mde.py null``
writes it from clean runs (:func:`observe`, :func:`build_null`).
"""
from __future__ import annotations

import itertools
import json
import math
import os

import torch

STATS = ("slope", "offset", "chan")
NULL_PATH = os.path.join(os.path.dirname(__file__), "systematic.json")
NULL_VERSION = 1
Z_FLOOR = 8.0           # never a threshold below this (a Gaussian |z| > 8 has p ~ 1e-15)
SAFETY = 2.0            # threshold = SAFETY x the worst clean |z| seen in calibration
EFFECT_FLOOR = 64 * 2.0 ** -24   # the table's "effect_floor" is the one it was calibrated with
# columns a comparison row gets, in the order of :func:`sys_vector`
COLUMNS = ("sys_slope", "sys_z_slope", "sys_offset", "sys_z_offset", "sys_chan", "sys_z_chan")


def sys_vector(ours: torch.Tensor, ref: torch.Tensor, token_major: bool) -> torch.Tensor:
    """The six numbers of :data:`COLUMNS` as one float64 tensor on ``ours``'s device, with no
    host synchronisation. Elements non-finite on either side are left out (NaN results when
    nothing is left); ``chan`` is NaN unless ``token_major`` and the tensor has at least 2 rows."""
    return sys_finish_pairs(sys_pair(ours, ref, token_major)[None])[0]


def sys_sums(ours: torch.Tensor, ref: torch.Tensor, token_major: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sufficient statistics of :func:`sys_vector`, which add up over row blocks of a
    token-major tensor (a micro-batched prefill, :mod:`harness.stream`): float64
    ``[n, <ref, ref>, <d, ref>, <d, d>, sum d, rows]`` and, for ``token_major`` tensors, the
    per-channel sums of d over rows (layout (T, ...) flattened to (T, C)), else None."""
    a = ours.detach().to(torch.float64)
    b = ref.detach().to(device=a.device, dtype=torch.float64)
    ok = torch.isfinite(a) & torch.isfinite(b)
    a, b = torch.where(ok, a, 0.0), torch.where(ok, b, 0.0)
    d = a - b
    fd, fb = d.flatten(), b.flatten()
    rows = float(d.shape[0]) if token_major and d.dim() >= 2 else 0.0
    sums = torch.stack([ok.sum().double(), fb @ fb, fd @ fb, fd @ fd, fd.sum(),
                        torch.full((), rows, dtype=torch.float64, device=a.device)])
    return sums, (d.reshape(d.shape[0], -1).sum(0) if rows else None)


def sys_pair(ours: torch.Tensor, ref: torch.Tensor, token_major: bool) -> torch.Tensor:
    """One pair's statistics reduced to a fixed-size float64 vector on its device (no host
    synchronisation; a GPU caller stacks many and finishes them at once with
    :func:`sys_finish_pairs`): :func:`sys_sums`' six, then the channel sums' energy
    sum_c (sum_t d_tc)^2 and the channel count C (both 0 without channels)."""
    sums, chan = sys_sums(ours, ref, token_major)
    return _with_channels(sums, chan)


def sys_sums_many(ours: list[torch.Tensor], refs: list[torch.Tensor],
                  token_major: list[bool]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """:func:`sys_sums` of many pairs at once, on their device: the pairs are concatenated and
    reduced per segment (a dozen kernels for the batch instead of a dozen per pair; the channel
    sums by float64 atomics, so their last digits may vary from run to run), float32 pairs on a
    GPU in two launches (:func:`~harness.compare.cuda_stats.batch_vectors`, channel sums in a
    fixed order). Returns the (N, 6) sums, every
    token-major pair's channel sums concatenated, and each pair's channel count (0: none).
    At most :data:`~harness.compare.metrics.BATCH_ELEMENTS` elements are concatenated at once."""
    from harness.compare.metrics import numel_groups
    groups = numel_groups(ours)
    if len(groups) <= 1:
        return _sys_sums_group(ours, refs, token_major)
    parts = [_sys_sums_group(ours[g], refs[g], token_major[g]) for g in groups]
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            [c for p in parts for c in p[2]])


def _sys_sums_group(ours: list[torch.Tensor], refs: list[torch.Tensor],
                    token_major: list[bool]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    from harness.compare.cuda_stats import batch_vectors
    from harness.compare.metrics import Segments
    rows = [o.shape[0] if tm and o.dim() >= 2 else 0 for o, tm in zip(ours, token_major)]   # 0: no channels
    fused = batch_vectors(ours, refs, token_major)       # float32 CUDA pairs: two launches in all
    if fused is not None:
        col = torch.tensor(rows, dtype=torch.float64).pin_memory().to(fused[1].device, non_blocking=True)
        return torch.cat([fused[1], col[:, None]], 1), fused[2], fused[3]
    dev = ours[0].device
    a = torch.cat([o.detach().reshape(-1) for o in ours]).double()
    b = torch.cat([r.detach().to(dev).reshape(-1) for r in refs]).double()
    ok = torch.isfinite(a) & torch.isfinite(b)
    a, b = torch.where(ok, a, 0.0), torch.where(ok, b, 0.0)
    d = a - b
    segs = Segments([o.numel() for o in ours], dev)
    seg, starts = segs.seg, segs.starts
    sums = segs.sum(torch.stack([ok.double(), b * b, d * b, d * d, d]))
    counts = [o.numel() // r if r else 0 for o, r in zip(ours, rows)]
    total = sum(counts)
    offs = [total if not c else off for c, off in zip(counts, itertools.accumulate([0] + counts))]
    host = torch.tensor([rows, [max(c, 1) for c in counts], offs], dtype=torch.int64)
    host = host.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else host
    within = (torch.arange(a.numel(), device=dev) - starts[seg]) % host[1][seg]
    ch = torch.where(host[0][seg] > 0, host[2][seg] + within, total)      # slot `total`: no channel
    chan = torch.zeros(total + 1, dtype=torch.float64, device=dev).index_add_(0, ch, d)[:total]
    return torch.cat([sums.T, host[0].double()[:, None]], 1), chan, counts


def sys_pairs(ours: list[torch.Tensor], refs: list[torch.Tensor], token_major: list[bool]) -> torch.Tensor:
    """:func:`sys_pair` of many pairs at once, (N, 8) on their device (see :func:`sys_sums_many`)."""
    from harness.compare.metrics import segment_reduce
    sums, chan, counts = sys_sums_many(ours, refs, token_major)
    dev = sums.device
    c = torch.tensor(counts, dtype=torch.int64)
    c = c.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else c     # no host sync
    energy = segment_reduce(chan * chan, "sum", c)
    return torch.cat([sums, energy[:, None], c.double()[:, None]], 1)


def _with_channels(sums: torch.Tensor, chan: torch.Tensor | None) -> torch.Tensor:
    if chan is None:
        return torch.cat([sums, sums.new_zeros(2)])
    return torch.cat([sums, (chan * chan).sum()[None], sums.new_full((1,), float(chan.numel()))])


def sys_finish_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """:data:`COLUMNS` (N, 6) of N :func:`sys_pair` vectors (N, 8), vectorized, on their device."""
    n, bb, db, dd, sd, rows, energy, c = pairs.unbind(-1)
    beta = db / bb
    s2_slope = (dd - db * db / bb).clamp_min(0.0) / (n - 1)
    z_slope = _z(db, (bb * s2_slope).sqrt())
    mu = sd / n
    s2 = (dd - n * mu * mu).clamp_min(0.0) / (n - 1)
    z_off = _z(mu, (s2 / n).sqrt())
    rms = (bb / n).sqrt()
    chan, z_chan = _channel(energy, dd, rows, c, rms)
    return torch.stack([beta, z_slope, mu / rms, z_off, chan, z_chan], -1)


def sys_finish_many(sums: list[torch.Tensor], chans: list) -> list[list[float]]:
    """The :data:`COLUMNS` of many pairs from their (possibly added-up, host) :func:`sys_sums`
    and channel sums (or None), in one vectorized pass; rows of :data:`COLUMNS`."""
    if not sums:
        return []
    return sys_finish_pairs(torch.stack([_with_channels(s, c) for s, c in zip(sums, chans)])).tolist()


def _z(num: torch.Tensor, se: torch.Tensor) -> torch.Tensor:
    """num / se; 0 when both are 0, +-inf when only the noise is 0 (an exact site that moved)."""
    inf = torch.full_like(num, float("inf"))
    return torch.where(se > 0, num / se.clamp_min(1e-300), torch.where(num != 0, inf * num.sign(), 0.0 * num))


def _channel(energy: torch.Tensor, dd: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
             rms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(effect, z) of the per-channel means m_c of (T, C) errors (``energy`` = T^2 sum_c m_c^2,
    ``dd`` the errors' sum of squares) against the pooled within-channel variance s^2 = (dd - T
    sum m_c^2) / (TC - C): chi = T sum_c m_c^2 / s^2 ~ chi-square(C) under unbiased noise. NaN
    where there are no channels or fewer than 2 rows."""
    valid = (t >= 2) & (c > 0)
    t, c = torch.where(valid, t, 2.0), torch.where(valid, c, 1.0)
    chi_num = energy / t
    s2 = (dd - chi_num).clamp_min(0.0) / (t * c - c)
    chi = torch.where(s2 > 0, chi_num / s2.clamp_min(1e-300),
                      torch.where(chi_num > 0, torch.full_like(chi_num, float("inf")), c))
    nan = torch.full_like(chi, float("nan"))
    effect = (energy / (t * t * c)).sqrt() / rms
    return torch.where(valid, effect, nan), torch.where(valid, (chi - c) / (2 * c).sqrt(), nan)


def row_values(vec) -> dict[str, float]:
    """A host copy of :func:`sys_vector` as row columns."""
    return {k: float(v) for k, v in zip(COLUMNS, list(vec))}


# -- the calibrated null -----------------------------------------------------------------------
def _load() -> dict:
    try:
        with open(NULL_PATH) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"version": NULL_VERSION, "thresholds": {}}


class Null:
    """Thresholds per (regime, family, statistic) from clean runs (``systematic.json``)."""

    def __init__(self, table: dict | None = None):
        self.table = table if table is not None else _load()

    def thresholds(self, regime: str, family: str) -> dict[str, float] | None:
        """{stat: |z| threshold} of a regime (``cpu/q4/float32``, as the tolerance policy names
        it) and family, or None when that pair was never calibrated (not tested)."""
        return (self.table.get("thresholds", {}).get(regime) or {}).get(family)

    @classmethod
    def collecting(cls) -> "Null":
        """A null that judges nothing but lets every statistic be computed (for calibrating one)."""
        return cls({"collect": True})

    def n_max(self, regime: str, family: str) -> float:
        """The largest tensor (elements) the calibration saw in this regime and family (0: unknown;
        inf for :meth:`collecting`)."""
        if self.table.get("collect"):
            return math.inf
        return int((self.table.get("n_max", {}).get(regime) or {}).get(family, 0))

    def verdict(self, regime: str, family: str, row: dict) -> tuple[bool | None, float, str]:
        """(passed, score, worst statistic) of a row holding :data:`COLUMNS` and ``shape``: passed
        is None when the regime/family was never calibrated, or the tensor is larger than any it
        was calibrated on; score = the largest |z| / threshold over the statistics whose effect
        exceeds EFFECT_FLOOR (0 when none does)."""
        thr = self.thresholds(regime, family)
        if thr is None or math.prod(row.get("shape") or (math.inf,)) > self.n_max(regime, family):
            return None, float("nan"), ""
        score, worst = 0.0, ""
        for stat in STATS:
            eff, z, t = abs(row.get(_EFFECT[stat], math.nan)), abs(row.get(f"sys_z_{stat}", math.nan)), thr.get(stat)
            if t is None or not (eff > EFFECT_FLOOR) or math.isnan(z):
                continue
            if z / t > score:
                score, worst = z / t, stat
        return score <= 1.0, score, worst


def observe(observed: dict, table) -> dict:
    """Fold a clean comparison table into ``observed[regime][family][stat] = [worst |z|, samples,
    worst effect]`` per (local regime, family, statistic). The worst |z| is over the samples whose
    effect exceeds EFFECT_FLOOR, the only ones a verdict can fail (a deterministic rounding bias
    far below the floor, such as a different rsqrt, has a huge z that must not set the threshold);
    returns ``observed``."""
    if "sys_z_slope" not in table or "local_tol_regime" not in table:
        return observed
    for (regime, fam), part in table[table["sys_z_slope"].notna()].groupby(["local_tol_regime", "family"]):
        cell = observed.setdefault(regime, {}).setdefault(fam, {})
        for stat in STATS:
            z = part[f"sys_z_{stat}"].astype(float).abs()
            eff = part[_EFFECT[stat]].astype(float).abs()
            seen = z.notna() & eff.notna()
            if not seen.any():
                continue
            live = z[seen & (eff > EFFECT_FLOOR)]
            old = cell.get(stat, [0.0, 0, 0.0])
            cell[stat] = [max(old[0], float(live.max()) if len(live) else 0.0), old[1] + int(seen.sum()),
                          max(old[2], float(eff[seen].max()))]
        cell["n"] = max(cell.get("n", 0), max(math.prod(s) for s in part["shape"]))
    return observed


_EFFECT = {"slope": "sys_slope", "offset": "sys_offset", "chan": "sys_chan"}


def build_null(observed: dict, provenance: dict, previous: dict | None = None) -> dict:
    """The null table: thresholds ``max(Z_FLOOR, SAFETY x worst |z|)`` per (regime, family,
    stat). Regimes of ``previous`` not observed now (e.g. the other backend's) are kept."""
    obs = dict((previous or {}).get("observed", {}))
    obs.update(observed)
    thr = {r: {f: {s: max(Z_FLOOR, SAFETY * v[0]) for s, v in st.items() if s in STATS and math.isfinite(v[0])}
               for f, st in fams.items()} for r, fams in obs.items()}
    n_max = {r: {f: int(st.get("n", 0)) for f, st in fams.items()} for r, fams in obs.items()}
    prov = dict((previous or {}).get("provenance", {}))
    prov.update(provenance)
    return {"version": NULL_VERSION, "z_floor": Z_FLOOR, "safety": SAFETY, "effect_floor": EFFECT_FLOOR,
            "observed": obs, "thresholds": thr, "n_max": n_max, "provenance": prov}


def write_null(table: dict, path: str = NULL_PATH) -> None:
    """Write the null table atomically (a half-written file is never left)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
