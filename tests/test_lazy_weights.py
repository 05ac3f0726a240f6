"""Layer-by-layer weights: matrices kept as raw GGUF bytes and expanded one at a time give the
same activations, bit for bit, as the eager load, and the report and CLI accept them."""
import pandas as pd
import pytest
import torch

from harness.cli import main
from harness.gguf.load import LazyWeight, float_bytes, load_gguf
from harness.ours.model import load_model
from harness.diff import DiffRequest, capture_reference, diff_gguf, model_for

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


def test_lazy_model_equals_eager_at_every_site(tiny_gguf):
    eager = load_model(tiny_gguf, kv_dtype=torch.float16, mirror="cpu", torch_dequant=True)
    lazy = load_model(tiny_gguf, kv_dtype=torch.float16, mirror="cpu", torch_dequant=True, lazy_weights=True)
    mats = [w for w in lazy.gguf.weights.values() if isinstance(w, LazyWeight)]
    assert len(mats) == 3 * 7 + 2 - lazy.gguf.tied          # every matrix, no vector
    a = eager.run_with_cache(PROMPT, 3)
    b = lazy.run_with_cache(PROMPT, 3)
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a.keys())
    assert a.tokens == b.tokens


def test_only_one_matrix_is_expanded_at_a_time(tiny_f32):
    gm = load_gguf(tiny_f32, lazy=True)
    q, k = gm.weights["blk.0.attn_q.weight"], gm.weights["blk.0.attn_k.weight"]
    wq = q.expand()
    assert q.expand() is wq                                  # read twice in a row: expanded once
    k.expand()
    assert LazyWeight._last[0] is k and q.expand() is not wq  # the slot moved on
    assert float_bytes(tiny_f32) == sum(w.numel() if isinstance(w, torch.Tensor) else
                                        torch.Size(w.shape).numel() for w in gm.weights.values()) * 4


def test_report_with_lazy_weights_equals_eager(tiny_f32):
    req = DiffRequest(tiny_f32, tokens=PROMPT, steps=2)
    ref = capture_reference(req)
    eager = diff_gguf(req, ref=ref).comparison.table
    req.lazy_weights = True
    model = model_for(req, ref)
    assert isinstance(model.gguf.weights["blk.1.ffn_up.weight"], LazyWeight)
    lazy = diff_gguf(req, model=model, ref=ref).comparison.table
    pd.testing.assert_frame_equal(eager, lazy)


def test_cli_lazy_weights_flag(tiny_f32, capsys):
    assert main(["report", tiny_f32, "--tokens", "3,14,15,92", "--steps", "1", "--lazy-weights"]) == 0
    assert "no divergence" in capsys.readouterr().out
