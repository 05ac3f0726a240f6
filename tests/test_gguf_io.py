
import pytest
import torch

from harness.gguf.load import GGUFError, load_gguf
from tests.gguf_edit import rewrite

MATRIX_TYPES = {"f32": {"F32"}, "f16": {"F16"}, "q8_0": {"Q8_0"}, "q4_k_m": {"Q4_K", "Q6_K", "Q5_K"}}


def test_every_fixture_type_loads(tiny_gguf, request):
    wtype = request.node.callspec.params["tiny_gguf"]
    gm = load_gguf(tiny_gguf)
    cfg = gm.config
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_head_kv, cfg.d_ff, cfg.n_vocab) == (3, 256, 4, 2, 512, 1024)
    assert cfg.rope_base == 1e6 and cfg.rms_eps == pytest.approx(1e-6)
    assert gm.types["blk.0.attn_q.weight"] in MATRIX_TYPES[wtype]
    assert gm.types["blk.0.attn_q.bias"] == "F32"
    assert gm.weights["blk.1.ffn_down.weight"].shape == (256, 512)
    assert all(torch.isfinite(w).all() for w in gm.weights.values())
    assert not gm.tied and gm.weights["output.weight"].shape == (1024, 256)
    # Qwen-like q/k bias outliers survive (biases stay F32 in every type)
    assert gm.weights["blk.0.attn_q.bias"].min() < -13


def test_quantized_weights_are_close_to_f32(tiny_gguf, tiny_f32):
    ref = load_gguf(tiny_f32).weights["blk.0.ffn_up.weight"]
    w = load_gguf(tiny_gguf).weights["blk.0.ffn_up.weight"]
    assert float((w - ref).norm() / ref.norm()) < 0.1


def test_tied_embeddings(tiny_tied_f32):
    gm = load_gguf(tiny_tied_f32)
    assert gm.tied and "output.weight" not in gm.weights


def _err(path):
    with pytest.raises(GGUFError) as e:
        load_gguf(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_file(tmp_path):
    assert "no such file" in _err(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_text("hello, I am not a model")
    assert "not a GGUF file" in _err(p)


def test_truncated(tmp_path, tiny_f32):
    p = tmp_path / "t.gguf"
    data = open(tiny_f32, "rb").read()
    p.write_bytes(data[: len(data) // 2])
    assert "truncated" in _err(p)
    p.write_bytes(data[:100])   # cut inside the header
    assert "corrupt or truncated" in _err(p) or "truncated" in _err(p)


def test_other_architecture(tmp_path, tiny_f32):
    p = rewrite(tiny_f32, str(tmp_path / "llama.gguf"), arch="llama")
    assert "architecture 'llama' is not supported" in _err(p)


def test_missing_tensor(tmp_path, tiny_f32):
    p = rewrite(tiny_f32, str(tmp_path / "m.gguf"), drop={"blk.1.attn_k.bias"})
    assert "missing tensor blk.1.attn_k.bias" in _err(p)


def test_wrong_shape(tmp_path, tiny_f32):
    p = rewrite(tiny_f32, str(tmp_path / "s.gguf"), reshape={"blk.0.attn_q.weight": (128, 256)})
    assert "tensor blk.0.attn_q.weight has shape [128, 256], expected [256, 256]" in _err(p)


def test_type_that_cannot_be_dequantized(tmp_path, tiny_f32):
    import numpy as np
    p = rewrite(tiny_f32, str(tmp_path / "i.gguf"), retype={"blk.0.attn_norm.weight": np.int32})
    assert "blk.0.attn_norm.weight has type I32, which gguf cannot dequantize" in _err(p)
