"""The Q8_0-base path of harness.synth (the big presets' quantized types, forced here on the tiny
preset): its Q8_0 values, the Q4_K_M made from it, the disk-space check, cleanup on failure."""
import os
import shutil
from collections import namedtuple

import gguf
import numpy as np
import pytest
import torch

from harness import synth
from harness.gguf.load import expected_shapes, load_gguf
from harness.synth import PRESETS, SynthError, default_fixture, disk_estimate, quantize_q8_0, write_synthetic

TINY = PRESETS["tiny"]
PROMPT = [5, 300, 17, 999, 42, 7, 128, 64]


@pytest.fixture(scope="module")
def q8_dir(tmp_path_factory, llama_lib):
    """tiny q8_0 and q4_k_m written through the Q8_0 base (seed 0, untied)."""
    d = tmp_path_factory.mktemp("q8base")
    for wtype in ("q8_0", "q4_k_m"):
        write_synthetic(d / f"{wtype}.gguf", "tiny", wtype, seed=0, q8_base=True)
    return d


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_q8_0_values_are_q8_rounding_of_the_f32_values(q8_dir, tiny_f32):
    """Every matrix dequantizes to within Q8_0 rounding (half a step of its 32-block, plus the f16
    scale's rounding) of what the F32 path writes for the same seed; norms and biases are F32, equal."""
    q8, f32 = load_gguf(q8_dir / "q8_0.gguf"), load_gguf(tiny_f32)
    assert q8.types.keys() == f32.types.keys() and len(q8.types) == 39
    for name, ref in f32.weights.items():
        got = q8.weights[name]
        if ref.ndim == 1:
            assert q8.types[name] == "F32" and torch.equal(got, ref), name
            continue
        assert q8.types[name] == "Q8_0", name
        ref, got = ref.double().reshape(-1, 32), got.double().reshape(-1, 32)
        step = ref.abs().amax(dim=1, keepdim=True) / 127
        ratio = float(((got - ref).abs() / step).max())
        assert 0.1 < ratio <= 0.5 + 127 * 2.0 ** -11, (name, ratio)   # half a step + the f16 scale's rounding


def test_q8_0_base_is_llama_cpp_s_q8_0_tensor_for_tensor(q8_dir, synth_dir, tiny_f32):
    """ggml's quantizer on the generated blocks gives exactly the tensors llama.cpp's own quantizer
    makes from the F32 file (the fixture the tests use), and gguf-py's numpy Q8_0 of the F32 values."""
    ours, ref = _tensors(q8_dir / "q8_0.gguf"), _tensors(default_fixture("q8_0", "tiny", 0, cache_dir=synth_dir))
    f32 = _tensors(tiny_f32)
    assert ours.keys() == ref.keys()
    for name, t in ref.items():
        assert ours[name].tensor_type == t.tensor_type and np.array_equal(ours[name].data, t.data), name
        if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            numpy_q8 = gguf.quants.quantize(np.asarray(f32[name].data), gguf.GGMLQuantizationType.Q8_0)
            assert np.array_equal(np.asarray(ours[name].data), numpy_q8), name


def test_q4_k_m_from_q8_0_base_loads_in_both(q8_dir, tiny_f32):
    """The Q4_K_M made by llama.cpp's quantizer from the Q8_0 base has Q4_K_M's types, loads in
    harness.gguf.load and in llama.cpp (the project's runner), and its logits track the F32 model's."""
    from harness.llama.runner import LlamaOptions
    from harness.llama.worker import open_runner
    from harness.sites import SiteFilter
    path = str(q8_dir / "q4_k_m.gguf")
    m, f32 = load_gguf(path), load_gguf(tiny_f32)
    assert m.config == TINY.config() and m.types.keys() == f32.types.keys()
    q6 = {"output.weight", "blk.2.attn_v.weight", "blk.2.ffn_down.weight"}   # llama.cpp's use_more_bits
    for name, t in m.types.items():
        assert t == ("F32" if m.weights[name].ndim == 1 else "Q6_K" if name in q6 else "Q4_K"), (name, t)
        err = float((m.weights[name] - f32.weights[name]).abs().max() / f32.weights[name].abs().max())
        assert err <= (0 if t == "F32" else 0.1), (name, err)
    logits = {}
    for p in (path, tiny_f32):
        with open_runner(p, LlamaOptions(kv_type="f32")) as r:
            logits[p] = r.run(PROMPT, 1, filt=SiteFilter("logits"))[1, "logits"].double().reshape(-1)
    got, ref = logits[path], logits[tiny_f32]
    assert torch.isfinite(got).all() and 0.1 < float(got.std()) < 10
    assert float(torch.corrcoef(torch.stack([got, ref]))[0, 1]) > 0.95


