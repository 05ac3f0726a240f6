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

Many pairs at once (:func:`batch_vectors`, the batched path of ``metrics.batch_stats`` and
``systematic.sys_sums_many``): one launch reads every pair of a batch in blocks of columns x rows,
masking non-finite values as the torch path does (so exact for them too), and also sums the
systematic statistics and each column's (channel's) errors; a second launch, one block per pair,
combines the blocks in a fixed order. It replaced ~14 segmented reductions and a dozen float64
elementwise ops per batch, whose host time made a 512 + 8 report 1.72 s instead of 1.08 s on one
H100 (RESULTS.md, fourteenth session).
"""
from __future__ import annotations

import math

import torch

from harness.nvrtc import compile_kernel, launch

_SRC = r"""
// int parameters: the launcher passes a Python int as a C int (sizes are checked to fit)
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
WHY: dict[tuple[str, int], str] = {}   # (kernel, device index) -> why it is not used (compile error, check)
_KERNELS: dict[int, object] = {}       # CUDA device index -> (stats, finish) kernels (None: the torch path)
_THREADS, _BLOCKS = 256, 1024
_INT_MAX = 2 ** 31 - 1


def as_rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(tensor, rows, cols, row stride) of ``t`` seen as rows of its last axis without a copy
    where its layout allows (the last axis contiguous, the leading ones collapsible: e.g. the
    first P cells of llama.cpp's (H, T, n_kv) scores), else of a contiguous copy."""
    return as_matrix(t, max(t.dim() - 1, 0))


def _launch(kernels, ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor | None:
    """Two launches, no other op but the allocation; None where a size does not fit a C int."""
    stats, finish = kernels
    a, rows, cols, lda = as_rows(ours)
    b, _, _, ldb = as_rows(ref)
    if max(rows, cols, lda, ldb) > _INT_MAX:
        return None
    blocks = max(1, min(_BLOCKS, -(-rows * cols // _THREADS)))
    work = torch.empty(6 * blocks + 9, dtype=torch.float64, device=a.device)
    launch(stats, (blocks, 1, 1), (_THREADS, 1, 1), [a, b, rows, cols, lda, ldb, work])
    out = work[6 * blocks:]
    launch(finish, (1, 1, 1), (32, 1, 1), [work, blocks, a, b, rows, cols, lda, ldb, out])
    return out


def available(device: torch.device) -> bool:
    """Whether the kernels run on ``device`` (compiled and checked on first call): the one-pair
    kernel and the batch kernels."""
    return device.type == "cuda" and _compiled(device) is not None and _compiled_batch(device) is not None


def _build(cache: dict, device: torch.device, src: str, names: tuple[str, str], check):
    """``cache``'s kernels for ``device``, compiled and self-checked on first call (None: the torch
    path, where NVRTC is missing, the driver refuses, or the check fails)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in cache:
        cache[idx] = None
        try:
            kernels = tuple(compile_kernel(src, n) for n in names)
            if check(kernels, device):
                cache[idx] = kernels
            else:
                WHY[(names[0], idx)] = "the self-check against the torch path failed"
        except Exception as e:  # noqa: BLE001 - no NVRTC, a driver refusal: the torch path instead
            WHY[(names[0], idx)] = f"{type(e).__name__}: {str(e)[:2000]}"
    return cache[idx]


def _compiled(device: torch.device):
    return _build(_KERNELS, device, _SRC, ("pair_stats", "pair_finish"), _self_check)


def _compiled_batch(device: torch.device):
    return _build(_BATCH, device, _BATCH_SRC, ("batch_stats", "batch_finish"), _self_check_batch)


def reference_stats(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The torch path's vector (float64 copies), what the kernel must reproduce."""
    a, b = ours.detach().double().flatten(), ref.detach().double().flatten()
    d = a - b
    flat = d.abs().argmax()
    return torch.stack([flat.double(), d[flat].abs(), d.norm(), b.norm(), a.norm(), a @ b,
                        torch.zeros((), dtype=torch.float64, device=a.device), a[flat], b[flat]])


def agrees(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Same worst element (index, |difference|, both values; a NaN equals a NaN) and sums within
    1e-12 relative."""
    exact = [0, 1, 6, 7, 8]
    return bool(torch.allclose(got[exact], want[exact], rtol=0, atol=0, equal_nan=True)
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


# ---- many pairs in two launches: the batched path's statistics (exact for non-finite values) ----
_BATCH_SRC = r"""
#define W 12          // table row: a, b, rows, cols, lda, ldb, block0, col chunks, rows per block,
                      // channel partials' offset (-1: none), channel sums' offset, columns per block
#define NS 9          // sums: dd bb aa ab bad ok db sd energy
#define FULL 0xffffffffu

__device__ void block_reduce(double& m, double& mi, double* s)
{   // blockDim 256; thread 0 ends with the block's first largest (m, mi) and sums, in a fixed order
    for (int off = 16; off > 0; off >>= 1) {
        double om = __shfl_down_sync(FULL, m, off), oi = __shfl_down_sync(FULL, mi, off);
        if (om > m || (om == m && oi < mi)) { m = om; mi = oi; }
        for (int k = 0; k < NS; k++) s[k] += __shfl_down_sync(FULL, s[k], off);
    }
    __shared__ double sh[8][NS + 2];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) { sh[warp][0] = m; sh[warp][1] = mi; for (int k = 0; k < NS; k++) sh[warp][2 + k] = s[k]; }
    __syncthreads();
    if (threadIdx.x == 0)
        for (int w = 1; w < 8; w++) {
            if (sh[w][0] > m || (sh[w][0] == m && sh[w][1] < mi)) { m = sh[w][0]; mi = sh[w][1]; }
            for (int k = 0; k < NS; k++) s[k] += sh[w][2 + k];
        }
}

extern "C" __global__ void batch_stats(const long long* __restrict__ t, int npairs, double* __restrict__ part,
                                       double* __restrict__ chanp)
{
    long long blk = blockIdx.x;
    int lo = 0, hi = npairs - 1;                       // this block's pair: the last with block0 <= blk
    while (lo < hi) { int mid = (lo + hi + 1) >> 1; if (t[mid * W + 6] <= blk) lo = mid; else hi = mid - 1; }
    const long long* e = t + (long long)lo * W;
    const float* A = (const float*)e[0];
    const float* B = (const float*)e[1];
    long long rows = e[2], cols = e[3], lda = e[4], ldb = e[5], local = blk - e[6], cc = e[7], rpb = e[8];
    int cw = (int)e[11], rw = 256 / cw, tx = threadIdx.x % cw, ty = threadIdx.x / cw;
    long long c = (local % cc) * cw + tx, ri = local / cc, r1 = (ri + 1) * rpb < rows ? (ri + 1) * rpb : rows;
    double m = -1.0, mi = 9.0e18, s[NS] = {0, 0, 0, 0, 0, 0, 0, 0, 0}, cs = 0.0;
    if (c < cols)
        for (long long r = ri * rpb + ty; r < r1; r += rw) {
            double x = (double)A[r * lda + c], y = (double)B[r * ldb + c], diff;
            if (x - x == 0.0 && y - y == 0.0) {                 // both finite (no math header in NVRTC)
                double d = x - y;
                s[0] += d * d; s[1] += y * y; s[2] += x * x; s[3] += x * y; s[5] += 1.0; s[6] += d * y; s[7] += d;
                cs += d; diff = fabs(d);
            } else if (x == y) diff = 0.0;                        // the same infinity: agrees
            else { diff = __longlong_as_double(0x7ff0000000000000LL); s[4] += 1.0; }
            if (diff > m) { m = diff; mi = (double)(r * cols + c); }
        }
    __shared__ double col[256];
    col[threadIdx.x] = cs;
    __syncthreads();
    if (e[9] >= 0 && ty == 0 && c < cols) {
        double v = 0.0;
        for (int k = 0; k < rw; k++) v += col[tx + k * cw];
        chanp[e[9] + ri * cols + c] = v;
    }
    block_reduce(m, mi, s);
    if (threadIdx.x == 0) {
        double* p = part + (NS + 2) * blk;
        p[0] = m; p[1] = mi;
        for (int k = 0; k < NS; k++) p[2 + k] = s[k];
    }
}

// one block per pair: its blocks' rows and channel partials combined; out row (16): index, max |d|,
// |d|, |ref|, |ours|, <ours, ref>, non-finite, both values at the index | ok, bb, db, dd, sum d, energy
extern "C" __global__ void batch_finish(const long long* __restrict__ t, int npairs, const double* __restrict__ part,
                                        const double* __restrict__ chanp, double* __restrict__ chan,
                                        double* __restrict__ out)
{
    const long long* e = t + (long long)blockIdx.x * W;
    long long rows = e[2], cols = e[3], rc = (rows + e[8] - 1) / e[8], b0 = e[6], b1 = b0 + e[7] * rc;
    double m = -1.0, mi = 9.0e18, s[NS] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
    for (long long k = b0 + threadIdx.x; k < b1; k += blockDim.x) {
        const double* p = part + (NS + 2) * k;
        if (p[0] > m || (p[0] == m && p[1] < mi)) { m = p[0]; mi = p[1]; }
        for (int j = 0; j < NS; j++) s[j] += p[2 + j];
    }
    if (e[9] >= 0)
        for (long long c = threadIdx.x; c < cols; c += blockDim.x) {
            double v = 0.0;
            for (long long r = 0; r < rc; r++) v += chanp[e[9] + r * cols + c];
            chan[e[10] + c] = v;
            s[8] += v * v;
        }
    block_reduce(m, mi, s);
    if (threadIdx.x != 0) return;
    long long n = rows * cols, i = (mi >= 0.0 && mi < (double)n) ? (long long)mi : n - 1;
    long long r = i / cols, c = i - r * cols;
    double* o = out + 16 * (long long)blockIdx.x;
    o[0] = (double)i; o[1] = m; o[2] = sqrt(s[0]); o[3] = sqrt(s[1]); o[4] = sqrt(s[2]); o[5] = s[3];
    o[6] = s[4]; o[7] = (double)((const float*)e[0])[r * e[4] + c]; o[8] = (double)((const float*)e[1])[r * e[5] + c];
    o[9] = s[5]; o[10] = s[1]; o[11] = s[6]; o[12] = s[0]; o[13] = s[7]; o[14] = s[8]; o[15] = 0.0;
}
"""
_BATCH: dict[int, object] = {}        # CUDA device index -> (stats, finish) batch kernels (None: the torch path)
_PER_BLOCK = 8192                     # elements a block reads
_ROW = 11                             # a block's partial results: max, its index, NS sums


def _collapses(shape, stride) -> bool:
    """Do these axes (size-1 axes aside, their strides say nothing) step as one?"""
    dims = [(n, st) for n, st in zip(shape, stride) if n != 1]
    return all(dims[k][1] == dims[k + 1][1] * dims[k + 1][0] for k in range(len(dims) - 1))


def _inner_stride(shape, stride, default: int) -> int:
    """The stride of the innermost axis of size above 1 (``default`` where there is none)."""
    return next((st for n, st in zip(reversed(shape), reversed(stride)) if n != 1), default)


def as_matrix(t: torch.Tensor, lead: int) -> tuple[torch.Tensor, int, int, int]:
    """(tensor, rows, cols, row stride) of ``t`` seen as a matrix of its first ``lead`` axes by the
    rest, without a copy where its layout allows (each group of axes collapsible, the columns
    contiguous), else of a contiguous copy. :func:`as_rows` is ``lead = t.dim() - 1``."""
    if t.dim() == 0:
        t, lead = t.reshape(1), 0
    if t.is_contiguous():                       # the common case, without the Python walk below
        rows = math.prod(t.shape[:lead])
        cols = t.numel() // rows if rows else math.prod(t.shape[lead:])
        return t, rows, cols, cols
    rs, cs = (t.shape[:lead], t.stride()[:lead]), (t.shape[lead:], t.stride()[lead:])
    if not (_collapses(*rs) and _collapses(*cs) and _inner_stride(*cs, 1) == 1):
        t = t.contiguous()
        rs, cs = (t.shape[:lead], t.stride()[:lead]), (t.shape[lead:], t.stride()[lead:])
    rows, cols = math.prod(rs[0]), math.prod(cs[0])
    return t, rows, cols, _inner_stride(*rs, cols)


def _plan(ours: list[torch.Tensor], refs: list[torch.Tensor], token_major) -> tuple[list, list, int, int, int]:
    """The kernels' table rows (see ``W``), the views they point into, and the totals: blocks,
    channel partials, channel sums. A pair is a (rows, cols) matrix (token-major pairs: (T, C),
    C its channels; others: rows of the last axis), read in blocks of ``cw`` columns x ``rpb`` rows."""
    table, keep, blocks, chanp, chan = [], [], 0, 0, 0
    for i, (o, r) in enumerate(zip(ours, refs)):
        tm = bool(token_major is not None and token_major[i] and o.dim() >= 2)
        lead = 1 if tm else max(o.dim() - 1, 0)
        a, rows, cols, lda = as_matrix(o.detach(), lead)
        b, _, _, ldb = as_matrix(r.detach(), lead)
        cw = 32
        while cw < cols and cw < 256:
            cw *= 2
        rw = 256 // cw
        rpb = min(-(-(_PER_BLOCK // cw) // rw) * rw, -(-rows // rw) * rw)
        cc, rc = -(-cols // cw), -(-rows // rpb)
        table.append([a.data_ptr(), b.data_ptr(), rows, cols, lda, ldb, blocks, cc, rpb,
                      chanp if tm else -1, chan if tm else -1, cw])
        keep += [a, b]
        blocks += cc * rc
        if tm:
            chanp, chan = chanp + rc * cols, chan + cols
    return table, keep, blocks, chanp, chan


def batch_vectors(ours: list[torch.Tensor], refs: list[torch.Tensor], token_major: list[bool] | None = None):
    """Many float32 CUDA pairs reduced in two launches: ``(stats, sums, chan, counts)`` with
    ``stats`` (N, 9) :func:`~harness.compare.metrics.stats_vector` rows (exact for non-finite
    values: the masked path's), ``sums`` (N, 5) the systematic sums ``[n, <ref, ref>, <d, ref>,
    <d, d>, sum d]``, ``chan`` the per-channel sums of d of the ``token_major`` pairs
    concatenated, ``counts`` each pair's channel count (0: none). None where the kernels do not
    apply (another dtype or device, an empty pair, no compiler): the caller's torch path runs."""
    if not ours or any(o.dtype != torch.float32 or r.dtype != torch.float32 or not o.is_cuda
                       or r.device != o.device or o.numel() == 0 or o.shape != r.shape for o, r in zip(ours, refs)):
        return None
    kernels = _compiled_batch(ours[0].device)
    return None if kernels is None else _launch_batch(kernels, ours, refs, token_major)


def _launch_batch(kernels, ours, refs, token_major):
    stats, finish = kernels
    dev = ours[0].device
    table, keep, blocks, nchanp, nchan = _plan(ours, refs, token_major)   # keep: copies alive until enqueued
    if blocks > _INT_MAX:
        return None
    n = len(table)
    tab = torch.tensor(table, dtype=torch.int64).pin_memory().to(dev, non_blocking=True)
    work = torch.empty(_ROW * blocks + max(nchanp, 1) + nchan + 16 * n, dtype=torch.float64, device=dev)
    part, chanp = work[:_ROW * blocks], work[_ROW * blocks:_ROW * blocks + max(nchanp, 1)]
    chan = work[_ROW * blocks + max(nchanp, 1):_ROW * blocks + max(nchanp, 1) + nchan]
    out = work[work.numel() - 16 * n:].view(n, 16)
    launch(stats, (blocks, 1, 1), (256, 1, 1), [tab, n, part, chanp])
    launch(finish, (n, 1, 1), (256, 1, 1), [tab, n, part, chanp, chan, out])
    return out[:, :9], out[:, 9:14], chan, [row[3] if row[9] >= 0 else 0 for row in table]


def _check_pairs(device: torch.device) -> tuple[list, list, list]:
    """Pairs the batch kernels must get right: several shapes and layouts (a strided score view,
    a transposed copy, fewer than 32 columns, one row, a 0-d pair), an exact tie (the first wins),
    NaN, a shared and an opposite infinity."""
    g = torch.Generator(device=device).manual_seed(0)
    ref = torch.randn(3, 70, 300, generator=g, device=device)
    ours = ref + 1e-3 * torch.randn(ref.shape, generator=g, device=device)
    ref[2, 5, 7], ref[0, 9, 1] = 1.0, 1.0
    ours[2, 5, 7], ours[0, 9, 1] = 1.25, 0.75
    bad_o, bad_r = ours[1].clone(), ref[1].clone()
    bad_o[3, 4], bad_o[5, 6], bad_r[5, 6], bad_r[7, 8] = float("nan"), float("inf"), float("inf"), -float("inf")
    bad_o[9, 9], bad_r[9, 9] = float("inf"), -float("inf")
    pairs = [(ours, ref), (ours[:, :, :299], ref[:, :, :299]), (ours.transpose(1, 2), ref.transpose(1, 2)),
             (ours[1, 3, :17], ref[1, 3, :17]), (bad_o, bad_r), (ours[0, :, :20], ref[0, :, :20]),
             (ours[2, :1], ref[2, :1]), (ours[0, 0, 0], ref[0, 0, 0])]
    return [p[0] for p in pairs], [p[1] for p in pairs], [True, True, False, False, True, True, True, False]


def _self_check_batch(kernels, device: torch.device) -> bool:
    """The batch kernels against the torch path, pair by pair: statistics as :func:`agrees`
    (``metrics.stats_vector``, the masked path for non-finite pairs), systematic sums and channel
    sums (``systematic.sys_sums``) to 1e-12 relative."""
    from harness.compare.metrics import stats_vector
    from harness.compare.systematic import sys_sums
    ours, refs, tms = _check_pairs(device)
    got = _launch_batch(kernels, ours, refs, tms)
    if got is None:
        return False
    stats, sums, chan, counts = got
    at = 0
    for i, (o, r, tm) in enumerate(zip(ours, refs, tms)):
        want, (wsums, wchan) = stats_vector(o, r), sys_sums(o, r, tm)
        if not agrees(stats[i], want) or not torch.allclose(sums[i], wsums[:5], rtol=1e-12, atol=1e-300):
            return False
        if (wchan is None) != (counts[i] == 0):
            return False
        if wchan is not None:
            if not torch.allclose(chan[at:at + counts[i]], wchan, rtol=1e-12, atol=1e-12):
                return False
            at += counts[i]
    return True
