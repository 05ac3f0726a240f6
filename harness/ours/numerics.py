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
both quantize activations to Q8_1 blocks of 32, but not alike (MMVQ's with the fast-math
division ggml-cuda is built with: :mod:`harness.ours.cuda_q8_1`), and some weight types apply their
offset to the block sum of the *unquantized* activations: :class:`CudaQuantMatMul` mirrors each.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

from harness.nvrtc import compile_kernel, launch
from harness.ours import cuda_q8_1

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
    """The activation rounding llama.cpp applies before a matmul with this weight type. On CUDA this
    is the rounding alone, of the kernel the token count picks (Q8_1 as MMVQ or MMQ do it; F16
    operands for F16 weights); our model mirrors the whole CUDA kernel instead (:func:`cuda_matmul`)."""
    t = (weight_type or "F32").upper()
    if backend == "cuda":
        return _cuda_rounder(t)
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


def _half(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def q8_1_mmvq(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_q8_1: per 32, d = amax / 127, q = roundf(x / d), (d, sum of x) stored as half.
    Returns the dequantized activations q * d (..., K) and the block sums (..., K / 32). On a GPU,
    ggml's own arithmetic, fast-math division included (:mod:`harness.ours.cuda_q8_1`), where it
    compiles; this IEEE emulation elsewhere."""
    kernel = cuda_q8_1.quantize(x)
    if kernel is not None:
        q, d, s = kernel
        return (q.reshape(*x.shape[:-1], -1, 32) * _half(d)[..., None]).reshape(x.shape), _half(s)
    b = x.float().reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = b.abs().amax(-1, keepdim=True)
    d = amax / 127.0
    q = torch.where(amax > 0, cuda_q8_1.roundf(b / torch.where(amax > 0, d, torch.ones_like(d))), torch.zeros_like(b))
    return (q * _half(d)).reshape(x.shape), _half(b.sum(-1))


def q8_1_mmq(x: torch.Tensor, ds4: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_mmq_q8_1: per 32, d_inv = 127 / amax, q = roundf(x * d_inv), d = 1 / d_inv; the DS4
    layout stores (d, sum of x) as half, D4 a float d (and no sum). On a GPU, ggml's kernel compiled
    with its fast math (:mod:`harness.ours.cuda_q8_1`) where it compiles."""
    kernel = cuda_q8_1.quantize(x, mmq=True)
    if kernel is not None:
        q, d, s = kernel
        return (q.reshape(*x.shape[:-1], -1, 32) * (_half(d) if ds4 else d)[..., None]).reshape(x.shape), _half(s)
    b = x.float().reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = b.abs().amax(-1, keepdim=True)
    d_inv = torch.full_like(amax, 127.0) / torch.where(amax > 0, amax, torch.ones_like(amax))  # not 127 * (1/amax)
    q = torch.where(amax > 0, cuda_q8_1.roundf(b * d_inv), torch.zeros_like(b))
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
        small, xq, s = q8_1_cuda(x, self.qtype)
        if self.parts is not None and self.qtype in (_MMVQ_SUM if small else _MMQ_SUM):
            q, scale, offset = self.parts()
            if not small:                                  # MMQ keeps d * sc and dmin * m as half
                scale, offset = _half(scale), _half(offset)
            return (xq @ (scale.repeat_interleave(32, -1) * q).T - s @ offset.T).to(x.dtype)
        return xq.to(x.dtype) @ w.T


def q8_1_cuda(x: torch.Tensor, qtype: str) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """The Q8_1 rounding of the kernel the token count picks for ``qtype``: (MMVQ?, q * d, sums)."""
    small = x.reshape(-1, x.shape[-1]).shape[0] <= MMVQ_MAX_TOKENS
    return (small, *(q8_1_mmvq(x) if small else q8_1_mmq(x, qtype in _MMQ_DS4)))


def _cuda_rounder(t: str) -> Rounder | None:
    if t == "F16":
        return lambda x: x.half().to(x.dtype)
    if t not in _Q8_0 and t not in _Q8_K:
        return None

    def rounder(x: torch.Tensor) -> torch.Tensor:
        return x if x.shape[-1] % 32 else q8_1_cuda(x, t)[1].to(x.dtype)
    return rounder


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
                keep: bool = True) -> "CudaQuantMatMul | CudaHalfMatMul | None":
    """The CUDA arithmetic of a quantized or F16 weight matmul (None for F32/BF16); ``raw()`` gives the
    weight's GGUF bytes (uint8, on the model's device), read only for the types whose offset
    term is mirrored. ``keep``: hold their codes after the first use (else decode them per call)."""
    from gguf import GGMLQuantizationType as Q
    from harness.gguf.dequant import OFFSET_TYPES, offset_parts
    t = (weight_type or "F32").upper()
    if t == "F16":
        return CudaHalfMatMul()
    if t not in _Q8_0 and t not in _Q8_K:
        return None
    parts = None
    if t in {q.name for q in OFFSET_TYPES}:
        def parts():
            return offset_parts(raw(), Q[t], shape)
        parts = _KeptParts(parts) if keep else parts
    return CudaQuantMatMul(t, parts)


# --- F16 weights on CUDA (ggml-cuda mmvf.cu, mmf.cu, ggml_cuda_mul_mat_cublas), Hopper --------

MMF_MAX_TOKENS = 16       # mmf.cu ggml_cuda_should_use_mmf: tensor-core mul_mat_f up to 16 tokens


def _mmvf_block(ncols: int, warp: int = 32) -> int:
    """launch_mul_mat_vec_f_cuda's block size: the fewest iterations over the ncols / 2 half2 columns."""
    best, niter_best = warp, (ncols + 2 * warp - 1) // (2 * warp)
    for bs in range(2 * warp, 257, warp):
        niter = (ncols + 2 * bs - 1) // (2 * bs)
        if niter < niter_best:
            best, niter_best = bs, niter
    return best


def _butterfly(v: torch.Tensor) -> torch.Tensor:
    """warp_reduce_sum over the last dim (32 lanes, xor 16, 8, 4, 2, 1): lane 0's value. Lane 0
    after xor 1 needs lanes 0-1 after xor 2, ..., lanes 0-15 after xor 16, and lane i < off adds
    lane i + off: the same sums without the other lanes (5 additions, no gather)."""
    for off in (16, 8, 4, 2, 1):
        v = v[..., :off] + v[..., off:2 * off]
    return v[..., 0]


_EXP_BITS = 0x7FF0000000000000


def to_half_once(v: torch.Tensor) -> torch.Tensor:
    """float64 -> the nearest float16 value (ties to even), rounded once (``.half()`` on a float64
    goes through float32: twice), as float64. With ulp the float16 spacing at |v| (2^-10 of v's
    power of two; 2^-24 for subnormals), adding and subtracting c = 1.5 x 2^52 x ulp rounds v to a
    multiple of ulp in float64's own round-to-nearest-even (c + v stays in c's binade, whose
    spacing is ulp; c is an even multiple of it)."""
    top = (v.view(torch.int64) & _EXP_BITS).view(torch.float64)           # 2^floor(log2|v|); 0 at 0
    c = (top * (1.5 * 2.0 ** 42)).clamp_min(1.5 * 2.0 ** 28)              # 1.5 x 2^52 x ulp
    return (v + c) - c


def mmvf_half_emulated(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """mul_mat_vec_f<half, half> (one token, default precision): thread j accumulates, in half with
    one rounding per step (fma), the products of the half2 columns j, j + block, ...; then float
    sums: low + high, a butterfly per warp, a butterfly over the warps. x (T, K) -> (T, R).
    Any device (tens of small kernels per call); :func:`mmvf_half` runs it as one CUDA kernel."""
    rows, ncols = w.shape
    bs = _mmvf_block(ncols)
    wh = w.half().reshape(rows, -1, 2).double()                           # (R, K/2, 2)
    out = []
    for xt in x.reshape(-1, ncols):
        xh = xt.half().reshape(-1, 2).double()                            # make_half2 of the floats
        acc = torch.zeros(rows, bs, 2, dtype=torch.float64, device=w.device)
        for start in range(0, ncols // 2, bs):                            # exact in float64, one rounding
            n = min(bs, ncols // 2 - start)
            acc[:, :n] = to_half_once(acc[:, :n] + wh[:, start:start + n] * xh[start:start + n])
        sumf = (acc[..., 0].float() + acc[..., 1].float())                # (R, bs)
        per_warp = _butterfly(sumf.reshape(rows, bs // 32, 32))           # (R, warps)
        if bs == 32:
            out.append(per_warp[:, 0])
            continue
        buf = torch.zeros(rows, 32, device=w.device)
        buf[:, :bs // 32] = per_warp
        out.append(_butterfly(buf))
    return torch.stack(out).reshape(*x.shape[:-1], rows)


# The same arithmetic as one kernel (NVRTC through torch.cuda._compile_kernel), in PTX so that no
# header is needed: per (token, row) block, thread j fma's half2 products in half2 (fma.rn.f16x2),
# then float low + high and the two butterflies (lane i adds lane i ^ off: lane 0 gets the same
# sums as _butterfly). Used only after it gave the emulation's bits on a self-check (_MMVF).
_MMVF_SRC = r"""
extern "C" __global__ void mmvf_half(const unsigned int* __restrict__ w, const float* __restrict__ x,
                                     float* __restrict__ y, int ncols2, int rows, int tokens) {
    const int row = blockIdx.x, tok = blockIdx.y, b = blockIdx.z, tid = threadIdx.x, bs = blockDim.x;
    const unsigned int* wr = w + ((size_t)b * rows + row) * ncols2;
    const float* xr = x + ((size_t)b * tokens + tok) * 2 * ncols2;
    unsigned int acc = 0u;
    for (int c = tid; c < ncols2; c += bs) {
        unsigned short lo, hi;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(lo) : "f"(xr[2 * c]));
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hi) : "f"(xr[2 * c + 1]));
        const unsigned int xh = (unsigned int)lo | ((unsigned int)hi << 16);
        asm("fma.rn.f16x2 %0, %1, %2, %0;" : "+r"(acc) : "r"(wr[c]), "r"(xh));
    }
    float a, h;
    asm("cvt.f32.f16 %0, %1;" : "=f"(a) : "h"((unsigned short)(acc & 0xffffu)));
    asm("cvt.f32.f16 %0, %1;" : "=f"(h) : "h"((unsigned short)(acc >> 16)));
    float s = a + h;
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    float* out = y + ((size_t)b * tokens + tok) * rows + row;
    if (bs == 32) { if (tid == 0) *out = s; return; }
    __shared__ float buf[32];
    const int lane = tid & 31, warp = tid >> 5;
    if (warp == 0) buf[lane] = 0.0f;
    __syncthreads();
    if (lane == 0) buf[warp] = s;
    __syncthreads();
    if (warp > 0) return;
    s = buf[lane];
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) *out = s;
}
"""
_MMVF: dict[int, object] = {}     # CUDA device index -> the compiled kernel (None: emulate there)


def mmvf_kernel_status() -> str:
    """For a run's description: "compiled" (one kernel per one-token F16 matmul, checked against the
    emulation's bits), "unavailable" (no compiler, or the check failed: the emulation runs) or "not used"."""
    return "unavailable" if None in _MMVF.values() else "compiled" if _MMVF else "not used"


def _mmvf_launch(kernel, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (B, T, K) float32, w (B, R, K) -> (B, T, R) with the compiled kernel."""
    B, T, K = x.shape
    R = w.shape[1]
    wh = w.to(torch.float16).contiguous().view(torch.int32)                # (B, R, K/2) half2 words
    y = torch.empty(B, T, R, dtype=torch.float32, device=x.device)
    launch(kernel, (R, T, B), (_mmvf_block(K), 1, 1), [wh, x.contiguous(), y, K // 2, R, T])
    return y


def _mmvf_compiled(device: torch.device):
    """The kernel for ``device`` (a module is per device), compiled and self-checked on first use;
    None where it cannot be."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _MMVF:
        _MMVF[idx] = None
        try:
            kernel = compile_kernel(_MMVF_SRC, "mmvf_half")
            g = torch.Generator(device=device).manual_seed(0)
            for R, K in ((96, 64), (200, 896), (64, 4864), (8, 18944)):     # 32 to 256 threads, 1 to 37 steps
                x = torch.randn(1, 2, K, generator=g, device=device) * 4
                w = torch.randn(1, R, K, generator=g, device=device)
                if not torch.equal(_mmvf_launch(kernel, x, w)[0], mmvf_half_emulated(x[0], w[0])):
                    raise ArithmeticError("compiled mmvf differs from the emulation")
            _MMVF[idx] = kernel
        except Exception:  # noqa: BLE001 - no NVRTC, a driver refusal, a mismatch: emulate instead
            pass
    return _MMVF[idx]


def _mmvf_emulated_batched(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if w.dim() == 2:
        return mmvf_half_emulated(x, w)
    return torch.stack([mmvf_half_emulated(xb, wb) for xb, wb in zip(x, w)])


def mmvf_half(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """:func:`mmvf_half_emulated`'s result, x (..., T, K) @ w (..., R, K)^T -> (..., T, R) (leading
    dims batched), by one compiled kernel on CUDA with a float32 x, else by the emulation."""
    if not (x.is_cuda and x.dtype == torch.float32):
        return _mmvf_emulated_batched(x, w)
    here = x.device.index is None or x.device.index == torch.cuda.current_device()
    with contextlib.nullcontext() if here else torch.cuda.device(x.device):   # compile, load, launch on x's device
        kernel = _mmvf_compiled(x.device)
        if kernel is None:
            return _mmvf_emulated_batched(x, w)
        lead = w.shape[:-2]
        y = _mmvf_launch(kernel, x.reshape(-1, *x.shape[-2:]) if lead else x.reshape(1, -1, x.shape[-1]),
                         w.reshape(-1, *w.shape[-2:]))
    return y.reshape(*lead, *x.shape[-2:-1], w.shape[-2]) if lead else y.reshape(*x.shape[:-1], w.shape[0])


def cublas_f16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """cublasGemmEx with F16 operands, CUBLAS_COMPUTE_16F and an F16 result (ggml_cuda_mul_mat_cublas
    for F16 weights): PyTorch's half GEMM with fp16 accumulation calls the same. Where PyTorch
    cannot (a CPU, or no allow_fp16_accumulation) the result is only rounded to F16 like it."""
    m, wt = torch.backends.cuda.matmul, w.transpose(-1, -2)                # leading dims batched
    if x.device.type != "cuda" or not hasattr(m, "allow_fp16_accumulation"):
        return (x.half().float() @ wt.float()).half().float()
    saved, m.allow_fp16_accumulation = m.allow_fp16_accumulation, True
    try:
        return (x.half() @ wt.half()).float()
    finally:
        m.allow_fp16_accumulation = saved


class CudaHalfMatMul:
    """x @ W^T as llama.cpp's CUDA build computes it for an F16 weight (Hopper, ggml_cuda_mul_mat):
    one token mul_mat_vec_f (:func:`mmvf_half`); up to 16 tokens, where the shape allows, the
    tensor-core mul_mat_f (F16 operands, float accumulation); otherwise cuBLAS (:func:`cublas_f16`)."""

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        rows, ncols = w.shape
        tokens = x.reshape(-1, ncols).shape[0]
        if tokens == 1 and ncols % 2 == 0:
            y = mmvf_half(x, w)
        elif tokens <= MMF_MAX_TOKENS and ncols % 64 == 0 and rows % 32 == 0:
            y = x.half().float() @ w.T
        else:
            y = cublas_f16(x, w)
        return y.to(x.dtype)


KV_CELL_PAD = 256            # llama.cpp's n_kv: the used cells rounded up to 256 (unused ones hold 0)
MMVF_F16_MAX_ROWS = 512      # mmvf.cu ggml_cuda_should_use_mmvf, F16 on Ampere and later: one token,
                             # and src0 has at most 512 rows or a single channel


def kv_cells(P: int) -> int:
    """llama.cpp's n_kv for ``P`` used cells: rounded up to KV_CELL_PAD."""
    return -(-P // KV_CELL_PAD) * KV_CELL_PAD


def cuda_one_token_vec(rows: int, channels: int) -> bool:
    """Whether ggml-cuda takes mul_mat_vec_f for a one-token product with an F16 src0 of ``rows``
    rows in ``channels`` channels (kq: n_kv rows per KV head; kqv: head_dim rows per KV head).
    Otherwise the F16 tensor-core or cuBLAS path runs, which rounds the float operand to F16."""
    return rows <= MMVF_F16_MAX_ROWS or channels == 1


def cuda_kqv(w: torch.Tensor, v: torch.Tensor, group: int) -> torch.Tensor:
    """kqv = attention weights w (H, T, P) @ the cached V (P, Hkv, Dh), F16 values -> (T, H, Dh), as
    ggml-cuda's mul_mat(v, kq) computes it over the F16 cache's n_kv cells (measured on the H100 with
    benchmarks/cuda_numerics.py, bit for bit at 1 and 64 tokens): one token, mul_mat_vec_f per head
    (:func:`mmvf_half`, whose block size follows n_kv; where :func:`cuda_one_token_vec` allows); up
    to 16 tokens, F16 operands with float sums (mul_mat_f); more, cuBLAS with F16 compute (:func:`cublas_f16`)."""
    H, T, P = w.shape
    vt = v.repeat_interleave(group, dim=1).permute(1, 2, 0)              # (H, Dh, P)
    if T == 1 and cuda_one_token_vec(v.shape[-1], v.shape[1]):
        pad = kv_cells(P) - P
        y = mmvf_half(F.pad(w, (0, pad)), F.pad(vt, (0, pad)))          # (H, 1, Dh)
    elif T <= MMF_MAX_TOKENS:
        y = w.half().to(w.dtype) @ vt.half().to(w.dtype).transpose(1, 2)  # (H, T, Dh)
    else:
        y = cublas_f16(w, vt).to(w.dtype)
    return y.permute(1, 0, 2)                                            # (T, H, Dh)


# ggml-cuda is built with -use_fast_math (ggml/src/ggml-cuda/CMakeLists.txt), so rope.cu's
# ``pos*powf(theta_scale, i/2.0f)`` and ``cosf``/``sinf`` are the approximate __powf (MUFU ex2/lg2)
# and __cosf/__sinf (an x/2pi multiply rounded toward zero, then MUFU), whose errors grow with the
# angle (about 1e-3 rad at position 32k by their documented bounds). The same intrinsics, compiled
# at run time (NVRTC, torch's jiterator) on the same GPU: q_rope/k_rope then agree with llama.cpp's
# to within 1e-6 at 1,900 positions, over 10x closer than accurate float32 (tests/test_gpu.py).
_FAST_ROPE = {}
_FAST_ROPE_CODE = {
    "cos": "template <typename T> T rope_cos(T p, T s, T j) { return __cosf(p * __powf(s, j)); }",
    "sin": "template <typename T> T rope_sin(T p, T s, T j) { return __sinf(p * __powf(s, j)); }",
}


def fast_rope_status() -> str:
    """For a run's description: "compiled" (the fast-math RoPE tables are in use), "unavailable"
    (compiling them failed: accurate float32 instead) or "not used" (no CUDA mirror ran yet)."""
    return "unavailable" if _FAST_ROPE.get("broken") else "compiled" if _FAST_ROPE else "not used"


def fast_rope_cos_sin(pos: torch.Tensor, scale: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cos and sin (T, half), float32, of ggml-cuda's RoPE angles pos * theta_scale^j with its
    fast-math intrinsics, on ``pos``'s CUDA device; None where that cannot be compiled (no CUDA,
    no NVRTC): the caller then uses accurate float32."""
    if not pos.is_cuda or _FAST_ROPE.get("broken"):
        return None
    try:
        if not _FAST_ROPE:
            from torch.cuda.jiterator import _create_jit_fn
            _FAST_ROPE.update({k: _create_jit_fn(code) for k, code in _FAST_ROPE_CODE.items()})
        p = pos.to(torch.float32)[:, None]                                        # (T, 1)
        j = torch.arange(half, dtype=torch.float32, device=pos.device)[None, :]   # (1, half)
        s = scale.to(device=pos.device, dtype=torch.float32).reshape(1, 1)
        return _FAST_ROPE["cos"](p, s, j), _FAST_ROPE["sin"](p, s, j)
    except Exception:  # noqa: BLE001 - any compile/launch failure: fall back, never fail the run
        _FAST_ROPE.clear()
        _FAST_ROPE["broken"] = True
        return None
