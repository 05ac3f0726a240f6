"""The low-overhead kernel launcher (harness.nvrtc): arguments as torch's launcher takes them."""
import pytest
import torch

from harness import nvrtc


def test_an_argument_of_another_type_is_refused_before_any_launch():
    with pytest.raises(TypeError, match="str"):
        nvrtc.launch(None, (1, 1, 1), (1, 1, 1), ["x"])


@pytest.mark.gpu
def test_launch_passes_pointers_ints_and_doubles():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    src = r"""extern "C" __global__ void axpb(float* x, int n, double a, double b)
    { int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] = (float)(a * x[i] + b); }"""
    k = nvrtc.compile_kernel(src, "axpb")
    x = torch.arange(1000, dtype=torch.float32, device="cuda")
    nvrtc.launch(k, (4, 1, 1), (256, 1, 1), [x, 999, 2.0, 0.5])
    want = torch.arange(1000, dtype=torch.float32) * 2 + 0.5
    want[999] = 999
    assert torch.equal(x.cpu(), want)
