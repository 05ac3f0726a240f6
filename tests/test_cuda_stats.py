"""The one-pass pair statistics on a GPU (harness.compare.cuda_stats): the torch path's vector
(worst element, its index and values exact; sums to 1e-12), read from llama.cpp's strided
attention-score views without a copy; non-finite inputs make a norm non-finite (the caller's
fallback). On the CPU: the row view that lets the kernel skip the copy, and the fallback."""
import pytest
import torch

from harness.compare import cuda_stats
from harness.compare.metrics import optimistic_stats


def test_rows_view_is_taken_without_a_copy_where_the_layout_allows():
    scores = torch.randn(14, 6, 512)[..., :300]           # llama.cpp's (H, T, n_kv), first P cells
    t, rows, cols, ld = cuda_stats.as_rows(scores)
    assert t.data_ptr() == scores.data_ptr() and (rows, cols, ld) == (14 * 6, 300, 512)
    flipped = torch.randn(3, 4, 5).transpose(1, 2)        # not collapsible: a contiguous copy
    t, rows, cols, ld = cuda_stats.as_rows(flipped)
    assert t.is_contiguous() and (rows, cols, ld) == (15, 4, 4) and torch.equal(t, flipped)


def test_cpu_pairs_take_the_torch_path():
    a = torch.randn(4, 8)
    assert cuda_stats.pair_stats_vector(a, a + 1) is None
    assert torch.allclose(optimistic_stats(a, a + 1), cuda_stats.reference_stats(a, a + 1))


@pytest.mark.gpu
def test_kernel_reproduces_the_torch_path_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    dev = torch.device("cuda")
    assert cuda_stats.available(dev), cuda_stats.WHY      # compiled and self-checked, not a fallback
    g = torch.Generator(device=dev).manual_seed(7)
    ref = torch.randn(14, 37, 768, generator=g, device=dev)[..., :517]      # a strided score view
    ours = ref.contiguous() + 1e-4 * torch.randn(14, 37, 517, generator=g, device=dev)
    ref[9, 30, 500], ours[9, 30, 500] = 0.5, 3.5
    ref[3, 2, 1], ours[3, 2, 1] = 0.5, -2.5               # the same |difference| exactly, earlier: it wins
    for a, b in ((ours, ref), (ref, ours), (ours.transpose(0, 1), ref.transpose(0, 1)), (ours[5, 5], ref[5, 5])):
        got = cuda_stats.pair_stats_vector(a, b)
        assert got is not None and cuda_stats.agrees(got, cuda_stats.reference_stats(a, b))
    assert int(cuda_stats.pair_stats_vector(ours, ref)[0]) == (3 * 37 + 2) * 517 + 1
    for bad in (float("nan"), float("inf")):
        x = ours.clone()
        x[0, 0, 0] = bad
        v = cuda_stats.pair_stats_vector(x, ref)
        assert not bool(torch.isfinite(v[2:5]).all())     # the caller reduces it again, masked


def test_matrix_view_of_token_major_pairs_and_size_one_axes():
    x = torch.randn(5, 14, 64)[:, :, :32]                 # (T, H, Dh) with a row stride: not (T, C)
    t, rows, cols, ld = cuda_stats.as_matrix(x, 1)
    assert t.is_contiguous() and (rows, cols, ld) == (5, 14 * 32, 14 * 32) and torch.equal(t, x)
    y = torch.randn(7, 896)[:, None, :]                   # a size-1 axis: its stride says nothing
    t, rows, cols, ld = cuda_stats.as_matrix(y, 1)
    assert t.data_ptr() == y.data_ptr() and (rows, cols, ld) == (7, 896, 896)
    odd = torch.randn(2, 7, 3, 4).as_strided((2, 1, 3, 4), (7, 7, 4, 1))      # rows (2, 1, 3), stride 7 != 12
    t, rows, cols, ld = cuda_stats.as_matrix(odd, 3)
    assert (rows, cols, ld) == (6, 4, 4) and torch.equal(t.reshape(6, 4), odd.reshape(6, 4))


def test_batch_kernels_do_not_apply_on_the_cpu():
    a = torch.randn(4, 8)
    assert cuda_stats.batch_vectors([a], [a + 1]) is None


@pytest.mark.gpu
def test_batch_kernels_reproduce_the_torch_path_on_the_gpu():
    """Every pair of a batch of mixed shapes and layouts (strided score views, token-major pairs
    with channel sums, decode-step rows, NaN/inf): the per-pair torch path's statistics and
    systematic sums, and the batched Comparator entry points take the kernels."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from harness.compare.metrics import batch_stats, stats_vector
    from harness.compare.systematic import sys_sums, sys_sums_many
    dev = torch.device("cuda")
    assert cuda_stats.available(dev), cuda_stats.WHY
    g = torch.Generator(device=dev).manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, device=dev)      # noqa: E731
    scores = r(14, 9, 512)[..., :300]
    refs = [r(9, 896), r(9, 4864), r(1, 896), scores, r(9, 2, 64), r(9, 14, 64)[:, :, :32], r(151), r(9, 2, 20)]
    ours = [x.contiguous() + 1e-3 * r(*x.shape) for x in refs]
    refs[1][4, 4000], ours[1][4, 4000], refs[1][2, 17], ours[1][2, 17] = 0.5, 2.5, 0.5, -1.5    # a tie: (2, 17) wins
    ours[4][3, 1, 5], refs[5][1, 2, 3], ours[5][6, 6, 6], refs[5][6, 6, 6] = float("nan"), float("inf"), -float("inf"), -float("inf")
    tms = [True, True, True, False, True, True, False, False]
    got = cuda_stats.batch_vectors(ours, refs, tms)
    assert got is not None
    stats, sums, chan, counts = got
    assert counts == [896, 4864, 896, 0, 128, 448, 0, 0]
    assert int(stats[1][0]) == 2 * 4864 + 17 and float(stats[4][6]) == 1 and float(stats[5][6]) == 1
    at = 0
    for i, (o, x, tm) in enumerate(zip(ours, refs, tms)):
        assert cuda_stats.agrees(stats[i], stats_vector(o, x)), i
        want, wchan = sys_sums(o, x, tm)
        assert torch.allclose(sums[i], want[:5], rtol=1e-12, atol=1e-300), i
        if counts[i]:
            assert torch.allclose(chan[at:at + counts[i]], wchan, rtol=1e-10, atol=1e-13), i
            at += counts[i]
    assert all(cuda_stats.agrees(x, y) for x, y in zip(batch_stats(ours, refs), stats))   # other blocks: sums' last bits
    many = sys_sums_many(ours, refs, tms)
    assert torch.equal(many[0][:, :5], sums) and torch.equal(many[1], chan) and many[2] == counts
    assert many[0][:, 5].tolist() == [9, 9, 1, 0, 9, 9, 0, 0]
