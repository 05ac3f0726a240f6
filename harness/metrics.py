"""Error metrics between two tensors of one site, and logit-specific checks. Pure functions."""
from __future__ import annotations

from dataclasses import dataclass

import torch


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


def pair_stats(ours: torch.Tensor, ref: torch.Tensor) -> PairStats:
    """Metrics of ``ours`` against ``ref`` (same shape); computed in float64 on their device."""
    if tuple(ours.shape) != tuple(ref.shape):
        raise ValueError(f"shape mismatch: ours {tuple(ours.shape)} vs reference {tuple(ref.shape)}")
    a, b = ours.detach().double(), ref.detach().to(ours.device).double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (a == b)        # masked -inf on both sides agrees
    bad = ~(torch.isfinite(a) & torch.isfinite(b)) & ~both_inf
    a, b = torch.where(both_inf, 0.0, a), torch.where(both_inf, 0.0, b)
    diff = torch.where(bad, torch.inf, a - b).abs()
    nonfinite = int(bad.sum())
    flat = int(diff.flatten().argmax()) if diff.numel() else 0
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.numel() else ()
    fa, fb = torch.where(bad, 0.0, a), torch.where(bad, 0.0, b)
    d = fa - fb
    nb, na = float(fb.norm()), float(fa.norm())
    rms = nb / max(b.numel(), 1) ** 0.5
    tiny = 1e-30
    rel = float(d.norm()) / max(nb, tiny) if nb > tiny or float(d.norm()) > 0 else 0.0
    cos = float((fa * fb).sum()) / max(na * nb, tiny) if na > tiny and nb > tiny else float(na == nb)
    max_abs = float(diff.max()) if diff.numel() else 0.0
    if nonfinite:
        rel, max_abs = float("inf"), float("inf")
    return PairStats(
        max_abs=max_abs, rel_l2=rel, max_norm=max_abs / max(rms, tiny) if max_abs else 0.0, cosine=cos,
        ref_rms=rms, worst_index=idx,
        ours_value=float(ours.reshape(-1)[flat]) if ours.numel() else 0.0,
        ref_value=float(ref.reshape(-1)[flat]) if ref.numel() else 0.0, nonfinite=nonfinite)


def _robust_z(row: torch.Tensor) -> torch.Tensor:
    med = row.median()
    mad = (row - med).abs().median() * 1.4826
    return (row - med) / max(float(mad), 1e-12)


def logit_stats(ours: torch.Tensor, ref: torch.Tensor, k: int = 10, spike_z: float = 8.0) -> tuple[list, list]:
    """Per token row of (T, V) logits: top-1 agreement, top-k overlap, KL(ref || ours); and the
    tokens whose logit is an outlier (robust z-score above ``spike_z``) on one side and
    unremarkable (below half of it) on the other."""
    a, b = ours.detach().double().cpu(), ref.detach().double().cpu()
    rows, spikes = [], []
    k = min(k, a.shape[-1])
    for t in range(a.shape[0]):
        ra, rb = a[t], b[t]
        fin = bool(torch.isfinite(ra).all() and torch.isfinite(rb).all())
        pa, pb = torch.log_softmax(ra, -1), torch.log_softmax(rb, -1)
        kl = float((pb.exp() * (pb - pa)).sum()) if fin else float("inf")
        ta, tb = set(ra.topk(k).indices.tolist()), set(rb.topk(k).indices.tolist())
        rows.append(dict(row=t, top1_ours=int(ra.argmax()), top1_ref=int(rb.argmax()),
                         top1_agree=int(ra.argmax()) == int(rb.argmax()), topk_overlap=len(ta & tb) / k, kl=kl))
        za, zb = _robust_z(ra).abs(), _robust_z(rb).abs()
        one_sided = ((za > spike_z) & (zb < spike_z / 2)) | ((zb > spike_z) & (za < spike_z / 2))
        for tok in torch.nonzero(one_sided).flatten().tolist():
            side = "ours" if za[tok] > spike_z else "reference"
            spikes.append(dict(row=t, token=tok, ours=float(ra[tok]), ref=float(rb[tok]), side=side,
                               z=float(max(za[tok], zb[tok]))))
    spikes.sort(key=lambda s: -s["z"])
    return rows, spikes
