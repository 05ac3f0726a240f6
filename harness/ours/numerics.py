"""llama.cpp CPU numerics that the PyTorch model can mirror, so clean runs agree almost exactly.

llama.cpp's CPU matmul never multiplies a quantized or half-precision weight by float32
activations: it first converts the activations to the weight type's ``vec_dot_type``
(ggml-cpu type traits): F16 weights -> activations rounded to F16; Q8_0/Q4_0/Q5_0 -> Q8_0
blocks of 32 with an F16 scale; Q4_1/Q5_1 -> Q8_1 (same values as Q8_0); K-quants (Q2_K..Q6_K)
-> Q8_K blocks of 256 with an F32 scale. Rounding our activations the same way removes the
largest source of noise (1-20% relative on quantized matmuls), so the tolerance policy can stay
tight enough to catch subtle bugs. ``act_rounder`` gives that rounding per weight type; None
means float32 activations (F32 weights, or a backend whose numerics are not mirrored).
"""
from __future__ import annotations

from typing import Callable

import torch

Rounder = Callable[[torch.Tensor], torch.Tensor]
_Q8_0 = {"Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "IQ4_NL"}
_Q8_K = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
         "IQ1_S", "IQ1_M"}


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor | None:
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size) if x.shape[-1] % size == 0 else None


def round_q8_0(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q8_0: d = amax/127 (stored F16), q = round(x / d); returns q * d."""
    b = _blocks(x.float(), 32)
    if b is None:
        return x
    d = b.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(b * inv)
    return (q * d.half().float()).reshape(x.shape).to(x.dtype)


def round_q8_k(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q8_K: iscale = -127/max (max = the element of largest magnitude, signed),
    q = min(127, round(iscale * x)), d = 1/iscale (F32); returns q * d."""
    b = _blocks(x.float(), 256)
    if b is None:
        return x
    idx = b.abs().argmax(-1, keepdim=True)
    mx = torch.gather(b, -1, idx)
    iscale = torch.where(mx != 0, -127.0 / mx, torch.zeros_like(mx))
    q = torch.clamp(torch.round(iscale * b), max=127)
    d = torch.where(iscale != 0, 1.0 / iscale, torch.zeros_like(iscale))
    return (q * d).reshape(x.shape).to(x.dtype)


def act_rounder(weight_type: str | None, backend: str = "cpu") -> Rounder | None:
    """The activation rounding llama.cpp applies before a matmul with this weight type.
    On CUDA only the quantized path is mirrored: MMQ/MMVQ quantize activations to Q8_1 (blocks
    of 32, d = amax/127 stored as F16: the values of Q8_0); F16/F32 weights go through cuBLAS,
    whose internal precision is not mirrored (the calibrated tolerance absorbs it)."""
    t = (weight_type or "F32").upper()
    if backend == "cuda":
        return round_q8_0 if t in _Q8_0 or t in _Q8_K else None
    if t == "F16":
        return lambda x: x.half().to(x.dtype)
    if t == "BF16":
        return lambda x: x.bfloat16().to(x.dtype)
    if t in _Q8_0:
        return round_q8_0
    if t in _Q8_K:
        return round_q8_k
    return None
