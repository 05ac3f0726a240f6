"""One pass over a float32 pair on a CUDA device for :func:`harness.compare.metrics.optimistic_stats`.

The torch path converts both tensors to float64 copies and reads them about ten times (the
difference, its absolute value, argmax, three norms, the dot product): ~120 bytes of memory
traffic per element, a lot for a long report's attention scores (H x T x P per layer and pass),
and a dozen operations per pair. This kernel reads each float32 element once, does the same arithmetic in float64 (the
difference of the two values, exact; its square and the squares and product summed in float64)
and writes one row of partial results per block; a second one-thread launch combines the rows
into the stats vector (no other op: a report reduces hundreds of pairs per batch). The worst element is
the first of the largest |difference|, as ``argmax`` picks. Sums differ from torch's by summation
order only (~1e-16 relative). Compiled with NVRTC on first use and checked against the torch path;
where it cannot be (no compiler, a mismatch), the torch path runs.

Like ``optimistic_stats``, the result is valid when its three norms are finite: a NaN or an
infinity in either tensor makes a sum non-finite, and the caller reduces the pair again on the
masked path.
"""
from __future__ import annotations

import torch

_SRC = r"""
// int parameters: torch's launcher passes a Python int as a C int (sizes are checked to fit)
extern "C" __global__ void pair_stats(const float* __restrict__ a, const float* __restrict__ b,
                                      int rows, int cols, int lda, int ldb, double* __restrict__ part)
{
    long long n = (long long)rows * cols;
    bool small = n < 2147483647LL;                 // 32-bit division where the indices fit
    double m = -1.0, sd = 0.0, sb = 0.0, sa = 0.0, sab = 0.0, mi = 9.0e18;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = small ? (long long)((unsigned)i / (unsigned)cols) : i / cols, c = i - r * cols;
        double x = (double)a[r * lda + c], y = (double)b[r * ldb + c];
        double d = x - y, ad = fabs(d);
        if (ad > m) { m = ad; mi = (double)i; }
        sd += d * d; sb += y * y; sa += x * x; sab += x * y;
    }
    for (int off = 16; off > 0; off >>= 1) {
        double om = __shfl_down_sync(0xffffffffu, m, off), oi = __shfl_down_sync(0xffffffffu, mi, off);
        if (om > m || (om == m && oi < mi)) { m = om; mi = oi; }
        sd += __shfl_down_sync(0xffffffffu, sd, off);
        sb += __shfl_down_sync(0xffffffffu, sb, off);
        sa += __shfl_down_sync(0xffffffffu, sa, off);
        sab += __shfl_down_sync(0xffffffffu, sab, off);
    }
    __shared__ double sh[32][6];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    if (lane == 0) { sh[warp][0] = m; sh[warp][1] = mi; sh[warp][2] = sd; sh[warp][3] = sb; sh[warp][4] = sa; sh[warp][5] = sab; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < nw; w++) {
            if (sh[w][0] > m || (sh[w][0] == m && sh[w][1] < mi)) { m = sh[w][0]; mi = sh[w][1]; }
            sd += sh[w][2]; sb += sh[w][3]; sa += sh[w][4]; sab += sh[w][5];
        }
        double* p = part + 6 * (long long)blockIdx.x;
        p[0] = m; p[1] = mi; p[2] = sd; p[3] = sb; p[4] = sa; p[5] = sab;
    }
}

// one thread: the blocks' rows combined into the stats vector (index, max |d|, three norms, dot,
// 0 non-finite, both values at the index)
extern "C" __global__ void pair_finish(const double* __restrict__ part, int blocks, const float* __restrict__ a,
                                       const float* __restrict__ b, int rows, int cols, int lda, int ldb,
                                       double* __restrict__ out)
{
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    double m = -1.0, mi = 9.0e18, sd = 0.0, sb = 0.0, sa = 0.0, sab = 0.0;
    for (int k = 0; k < blocks; k++) {
        const double* p = part + 6 * (long long)k;
        if (p[0] > m || (p[0] == m && p[1] < mi)) { m = p[0]; mi = p[1]; }
        sd += p[2]; sb += p[3]; sa += p[4]; sab += p[5];
    }
    long long n = (long long)rows * cols;
    long long i = (mi >= 0.0 && mi < (double)n) ? (long long)mi : n - 1;   // all NaN: any element
    long long r = i / cols, c = i - r * cols;
    out[0] = (double)i; out[1] = m; out[2] = sqrt(sd); out[3] = sqrt(sb); out[4] = sqrt(sa); out[5] = sab;
    out[6] = 0.0; out[7] = (double)a[r * lda + c]; out[8] = (double)b[r * ldb + c];
}
"""
_KERNELS: dict[int, object] = {}       # CUDA device index -> (stats, finish) kernels (None: the torch path)
_THREADS, _BLOCKS = 256, 1024
_INT_MAX = 2 ** 31 - 1


