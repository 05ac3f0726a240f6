"""harness.synth_kquant: random Q4_K/Q6_K blocks, and the Q4_K_M file drawn from them (the
32B-shaped preset's path, forced here on the tiny preset): valid for both dequantizers and for
llama.cpp, with Q4_K_M's types, and a clean report on it that still localizes a real bug."""
import os

import gguf
import numpy as np
import pytest
import torch

from harness.gguf.dequant import dequantize
from harness.gguf.load import load_gguf
from harness.synth import PRESETS, disk_estimate, write_synthetic
from harness.synth_kquant import random_blocks


@pytest.mark.parametrize("ttype", ["Q4_K", "Q6_K"])
def test_random_blocks_have_the_asked_spread_and_dequantize_alike(ttype):
    """Mean ~0 and the requested std, the same values from our torch dequantizer and gguf-py's."""
    raw = random_blocks(np.random.default_rng(1), ttype, (96, 1024), 0.02)
    q = gguf.GGMLQuantizationType[ttype]
    assert raw.dtype == np.uint8 and raw.shape == (96, 1024 // 256 * {"Q4_K": 144, "Q6_K": 210}[ttype])
    ours = dequantize(torch.from_numpy(raw.copy()), q, (96, 1024)).double()
    ref = torch.from_numpy(gguf.quants.dequantize(raw, q)).double()
    assert torch.equal(ours, ref)
    assert abs(float(ours.mean())) < 1e-3 and 0.018 < float(ours.std()) < 0.022
    assert float(ours.abs().max()) < 0.2
    with pytest.raises(ValueError, match="multiple of 256"):
        random_blocks(np.random.default_rng(1), ttype, (4, 96), 0.02)


@pytest.fixture(scope="module")
def kq_file(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("kq") / "tiny-q4_k_m.gguf", "tiny", "q4_k_m", kquant=True)


def test_drawn_q4_k_m_has_q4_k_m_types_and_the_estimated_size(kq_file):
    m = load_gguf(kq_file)
    assert m.config == PRESETS["tiny"].config() and m.file_type == "Q4_K_M"
    q6 = {"output.weight", "blk.2.attn_v.weight", "blk.2.ffn_down.weight"}   # llama.cpp's use_more_bits
    for name, t in m.types.items():
        assert t == ("F32" if m.weights[name].ndim == 1 else "Q6_K" if name in q6 else "Q4_K"), (name, t)
    base, final = disk_estimate("tiny", "q4_k_m", kquant=True)
    tensor_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(kq_file).tensors)
    assert base == 0 and final - tensor_bytes == 1 << 24 and os.path.getsize(kq_file) < final
    assert disk_estimate("qwen2.5-32b", "q4_k_m")[0] == 0          # the 32B preset draws its blocks


def test_report_on_a_drawn_q4_k_m_is_clean_and_localizes_a_fault(kq_file, llama_lib):
    """llama.cpp (CPU) loads the file and agrees with our model on it; a dropped QKV bias is named
    at the first layer's q projection output at the prefill."""
    from harness.diff import DiffRequest, diff_gguf
    from harness.ours.inject import REGISTRY
    tokens = [5, 300, 17, 999, 42, 7, 128, 64]
    clean = diff_gguf(DiffRequest(kq_file, tokens=tokens, steps=2)).comparison
    assert not clean.diverged and len(clean.table) > 100
    bug = diff_gguf(DiffRequest(kq_file, tokens=tokens, steps=2, faults=[REGISTRY["drop_qkv_bias"]])).comparison
    assert (bug.first.step, bug.first.layer, bug.first.site) == (0, 0, "blk.0.q")
