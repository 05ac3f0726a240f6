"""harness.gguf.dequant must match gguf's numpy dequantization bit for bit.

Random blocks: rng bytes with every f16 scale field overwritten by a finite float16 of sane
magnitude (|x| in [1e-4, 2), random sign, some exact zeros), so no NaN/inf ever enters the
comparison (numpy keeps signalling-NaN payloads where torch quiets them; irrelevant for weights).
Equality is checked on the float32 bit patterns, which is stricter than torch.equal (-0 != +0).
"""
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize as np_dequantize, quantize as np_quantize

import harness.gguf.dequant as dt
from harness.gguf.load import load_gguf

# byte offsets of the f16 fields inside one block of each block type
F16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
              Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
PLAIN = (Q.F32, Q.F16, Q.BF16)
ALL_TYPES = PLAIN + tuple(F16_FIELDS)
QUANTIZABLE = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)  # gguf.quants.quantize
ROWS = 5


def _sane_f16(rng, n) -> np.ndarray:
    mag = np.exp(rng.uniform(np.log(1e-4), np.log(2.0), n))
    x = (mag * rng.choice([-1.0, 1.0], n)).astype(np.float16)
    x[rng.random(n) < 0.05] = 0
    return x


def random_raw(qtype, rng, rows=ROWS, blocks_per_row=6) -> tuple[np.ndarray, tuple[int, int]]:
    """(raw uint8 bytes (rows, bytes_per_row), float shape) of random, NaN-free ``qtype`` data."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    cols = block_size * blocks_per_row * (16 if qtype in PLAIN else 1)
    if qtype in PLAIN:
        x = (rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-12, 4, (rows, cols)))).astype(np.float32)
        x[:, :3] = [0.0, -0.0, 1e-40]  # signed zeros and an f32 subnormal
        raw = {Q.F32: x, Q.F16: x.astype(np.float16)}.get(qtype)
        if raw is None:  # BF16: the upper half of each f32
            raw = (x.view(np.uint32) >> 16).astype(np.uint16)
        return np.ascontiguousarray(raw).view(np.uint8), (rows, cols)
    blocks = rng.integers(0, 256, (rows * blocks_per_row, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        blocks[:, off:off + 2] = _sane_f16(rng, len(blocks)).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1), (rows, cols)


def assert_bit_exact(raw: np.ndarray, shape, qtype, device="cpu"):
    ref = np.ascontiguousarray(np_dequantize(raw, qtype), dtype=np.float32).reshape(shape)
    assert not np.isnan(ref).any()
    got = dt.dequantize(torch.from_numpy(raw).to(device), qtype, shape)
    assert got.dtype == torch.float32 and got.device.type == torch.device(device).type
    assert tuple(got.shape) == tuple(shape)
    want = torch.from_numpy(ref)
    got = got.cpu()
    assert torch.equal(got, want)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), f"{qtype.name}: bit patterns differ"


def quantized_real(qtype, rng, rows=ROWS, cols=1024) -> np.ndarray:
    """Normal weights with a few outliers, quantized by gguf itself."""
    x = rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
    x[rng.random((rows, cols)) < 0.01] *= 300
    return np.ascontiguousarray(np_quantize(x, qtype)).view(np.uint8), (rows, cols)


def _check_all(device):
    rng = np.random.default_rng(1234)
    for qtype in ALL_TYPES:
        assert_bit_exact(*random_raw(qtype, rng), qtype, device=device)
    for qtype in QUANTIZABLE:
        raw, shape = quantized_real(qtype, rng)
        assert_bit_exact(raw, shape, qtype, device=device)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_random_blocks_bit_exact(qtype):
    rng = np.random.default_rng(int(qtype))
    for rows, bpr in ((1, 1), (ROWS, 6), (3, 17)):
        raw, shape = random_raw(qtype, rng, rows, bpr)
        assert_bit_exact(raw, shape, qtype)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: q.name)
def test_gguf_quantized_data_bit_exact(qtype):
    assert_bit_exact(*quantized_real(qtype, np.random.default_rng(7)), qtype)


def test_one_dimensional_and_3d_shapes():
    rng = np.random.default_rng(3)
    raw, _ = random_raw(Q.Q4_K, rng, rows=1, blocks_per_row=4)
    assert_bit_exact(raw.reshape(-1), (1024,), Q.Q4_K)
    raw, _ = random_raw(Q.Q8_0, rng, rows=6, blocks_per_row=2)
    assert_bit_exact(raw, (2, 3, 64), Q.Q8_0)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q6_K, Q.Q3_K], ids=lambda q: q.name)
def test_chunked_decoding_is_identical(qtype, monkeypatch):
    monkeypatch.setitem(dt.CHUNK_ELEMENTS, "cpu", 3 * GGML_QUANT_SIZES[qtype][0])  # 3 blocks per chunk
    raw, shape = random_raw(qtype, np.random.default_rng(5), rows=4, blocks_per_row=5)
    assert_bit_exact(raw, shape, qtype)


def test_result_is_fresh_memory():
    x = np.arange(64, dtype=np.float32)
    raw = torch.from_numpy(x.view(np.uint8))
    out = dt.dequantize(raw, Q.F32, (64,))
    out += 1
    assert x[0] == 0


def test_unsupported_and_malformed_inputs():
    raw = torch.zeros(1024, dtype=torch.uint8)
    for qtype in (Q.IQ2_XXS, Q.IQ4_NL, Q.I8, Q.TQ1_0):
        with pytest.raises(NotImplementedError):
            dt.dequantize(raw, qtype, (1024,))
    with pytest.raises(ValueError, match="needs 68 bytes, got 34"):
        dt.dequantize(torch.zeros(34, dtype=torch.uint8), Q.Q8_0, (64,))
    with pytest.raises(ValueError, match="block size"):
        dt.dequantize(torch.zeros(34, dtype=torch.uint8), Q.Q8_0, (1, 16))
    with pytest.raises(TypeError):
        dt.dequantize(torch.zeros(9, dtype=torch.int8), Q.Q8_0, (32,))


def _assert_same_model(a, b):
    assert a.types == b.types and a.weights.keys() == b.weights.keys()
    for name, w in a.weights.items():
        v = b.weights[name].to(w.device)
        assert w.dtype == v.dtype and w.shape == v.shape, name
        assert torch.equal(w.view(torch.int32), v.view(torch.int32)), name


def test_load_gguf_torch_dequant_matches_numpy(tiny_gguf):
    _assert_same_model(load_gguf(tiny_gguf), load_gguf(tiny_gguf, torch_dequant=True))


def test_load_gguf_falls_back_to_numpy(tiny_f32, monkeypatch):
    def unsupported(raw, qtype, shape):
        raise NotImplementedError(qtype)
    monkeypatch.setattr(dt, "dequantize", unsupported)
    _assert_same_model(load_gguf(tiny_f32), load_gguf(tiny_f32, torch_dequant=True))


def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


@pytest.mark.gpu
def test_cuda_bit_exact():
    _cuda_or_skip()
    _check_all("cuda")
    with pytest.MonkeyPatch.context() as mp:  # multi-chunk path on the GPU too
        mp.setitem(dt.CHUNK_ELEMENTS, "cuda", 4 * 256)
        raw, shape = random_raw(Q.Q5_K, np.random.default_rng(9), rows=3, blocks_per_row=7)
        assert_bit_exact(raw, shape, Q.Q5_K, device="cuda")


@pytest.mark.gpu
def test_cuda_load_gguf_torch_dequant(tiny_gguf):
    _cuda_or_skip()
    gm = load_gguf(tiny_gguf, device="cuda", torch_dequant=True)
    assert all(w.is_cuda for w in gm.weights.values())
    _assert_same_model(load_gguf(tiny_gguf), gm)


def test_gpu_checks_pass_on_cpu():
    """The exact checks the GPU test runs, on the CPU (keeps that test honest where CUDA is absent)."""
    _check_all("cpu")
