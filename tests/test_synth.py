"""Synthetic qwen2 GGUF fixtures: determinism, loader round trip, llama.cpp loading, Qwen-like biases."""
import ctypes
import os

import numpy as np
import pytest

from harness import synth
from harness.gguf.load import expected_shapes, load_gguf, read_tokens
from harness.synth import PRESETS, SPECIAL_TOKENS, SynthError, build_tokenizer, default_fixture, write_synthetic

TINY = PRESETS["tiny"]
TEXT = "Hello world, the quick brown fox jumps over the lazy dog.\n\n  Numbers: 12345; ünïcödé 日本語 🙂!"
MATRIX_TYPES = {"f32": {"F32"}, "f16": {"F16"}, "q8_0": {"Q8_0"}, "q4_k_m": {"Q4_K", "Q6_K"}}


def _param(request_node) -> str:
    return request_node.callspec.params["tiny_gguf"]


# --- tokenizer -------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny", "qwen2.5-0.5b"])
def test_tokenizer_layout_and_merges(preset):
    p = PRESETS[preset]
    tok = build_tokenizer(p)
    tokens, types, merges = tok["tokens"], tok["types"], tok["merges"]
    assert len(tokens) == len(types) == p.n_vocab and len(set(tokens)) == p.n_vocab
    byte_chars = [c for _, c in synth.bytes_to_unicode()]
    assert tokens[:256] == byte_chars and len(set(byte_chars)) == 256
    vocab = set(tokens[:p.n_regular])
    assert len(merges) == p.n_regular - 256
    for m in merges:
        a, b = m.split(" ")
        assert a in vocab and b in vocab and a + b in vocab, m
    assert tokens[p.n_regular:p.n_regular + p.n_special] == list(SPECIAL_TOKENS[:p.n_special])
    assert set(types[:p.n_regular]) == {1} and types[p.n_regular] == 3  # NORMAL, CONTROL
    tail = range(p.n_regular + p.n_special, p.n_vocab)
    assert len(tail) >= 20 and all(tokens[i] == f"[PAD{i}]" and types[i] == 5 for i in tail)  # UNUSED
    assert (tok["bos"], tok["pad"], tok["eos"]) == (p.n_regular, p.n_regular, p.n_regular + 2)


def test_qwen05_preset_has_291_tensors():
    p = PRESETS["qwen2.5-0.5b"]
    assert len(expected_shapes(p.config())) + (not p.tied) == 291
    assert p.head_dim == 64 and p.n_vocab - p.n_regular - p.n_special == 271


# --- errors, atomicity, caching --------------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [(dict(preset="huge"), ["preset", "tiny", "qwen2.5-0.5b"]),
                                           (dict(wtype="q3"), ["weight type", "f32", "q4_k_m"])])
def test_bad_choice_is_one_line_error(tmp_path, kwargs, words):
    for fn in (lambda: write_synthetic(tmp_path / "x.gguf", **kwargs), lambda: default_fixture(cache_dir=tmp_path, **kwargs)):
        with pytest.raises(SynthError) as e:
            fn()
        assert "\n" not in str(e.value) and all(w in str(e.value) for w in words)
    assert not os.listdir(tmp_path)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(seed, name, *a):
        if name.startswith("blk.1."):
            raise RuntimeError("killed")
        return real(seed, name, *a)
    real = synth._make_tensor
    monkeypatch.setattr(synth, "_make_tensor", boom)
    with pytest.raises(RuntimeError):
        write_synthetic(tmp_path / "sub" / "x.gguf")
    assert os.listdir(tmp_path / "sub") == []


def test_determinism_and_cache(tmp_path, tiny_f32):
    a = write_synthetic(tmp_path / "d" / "a.gguf", seed=0)
    b = default_fixture(seed=1, cache_dir=tmp_path / "c")
    assert os.path.basename(b) == "tiny-f32-s1.gguf" and sorted(os.listdir(tmp_path / "c")) == ["tiny-f32-s1.gguf"]
    mtime = os.stat(b).st_mtime_ns
    assert default_fixture(seed=1, cache_dir=tmp_path / "c") == b and os.stat(b).st_mtime_ns == mtime
    ref = open(tiny_f32, "rb").read()
    assert open(a, "rb").read() == ref
    assert open(b, "rb").read() != ref and os.path.getsize(b) == len(ref)


# --- the files through harness.gguf.load ------------------------------------------------------