def as_rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(tensor, rows, cols, row stride) of ``t`` seen as rows of its last axis without a copy
    where its layout allows (the last axis contiguous, the leading ones collapsible: e.g. the
    first P cells of llama.cpp's (H, T, n_kv) scores), else of a contiguous copy."""
    if t.dim() == 0:
        t = t.reshape(1)
    cols = t.shape[-1]
    rows = t.numel() // max(cols, 1)
    ok = t.stride(-1) == 1 or cols == 1
    for i in range(t.dim() - 2):
        ok = ok and (t.shape[i] == 1 or t.stride(i) == t.stride(i + 1) * t.shape[i + 1])
    if not ok:
        t = t.contiguous()
    return t, rows, cols, (t.stride(-2) if t.dim() > 1 else cols)


def _launch(kernels, ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor | None:
    """Two launches, no other op but the allocation; None where a size does not fit a C int."""
    stats, finish = kernels
    a, rows, cols, lda = as_rows(ours)
    b, _, _, ldb = as_rows(ref)
    if max(rows, cols, lda, ldb) > _INT_MAX:
        return None
    blocks = max(1, min(_BLOCKS, -(-rows * cols // _THREADS)))
    work = torch.empty(6 * blocks + 9, dtype=torch.float64, device=a.device)
    stats(grid=(blocks, 1, 1), block=(_THREADS, 1, 1), args=[a, b, rows, cols, lda, ldb, work])
    out = work[6 * blocks:]
    finish(grid=(1, 1, 1), block=(32, 1, 1), args=[work, blocks, a, b, rows, cols, lda, ldb, out])
    return out


def available(device: torch.device) -> bool:
    """Whether the kernel runs on ``device`` (compiled and checked on first call)."""
    return device.type == "cuda" and _compiled(device) is not None


def _compiled(device: torch.device):
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _KERNELS:
        _KERNELS[idx] = None
        try:
            kernels = (torch.cuda._compile_kernel(_SRC, "pair_stats"), torch.cuda._compile_kernel(_SRC, "pair_finish"))
            if _self_check(kernels, device):
                _KERNELS[idx] = kernels
        except Exception:  # noqa: BLE001 - no NVRTC, a driver refusal: the torch path instead
            pass
    return _KERNELS[idx]


def reference_stats(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The torch path's vector (float64 copies), what the kernel must reproduce."""
    a, b = ours.detach().double().flatten(), ref.detach().double().flatten()
    d = a - b
    flat = d.abs().argmax()
    return torch.stack([flat.double(), d[flat].abs(), d.norm(), b.norm(), a.norm(), a @ b,
                        torch.zeros((), dtype=torch.float64, device=a.device), a[flat], b[flat]])


def agrees(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Same worst element (index, |difference|, both values) and sums within 1e-12 relative."""
    return bool(torch.equal(got[[0, 1, 6, 7, 8]], want[[0, 1, 6, 7, 8]])
                and torch.allclose(got[2:6], want[2:6], rtol=1e-12, atol=0))


def _self_check(kernels, device: torch.device) -> bool:
    g = torch.Generator(device=device).manual_seed(0)
    ref = torch.randn(3, 70, 1000, generator=g, device=device)
    ours = ref + 1e-3 * torch.randn(ref.shape, generator=g, device=device)
    ref[2, 5, 7], ref[0, 9, 1] = 1.0, 1.0
    ours[2, 5, 7], ours[0, 9, 1] = 1.25, 0.75                # a tie (exact): the first wins
    pairs = [(ours, ref), (ours[:, :, :999], ref[:, :, :999]), (ours.transpose(1, 2), ref.transpose(1, 2)),
             (ours[1, 3, :17], ref[1, 3, :17])]
    return all(agrees(_launch(kernels, a, b), reference_stats(a, b)) for a, b in pairs)


def pair_stats_vector(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor | None:
    """The optimistic stats vector of a float32 CUDA pair in one pass, or None where the kernel
    is unavailable (another dtype or device, no compiler)."""
    if ours.dtype != torch.float32 or ref.dtype != torch.float32 or not ours.is_cuda \
            or ref.device != ours.device or ours.numel() == 0:
        return None
    kernels = _compiled(ours.device)
    return None if kernels is None else _launch(kernels, ours, ref)
