"""harness.ours.cuda_q8_1: ggml-cuda's quantize_q8_1 with fast-math division.

The fixture block is measured data: the 32 activations of q8_1 block 55 of blk.6.ffn_norm at
decode step 1 of the 32B-shaped Q4_K_M file (H100, eleventh and twelfth sessions). Fitting
llama.cpp's ffn_gate and ffn_up outputs by least squares for the activation its kernel used gave
exactly one element off our IEEE quantization: element 31 of this block, by +1.0002 d (its
q was 52 where x / d = 51.499996 rounds to 51)."""
import numpy as np
import pytest
import torch

from harness.ours import cuda_q8_1
from harness.ours.numerics import q8_1_mmvq

BLOCK_55 = np.array([3205932711, 1041364436, 1054121638, 3215000886, 1065455180, 1071259078, 1040576747,
                     3200633189, 1070733377, 1069372331, 3204616269, 1058629397, 1040280189, 1042073620,
                     3206071953, 3191728042, 1067507039, 1066074465, 3208580619, 1070160128, 3196382969,
                     3209678987, 1064020088, 3202569640, 1057771734, 3196809325, 3193067722, 1067498766,
                     3216769263, 1071786732, 3214428389, 1060597092], np.uint32).view(np.float32)
LLAMA_CODE_31 = 52          # what llama.cpp's kernel used (H100), where IEEE rounding gives 51


def ieee_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = x.reshape(-1, 32)
    d = b.abs().amax(-1) / 127.0
    v = b / d[:, None]
    q = torch.where((v - v.trunc()).abs() == 0.5, v.trunc() + v.sign(), v.round())
    return q.reshape(-1), d


def test_the_measured_element_is_a_near_tie_that_ieee_rounds_down():
    x = torch.from_numpy(BLOCK_55.copy())
    q, d = ieee_codes(x)
    assert float(x[31] / d[0]) == pytest.approx(51.5, abs=1e-5) and float(x[31] / d[0]) < 51.5
    assert int(q[31]) == LLAMA_CODE_31 - 1
    xq, _ = q8_1_mmvq(x[None])                       # the CPU path: the IEEE emulation
    assert float(xq[0, 31]) == pytest.approx(51 * float(d[0].half()), rel=1e-6)


def test_agreement_check_allows_a_step_only_at_near_ties():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.from_numpy(BLOCK_55.copy()), torch.randn(4096, generator=g) * 3])
    q, d = ieee_codes(x)
    assert cuda_q8_1.agrees_with_ieee(x, q, d)
    at_tie = q.clone()
    at_tie[31] += 1                                  # llama.cpp's code for the measured element
    assert cuda_q8_1.agrees_with_ieee(x, at_tie, d)
    elsewhere = q.clone()
    elsewhere[40] += 1                               # not near a half-integer: a real difference
    assert not cuda_q8_1.agrees_with_ieee(x, elsewhere, d)
    two = at_tie.clone()
    two[31] += 1
    assert not cuda_q8_1.agrees_with_ieee(x, two, d)
    assert not cuda_q8_1.agrees_with_ieee(x, q, d * (1 + 1e-6))


def test_no_kernel_for_cpu_tensors_or_ragged_rows():
    assert cuda_q8_1.quantize(torch.zeros(2, 64)) is None
    if torch.cuda.is_available():
        assert cuda_q8_1.quantize(torch.zeros(2, 40, device="cuda")) is None


@pytest.mark.gpu
def test_compiled_kernel_gives_llama_cpps_code_for_the_measured_element():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.cat([torch.from_numpy(BLOCK_55.copy()).cuda(), torch.randn(8192, generator=g, device="cuda") * 3])
    got = cuda_q8_1.quantize(x[None])
    assert cuda_q8_1.status() == "compiled" and got is not None
    q, d, s = got
    assert int(q[0, 31]) == LLAMA_CODE_31
    assert cuda_q8_1.agrees_with_ieee(x, q[0], d[0])
    xq, sums = q8_1_mmvq(x[None])                    # the mirror now takes the kernel's codes
    assert torch.equal(xq, (q.reshape(1, -1, 32) * d.half().float()[..., None]).reshape(1, -1))
    assert torch.allclose(sums.float(), x.reshape(-1, 32).sum(-1).half().float()[None], rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_compiled_mmq_quantizer_agrees_with_ieee_up_to_ties():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from harness.ours.numerics import q8_1_mmq
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(48, 896, generator=g, device="cuda") * 3
    x[3, 64:96] = 0.0
    got = cuda_q8_1.quantize(x, mmq=True)
    assert got is not None and cuda_q8_1.status() == "compiled"
    q, d, s = got
    assert cuda_q8_1.agrees_with_ieee(x.reshape(-1), q.reshape(-1), d.reshape(-1))
    assert bool((q[3, 64:96] == 0).all()) and float(d[3, 2]) == 0.0
    xq, _ = q8_1_mmq(x, ds4=False)
    assert torch.equal(xq, (q.reshape(48, -1, 32) * d[..., None]).reshape(48, 896))


@pytest.mark.gpu
def test_mmq_quantizer_takes_a_view_not_16_byte_aligned():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    base = torch.randn(4097, generator=torch.Generator(device="cuda").manual_seed(3), device="cuda")
    view = base[1:].reshape(2, 2048)                 # contiguous, 4 bytes past an aligned address
    assert view.data_ptr() % 16
    got, want = cuda_q8_1.quantize(view, mmq=True), cuda_q8_1.quantize(view.clone(), mmq=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