def test_loads_with_config_and_types(tiny_gguf, request):
    wtype = _param(request.node)
    m = load_gguf(tiny_gguf)
    assert m.config == TINY.config() and not m.tied and "output.weight" in m.weights
    for name, t in m.types.items():
        if m.weights[name].ndim == 1:
            assert t == "F32", name
        else:
            assert t in MATRIX_TYPES[wtype], (name, t)
    if wtype == "q4_k_m":
        assert m.types["blk.0.ffn_gate.weight"] == "Q4_K" and m.types["output.weight"] == "Q6_K"
    assert read_tokens(tiny_gguf)[TINY.n_regular:TINY.n_regular + 3] == list(SPECIAL_TOKENS[:3])
    ref = load_gguf(tiny_gguf.replace(f"-{wtype}-", "-f32-")).weights
    for name, w in m.weights.items():  # same random values, up to the type's rounding
        err = float((w - ref[name]).abs().max() / ref[name].abs().max())
        assert err <= {"f32": 0, "f16": 1e-3, "q8_0": 1e-2, "q4_k_m": 0.1}[wtype], (name, err)


def test_tied_file(tiny_f32, tiny_tied_f32):
    m = load_gguf(tiny_tied_f32)
    assert m.tied and "output.weight" not in m.weights and m.config == TINY.config()
    untied = load_gguf(tiny_f32).weights
    assert all(np.array_equal(w.numpy(), untied[n].numpy()) for n, w in m.weights.items())


def test_qk_bias_outliers(tiny_f32):
    w, dh = load_gguf(tiny_f32).weights, TINY.head_dim
    low_freq = {dh // 2 - 2, dh // 2 - 1, dh - 2, dh - 1}
    for i in range(TINY.n_layer):
        for kind in ("q", "k"):
            b = w[f"blk.{i}.attn_{kind}.bias"].numpy()
            out = np.flatnonzero(np.abs(b) > 1)
            assert 2 <= out.size <= 4 and ((b[out] >= -34) & (b[out] <= -14)).all(), (i, kind, b[out])
            assert {int(j) % dh for j in out} <= low_freq
            assert np.abs(np.delete(b, out)).max() < 0.2
        assert abs(float(w[f"blk.{i}.attn_v.bias"].abs().max())) < 0.2


# --- the files through llama.cpp ------------------------------------------------------------

def _tokenize(lc, vocab, text: bytes, parse_special=False) -> list[int]:
    buf = (lc.llama_token * 512)()
    n = lc.llama_tokenize(vocab, text, len(text), buf, len(buf), False, parse_special)
    assert n > 0
    return list(buf[:n])


def _piece(lc, vocab, token: int) -> bytes:
    buf = ctypes.create_string_buffer(64)
    n = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    assert n > 0
    return buf.raw[:n]


def _check_in_llama_cpp(lc, path: str) -> None:
    """Load, tokenize TEXT with a byte-exact round trip, decode it, and get sane last-token logits."""
    model = lc.llama_model_load_from_file(path.encode(), lc.llama_model_default_params())
    assert model, "llama.cpp failed to load the file"
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_threads, cp.n_threads_batch = 128, 128, 2, 2
    ctx = lc.llama_init_from_model(model, cp)
    try:
        assert ctx
        vocab = lc.llama_model_get_vocab(model)
        assert lc.llama_vocab_n_tokens(vocab) == TINY.n_vocab
        assert (lc.llama_vocab_bos(vocab), lc.llama_vocab_eos(vocab)) == (TINY.n_regular, TINY.n_regular + 2)
        ids = _tokenize(lc, vocab, TEXT.encode())
        assert all(0 <= t < TINY.n_regular for t in ids) and len(ids) < len(TEXT.encode()) * 0.6
        assert b"".join(_piece(lc, vocab, t) for t in ids) == TEXT.encode()
        chat = _tokenize(lc, vocab, b"<|im_start|>user hi<|im_end|>", parse_special=True)
        assert chat[0] == TINY.n_regular + 1 and chat[-1] == TINY.n_regular + 2
        arr = (lc.llama_token * len(ids))(*ids)
        assert lc.llama_decode(ctx, lc.llama_batch_get_one(arr, len(ids))) == 0
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(TINY.n_vocab,)).copy()
        assert np.isfinite(logits).all() and 0.1 < logits.std() < 10  # neither flat nor blown up
    finally:
        if ctx:
            lc.llama_free(ctx)
        lc.llama_model_free(model)


def test_llama_cpp_loads_tokenizes_and_decodes(tiny_gguf, llama_lib):
    _check_in_llama_cpp(llama_lib, tiny_gguf)


def test_llama_cpp_loads_tied(tiny_tied_f32, llama_lib):
    _check_in_llama_cpp(llama_lib, tiny_tied_f32)
