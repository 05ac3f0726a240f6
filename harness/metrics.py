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


def _robust_z(x: torch.Tensor) -> torch.Tensor:
    """Per-row robust z-score: (x - median) / (1.4826 * MAD)."""
    med = x.median(dim=-1, keepdim=True).values
    mad = (x - med).abs().median(dim=-1, keepdim=True).values * 1.4826
    return (x - med) / mad.clamp_min(1e-12)


def logit_stats(ours: torch.Tensor, ref: torch.Tensor, k: int = 10, spike_z: float = 8.0) -> tuple[list, list]:
    """Per token row of (T, V) logits: top-1 agreement, top-k overlap, KL(ref || ours); and the
    tokens whose logit is an outlier (robust z-score above ``spike_z``) on one side and
    unremarkable (below half of it) on the other. Vectorized over rows, on the tensors' device."""
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
    spikes.sort(key=lambda s: -s["z"])
    return rows, spikes
