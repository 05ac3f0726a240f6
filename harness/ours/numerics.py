"""llama.cpp CPU numerics that the PyTorch model can mirror, so clean runs agree almost exactly.

llama.cpp's CPU matmul never multiplies a quantized or half-precision weight by float32
activations: it first converts the activations to the weight type's ``vec_dot_type``
(ggml-cpu type traits): F16 weights -> activations rounded to F16; Q8_0/Q4_0/Q5_0 -> Q8_0
blocks of 32 with an F16 scale; Q4_1/Q5_1 -> Q8_1 (same values as Q8_0); K-quants (Q2_K..Q6_K)
-> Q8_K blocks of 256 with an F32 scale. Rounding our activations the same way removes the
largest source of noise (1-20% relative on quantized matmuls), so the tolerance policy can stay
tight enough to catch subtle bugs. ``act_rounder`` gives that rounding per weight type; None
means float32 activations (F32 weights, or a backend whose numerics are not mirrored).

On CUDA, quantized weights take ggml-cuda's MMVQ kernels up to 8 tokens and MMQ above (Hopper);
both quantize activations to Q8_1 blocks of 32, but not alike, and some weight types apply their
offset to the block sum of the *unquantized* activations: :class:`CudaQuantMatMul` mirrors each.
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
    iscale = torch.where(mx != 0, torch.full_like(mx, -127.0) / mx, torch.zeros_like(mx))  # a division, as ggml
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


# --- llama.cpp CUDA (ggml-cuda quantize.cu, vecdotq.cuh, mmq*.cuh), Hopper ----------------------

MMVQ_MAX_TOKENS = 8       # mmvq.cuh MMVQ_MAX_BATCH_SIZE: up to this many tokens MMVQ, above it MMQ
# MMQ's Q8_1 layout per weight type (mmq.cuh mmq_get_q8_1_ds_layout): DS4 blocks hold (d, sum) as
# half2, D4 blocks a float d; Q2_K's D2S6 (a scale per 64) is not mirrored (treated as D4)
_MMQ_DS4 = {"Q4_0", "Q4_1", "Q5_1", "Q4_K", "Q5_K", "IQ1_S"}
# types whose CUDA dot products take their offset times the block sum of the unquantized activations:
# MMVQ (vec_dot_q4_0/q5_0_q8_1: d * (sumi * d8 - 8|16 * s8)) and MMQ (Q4_K/Q5_K: dm.y * ds.y)
_MMVQ_SUM = {"Q4_0", "Q5_0"}
_MMQ_SUM = {"Q4_K", "Q5_K"}


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf: halves away from zero (torch.round takes them to even)."""
    r = torch.round(v)
    t = torch.trunc(v)
    return torch.where((v - t).abs() == 0.5, t + torch.sign(v), r)


def _half(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def q8_1_mmvq(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_q8_1: per 32, d = amax / 127, q = roundf(x / d), (d, sum of x) stored as half.
    Returns the dequantized activations q * d (..., K) and the block sums (..., K / 32)."""
    b = x.float().reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = b.abs().amax(-1, keepdim=True)
    d = amax / 127.0
    q = torch.where(amax > 0, _roundf(b / torch.where(amax > 0, d, torch.ones_like(d))), torch.zeros_like(b))
    return (q * _half(d)).reshape(x.shape), _half(b.sum(-1))


def q8_1_mmq(x: torch.Tensor, ds4: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_mmq_q8_1: per 32, d_inv = 127 / amax, q = roundf(x * d_inv), d = 1 / d_inv; the DS4
    layout stores (d, sum of x) as half, D4 a float d (and no sum)."""
    b = x.float().reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = b.abs().amax(-1, keepdim=True)
    d_inv = torch.full_like(amax, 127.0) / torch.where(amax > 0, amax, torch.ones_like(amax))  # not 127 * (1/amax)
    q = torch.where(amax > 0, _roundf(b * d_inv), torch.zeros_like(b))
    d = torch.where(amax > 0, 1.0 / d_inv, torch.zeros_like(d_inv))
    return (q * (_half(d) if ds4 else d)).reshape(x.shape), _half(b.sum(-1))


class CudaQuantMatMul:
    """x @ W^T as llama.cpp's CUDA build computes it for a quantized weight of type ``qtype``:
    activations rounded as the kernel the token count selects (MMVQ or MMQ) rounds them, and, for
    the types that do, the weight's offset applied to half-precision sums of the unquantized
    activations, with the scales that MMQ keeps as half (Q4_K/Q5_K: d * sc and dmin * m).
    ``parts()`` gives harness.gguf.dequant.offset_parts of the weight (types in OFFSET_TYPES)."""

    def __init__(self, qtype: str, parts: Callable[[], tuple] | None = None):
        self.qtype, self.parts = qtype.upper(), parts

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 32:
            return x @ w.T
        small = x.reshape(-1, x.shape[-1]).shape[0] <= MMVQ_MAX_TOKENS
        if small:
            xq, s = q8_1_mmvq(x)
            if self.qtype in _MMVQ_SUM and self.parts is not None:
                q, scale, offset = self.parts()
                return (xq @ (scale.repeat_interleave(32, -1) * q).T - s @ offset.T).to(x.dtype)
        else:
            xq, s = q8_1_mmq(x, self.qtype in _MMQ_DS4)
            if self.qtype in _MMQ_SUM and self.parts is not None:
                q, scale, offset = self.parts()
                return (xq @ (_half(scale).repeat_interleave(32, -1) * q).T - s @ _half(offset).T).to(x.dtype)
        return xq.to(x.dtype) @ w.T


class _KeptParts:
    """offset_parts computed on first use and kept (codes as uint8: a quarter of the float size)."""

    def __init__(self, make: Callable[[], tuple]):
        self.make, self.kept = make, None

    def __call__(self) -> tuple:
        if self.kept is None:
            q, scale, offset = self.make()
            self.kept = (q.to(torch.uint8), scale, offset)
        q, scale, offset = self.kept
        return q.float(), scale, offset


def cuda_matmul(weight_type: str | None, raw: Callable[[], torch.Tensor], shape: tuple[int, ...],
                keep: bool = True) -> CudaQuantMatMul | None:
    """The CUDA arithmetic of a quantized weight matmul (None for float weights); ``raw()`` gives the
    weight's GGUF bytes (uint8, on the model's device), read only for the types whose offset
    term is mirrored. ``keep``: hold their codes after the first use (else decode them per call)."""
    from gguf import GGMLQuantizationType as Q
    from harness.gguf.dequant import OFFSET_TYPES, offset_parts
    t = (weight_type or "F32").upper()
    if t not in _Q8_0 and t not in _Q8_K:
        return None
    parts = None
    if t in {q.name for q in OFFSET_TYPES}:
        def parts():
            return offset_parts(raw(), Q[t], shape)
        parts = _KeptParts(parts) if keep else parts
    return CudaQuantMatMul(t, parts)
