"""ggml-cuda's ``quantize_q8_1`` (quantize.cu) as llama.cpp builds it: with ``-use_fast_math``.

Under fast math ``roundf(xi / d)`` divides approximately (``div.approx.ftz.f32``: xi times the
hardware's reciprocal of d, up to 2 ulp from the IEEE quotient). Where xi / d lies within an ulp
or two of a half-integer, llama.cpp's code is one step away from an IEEE emulation's. Rare per
element, but one such element moves every output of a one-token matmul along one weight column:
on the H100, the 32B-shaped Q4_K_M file's blk.6 ffn_gate and ffn_up at decode step 1 had x / d =
51.499996 at element 1,791 (IEEE: q = 51, llama.cpp: 52), which alone gave ours = (1 - 1.43e-5) x
llama.cpp at z = -12.1 over 27,648 outputs: a false systematic alarm on a clean file.

The same holds for MMQ's ``quantize_mmq_q8_1`` (``d_inv = 127 / amax``, ``roundf(x * d_inv)``):
README's seventh-session rows at exact ties that neither a true division nor reciprocal-then-
multiply reproduced. Only the same instructions on the same GPU give the same bits, so the kernels
below are ggml's arithmetic compiled at first use by NVRTC with ``--use_fast_math``, and used only after a
self-check against the IEEE emulation (:func:`harness.ours.numerics.q8_1_mmvq`'s): the same block
scales, and the same codes except one step at near-ties. Without NVRTC the emulation runs and
:func:`status` says so."""
from __future__ import annotations

import torch

from harness.nvrtc import compile_kernel, launch

# quantize.cu quantize_q8_1, one element per thread, one 32-element block per warp; the outputs are
# the codes, d (amax / 127, as a float: ggml stores it as half) and the block sum (warp_reduce_sum).
_SRC = r"""
extern "C" __global__ void quantize_q8_1(const float* __restrict__ x, signed char* __restrict__ q,
                                         float* __restrict__ d_out, float* __restrict__ s_out, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const float xi = i < n ? x[i] : 0.0f;
    float amax = fabsf(xi);
    float sum = xi;
    for (int off = 16; off > 0; off >>= 1) {
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off, 32));
        sum += __shfl_xor_sync(0xffffffffu, sum, off, 32);
    }
    const float d = amax / 127.0f;
    const signed char qi = amax == 0.0f ? 0 : roundf(xi / d);
    if (i >= n) return;
    q[i] = qi;
    if ((i & 31) == 0) { d_out[i >> 5] = d; s_out[i >> 5] = sum; }
}
"""
# quantize.cu quantize_mmq_q8_1 (DS4/D4 layouts: one scale per 32), four elements per thread as ggml
# loads them: d_inv = 127 / amax, q = roundf(x * d_inv), d = 1 / d_inv, the sum over 4 then 8 lanes.
_SRC_MMQ = r"""
extern "C" __global__ void quantize_mmq_q8_1(const float* __restrict__ x, signed char* __restrict__ q,
                                             float* __restrict__ d_out, float* __restrict__ s_out, long long n) {
    const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4;
    const float4 xi = i0 < n ? *(const float4*)(x + i0) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float amax = fabsf(xi.x);
    amax = fmaxf(amax, fabsf(xi.y));
    amax = fmaxf(amax, fabsf(xi.z));
    amax = fmaxf(amax, fabsf(xi.w));
    for (int off = 4; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off, 32));
    float sum = xi.x + xi.y + xi.z + xi.w;
    for (int off = 4; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off, 32);
    const float d_inv = 127.0f / amax;
    if (i0 >= n) return;
    q[i0] = roundf(xi.x * d_inv);
    q[i0 + 1] = roundf(xi.y * d_inv);
    q[i0 + 2] = roundf(xi.z * d_inv);
    q[i0 + 3] = roundf(xi.w * d_inv);
    if ((i0 & 31) == 0) { d_out[i0 >> 5] = 1.0f / d_inv; s_out[i0 >> 5] = sum; }
}
"""
_KERNELS: dict[tuple[int, bool], object] = {}  # (CUDA device index, MMQ?) -> the kernel (None: emulate)
_BLOCK = 256


def roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf: halves away from zero (torch.round takes them to even)."""
    r = torch.round(v)
    t = torch.trunc(v)
    return torch.where((v - t).abs() == 0.5, t + torch.sign(v), r)


def status() -> str:
    """For a run's description: "compiled" (checked), "unavailable" (emulated) or "not used"."""
    return "unavailable" if None in _KERNELS.values() else "compiled" if _KERNELS else "not used"


def _launch(kernel, x: torch.Tensor, mmq: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    flat = x.float().contiguous().reshape(-1)
    if mmq and flat.data_ptr() % 16:
        flat = flat.clone()                      # the MMQ kernel loads float4s (16-byte aligned)
    n = flat.numel()
    q = torch.empty(n, dtype=torch.int8, device=x.device)
    d = torch.empty(n // 32, dtype=torch.float32, device=x.device)
    s = torch.empty_like(d)
    threads = n // 4 if mmq else n
    launch(kernel, ((threads + _BLOCK - 1) // _BLOCK, 1, 1), (_BLOCK, 1, 1), [flat, q, d, s, n])
    return q, d, s


def agrees_with_ieee(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether codes ``q`` and scales ``d`` of ``x`` (flat, a multiple of 32) are the IEEE
    quantization's (d = amax / 127, q = x / d rounded half away from zero) up to what approximate
    division may change: d within 4 ulp, and a code one step off only where x / d is within 1e-5
    (relative) of a half-integer."""
    b = x.float().reshape(-1, 32)
    d_ieee = b.abs().amax(-1) / 127.0
    if not torch.allclose(d, d_ieee, rtol=5e-7, atol=0.0):
        return False
    v = b / torch.where(d_ieee > 0, d_ieee, torch.ones_like(d_ieee))[:, None]
    ieee = torch.where(d_ieee[:, None] > 0, roundf(v), torch.zeros_like(v))
    off = (q.float().reshape(-1, 32) - ieee).abs()
    near_tie = ((v.abs() - torch.trunc(v.abs())) - 0.5).abs() <= 1e-5 * v.abs().clamp_min(1.0)
    return bool((off <= 1).all() and (off[~near_tie] == 0).all())


def _compiled(device: torch.device, mmq: bool):
    key = (device.index if device.index is not None else torch.cuda.current_device(), mmq)
    if key not in _KERNELS:
        _KERNELS[key] = None
        try:
            name = "quantize_mmq_q8_1" if mmq else "quantize_q8_1"
            kernel = compile_kernel(_SRC_MMQ if mmq else _SRC, name, ["--use_fast_math"])
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(64, 4096, generator=g, device=device) * 3
            x[0, :32] = 0.0                                               # a block of zeros: q = 0
            q, d, s = _launch(kernel, x, mmq)
            if not (agrees_with_ieee(x, q, d) and torch.allclose(s, x.reshape(-1, 32).sum(-1), atol=1e-4)):
                raise ArithmeticError(f"compiled {name} differs from the IEEE emulation")
            _KERNELS[key] = kernel
        except Exception:  # noqa: BLE001 - no NVRTC, a driver refusal, a mismatch: emulate instead
            pass
    return _KERNELS[key]


def quantize(x: torch.Tensor, mmq: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(codes (..., K) float32, d (..., K / 32), block sums (..., K / 32)) of a CUDA tensor ``x``
    (K a multiple of 32) as llama.cpp's MMVQ (``mmq``: MMQ) quantizer computes them; None where
    the kernel is unavailable (a CPU tensor, or no NVRTC)."""
    if not x.is_cuda or x.shape[-1] % 32:
        return None
    kernel = _compiled(x.device, mmq)
    if kernel is None:
        return None
    q, d, s = _launch(kernel, x, mmq)
    lead = x.shape[:-1]
    return q.float().reshape(x.shape), d.reshape(*lead, -1), s.reshape(*lead, -1)
