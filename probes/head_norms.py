"""The qwen3 head-norm probe: q_norm / k_norm are RMSNorm of each head of q_proj / k_proj (over
Dh) times attn_q_norm / attn_k_norm weight; when a trace's are not, which variant a port gets
wrong explains them (whole projection, narrower chunks, not applied, unweighted, the other
norm's weight, after RoPE). One of :data:`probes.checks.CHECKS`; traces without the sites (qwen2)
have nothing to check.
"""
from __future__ import annotations

import torch

from harness.sites import input_sites
from probes.context import ProbeContext, check_record, layer_sites, rel_error, step_positions

HEAD_NORM_TOL = 1e-3          # relative error of a float32 per-head RMSNorm: ~1e-7
VARIANT_TOL = 0.05            # relative error within which a variant "reproduces" the norm's output


def _head_rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float, width: int | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of (T, nh, Dh) in float64, over ``width``-wide chunks when
    given, times ``w`` (Dh) when given."""
    x = x.double()
    y = x.reshape(x.shape[0], -1, width) if width else x
    y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).reshape(x.shape)
    return y * w.double() if w is not None else y


def _head_norm_variants(x, w, w_other, other: str, eps: float, pc: ProbeContext, pos: torch.Tensor):
    """(label, description, output) of the per-head norm's look-alikes a port gets wrong."""
    from harness.ours.model import rope_neox
    cfg = pc.cfg
    T, nh, Dh = x.shape
    yield "whole", "matches the norm over the whole projection instead of per head", \
        _head_rms_norm(x.reshape(T, 1, nh * Dh), None, eps).reshape(x.shape) * w.double()
    narrow = cfg.d_model // cfg.n_head if cfg.d_model // cfg.n_head != Dh else Dh // 2
    if Dh % narrow == 0:
        yield "chunks", (f"matches the norm over {narrow}-wide chunks of the {Dh}-wide heads (head size taken as "
                         f"{'d_model / n_head' if narrow == cfg.d_model // cfg.n_head else 'Dh / 2'})"), \
            _head_rms_norm(x, w, eps, narrow)
    yield "none", "matches its input: the norm is not applied", x.double()
    yield "unweighted", "matches the norm without its weight", _head_rms_norm(x, None, eps)
    if w_other is not None:
        yield "other weight", f"matches the norm with {other} (the other head norm's weight)", _head_rms_norm(x, w_other, eps)
    roped = rope_neox(x.double(), pos, float(cfg.rope_base))
    yield "after rope", "matches the norm applied after RoPE instead of before", _head_rms_norm(roped, w, eps)


def check_head_norms(trace, pc: ProbeContext) -> list[dict]:
    """qwen3's per-head Q/K norms: q_norm (k_norm) is RMSNorm of each head of q_proj (k_proj)
    over Dh, times attn_q_norm.weight (attn_k_norm.weight), with the file's epsilon (float64
    here; float32: ~1e-7, threshold 1e-3 relative). When not, the probe says which variant
    reproduces it within 5%: the norm over the whole projection, over narrower chunks (head
    size taken as d_model / n_head), not applied, without its weight, with the other norm's
    weight, or after RoPE. value = relative error of the correct norm. Traces without the
    sites (qwen2) have nothing to check."""
    out = []
    for key, which, other in (("q_norm", "q", "k"), ("k_norm", "k", "q")):
        for step, layer, site, y in layer_sites(trace, key):
            x = trace.tensors.get((step, input_sites(site, pc.cfg.spec.inputs)[0]))
            wname, oname = f"blk.{layer}.attn_{which}_norm.weight", f"blk.{layer}.attn_{other}_norm.weight"
            if x is None or x.shape != y.shape or wname not in pc.weights.weights:
                continue
            w = pc.weights.weights[wname].cpu()
            w_other = pc.weights.weights.get(oname)
            eps = float(pc.cfg.rms_eps)
            want = _head_rms_norm(x.cpu(), w, eps)
            v = rel_error(y.cpu(), want)
            if v <= HEAD_NORM_TOL:
                detail = f"RMSNorm of each head * {wname} reproduces it (relative error {v:.2g})"
            else:
                pos = step_positions(trace, step, x.shape[0])
                tried = [(label, desc, rel_error(y.cpu(), z)) for label, desc, z in
                         _head_norm_variants(x.cpu(), w, w_other.cpu() if w_other is not None else None,
                                             oname, eps, pc, pos)]
                best = min(tried, key=lambda r: r[2])
                if best[2] <= VARIANT_TOL:
                    detail = f"{best[1]}: relative error {best[2]:.2g} (per-head norm: {v:.3g})"
                else:
                    detail = (f"no variant of the per-head norm reproduces it (per-head {v:.2g}, "
                              + ", ".join(f"{r[0]} {r[2]:.2g}" for r in tried) + ")")
            out.append(check_record("head_norms", site, step, v, HEAD_NORM_TOL, detail))
    return out
