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
    assert cuda_stats.available(dev)                      # compiled and self-checked, not a fallback
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