def test_ggml_and_numpy_q8_0_agree(monkeypatch):
    """quantize_q8_0 runs ggml's C quantizer (numpy's is made to fail) and its numpy fallback gives
    the same bytes; both match gguf-py's reference, for zero, tiny and large blocks."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(32 * 300).astype(np.float32)
    x[:32] = 0
    x[32:64] *= 1e-30
    x[64:96] *= 1e4
    ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).reshape(-1)
    real_quantize = gguf.quants.quantize

    def no_numpy(*a, **k):
        raise AssertionError("numpy Q8_0 used although ggml is available")
    monkeypatch.setattr(gguf.quants, "quantize", no_numpy)
    assert np.array_equal(quantize_q8_0(x), ref)
    monkeypatch.setattr(gguf.quants, "quantize", real_quantize)
    monkeypatch.setattr(synth, "_ggml_lib", False)   # as if libggml-base could not be loaded
    assert np.array_equal(quantize_q8_0(x), ref)
    with pytest.raises(SynthError, match="multiple of 32"):
        quantize_q8_0(x[:40])


def test_disk_estimate_is_the_tensor_bytes(q8_dir):
    """Base and final estimates are each file's tensor bytes plus the fixed 16 MiB header allowance."""
    base, final = disk_estimate("tiny", "q4_k_m", q8_base=True)
    for est, name in ((base, "q8_0.gguf"), (final, "q4_k_m.gguf")):
        tensor_bytes = sum(int(t.n_bytes) for t in _tensors(q8_dir / name).values())
        assert est - tensor_bytes == 1 << 24, name
        assert os.path.getsize(q8_dir / name) < est
    assert disk_estimate("tiny", "q8_0", q8_base=True) == (0, base)   # the base is the file


def test_disk_estimate_of_a_tied_q4_k_m(tmp_path, llama_lib):
    """Tied (tiny-qwen3): llama.cpp gives token_embd the output's Q6_K, and the estimate knows it."""
    path = write_synthetic(tmp_path / "t.gguf", "tiny-qwen3", "q4_k_m", q8_base=True)
    tensors = _tensors(path)
    assert "output.weight" not in tensors and tensors["token_embd.weight"].tensor_type.name == "Q6_K"
    base, final = disk_estimate("tiny-qwen3", "q4_k_m", q8_base=True)
    assert final - sum(int(t.n_bytes) for t in tensors.values()) == 1 << 24 and base > final


def test_32b_preset_estimate_and_default_path():
    """qwen2.5-32b's Q4_K_M through a Q8_0 base (no longer its default: it draws its blocks,
    tests/test_synth_kquant.py): 34/32 bytes per matrix weight (not the 2 of F16), 4 per norm/bias
    weight; both files at once fit a 64 GB disk, an F16 base would not."""
    p = PRESETS["qwen2.5-32b"]
    shapes = expected_shapes(p.config())
    shapes["output.weight"] = (p.n_vocab, p.d_model)
    mat = sum(int(np.prod(s)) for s in shapes.values() if len(s) == 2)
    vec = sum(int(np.prod(s)) for s in shapes.values() if len(s) == 1)
    assert 32.5e9 < mat + vec < 33e9
    base, final = disk_estimate("qwen2.5-32b", "q4_k_m", kquant=False)
    assert disk_estimate("qwen2.5-32b", "q4_k_m") == (0, final)
    assert base == mat * 34 // 32 + vec * 4 + (1 << 24)
    assert mat * 4.5 / 8 < final < mat * 5 / 8 and base + final < 56e9


def test_disk_check_refuses_before_writing(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(64e9, 14e9, 50e9))
    with pytest.raises(SynthError) as e:
        write_synthetic(tmp_path / "big.gguf", "qwen2.5-32b", "q4_k_m", kquant=False)
    msg = str(e.value)
    assert "\n" not in msg and "not enough free disk space" in msg
    assert "34.8 GB Q8_0 base" in msg and "19.9 GB Q4_K_M" in msg and "50.0 GB free" in msg, msg
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(64e9, 49e9, 15e9))
    with pytest.raises(SynthError, match=r"needs about 19.9 GB \(the 19.9 GB Q4_K_M file\), .* has 15.0 GB free"):
        write_synthetic(tmp_path / "big.gguf", "qwen2.5-32b", "q4_k_m")       # drawn directly: no base
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1e9, 1e9 - 1000, 1000))
    with pytest.raises(SynthError, match=r"needs about 2[0-9] MB \(the 2[0-9] MB F32 file\), .* has 0 MB free"):
        write_synthetic(tmp_path / "tiny.gguf", "tiny", "f32")
    assert os.listdir(tmp_path) == []


def test_failed_quantize_removes_the_q8_0_base(tmp_path, monkeypatch):
    seen = []

    def fail(src, dst, wtype):
        seen.extend(t.tensor_type.name for t in gguf.GGUFReader(src).tensors)
        raise SynthError("llama.cpp could not quantize (simulated)")
    monkeypatch.setattr(synth, "_quantize", fail)
    with pytest.raises(SynthError, match="simulated"):
        write_synthetic(tmp_path / "x.gguf", "tiny", "q4_k_m", q8_base=True)
    assert sorted(set(seen)) == ["F32", "Q8_0"] and os.listdir(tmp_path) == []


def test_multi_block_tensor_q8_0_is_its_f32_values_quantized(tmp_path, monkeypatch):
    """A tensor over one 2M-element generator block (token_embd/output of a 9216-token tiny: a full
    block and a partial one, drawn on several threads) in Q8_0 is exactly numpy's Q8_0 of its F32."""
    import dataclasses
    monkeypatch.setitem(PRESETS, "tiny-wide", dataclasses.replace(TINY, n_vocab=9216))
    f32 = _tensors(write_synthetic(tmp_path / "f32.gguf", "tiny-wide", "f32"))
    q8 = _tensors(write_synthetic(tmp_path / "q8.gguf", "tiny-wide", "q8_0", q8_base=True))
    for name in ("token_embd.weight", "output.weight"):
        values = np.asarray(f32[name].data)
        assert values.size > 1 << 21 and q8[name].tensor_type == gguf.GGMLQuantizationType.Q8_0
        expected = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(np.asarray(q8[name].data), expected), name
