"""Faults deep in the run (issue 17, item 3): in the last layer and from decode step 3 on, each
localized at its exact (step, layer, site) on F32 and Q4_K_M; and a fault where the
end-to-end drift and the local error point to different ops.

The registered faults sit in layers 0-2 at prefill or decode step 1; these are written here,
each modelling a real engine bug confined to one layer or to a late step (a per-layer kernel
choice, a KV-cache ring buffer that wraps, a decode-path fused bias)."""
import pytest
import torch
import torch.nn.functional as F

from harness.diff import DiffRequest, capture_reference, diff_gguf, model_for
from harness.ours.inject import Fault
from probes.zoo import run_zoo

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]
STEPS = 3
LAST = 2                          # the tiny preset has 3 layers (checked below)


def _swiglu_swapped(x, ctx):
    "The last layer's SwiGLU kernel takes its operands the other way round: silu(up) * gate."
    return F.silu(ctx.inputs["up"]) * ctx.inputs["gate"]


def _norm_without_weight(x, ctx):
    "The last layer's ffn RMSNorm forgets its weight."
    h = ctx.inputs["x"]
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + ctx.inputs["eps"])


def _mask_missing(x, ctx):
    "The last layer's attention is built without the causal mask (prefill: later tokens visible)."
    return torch.softmax(ctx.inputs["kq"] * ctx.inputs["scale"], dim=-1)


def _window_drops_oldest(x, ctx):
    "From decode step 3 a KV ring buffer of the last layer has wrapped: the oldest position is lost."
    if ctx.step < 3:
        return None
    w = x.clone()
    w[..., 0] = 0
    return w / w.sum(-1, keepdim=True)


def _v_bias_twice(x, ctx):
    "From decode step 3 (another kernel past a KV-length threshold) layer 1 adds the v bias twice."
    return x + ctx.inputs["bias"].view(x.shape[1:]) if ctx.step >= 3 else None


def _vocab_tail_late(x, ctx):
    "From decode step 3 the padded tail of the vocabulary rows is garbage."
    if ctx.step < 3:
        return None
    y = x.clone()
    y[..., -16:] = 30.0
    return y


DEEP = [Fault("swiglu_swapped_last_layer", [(f"blk.{LAST}.ffn_act", _swiglu_swapped)], (0, LAST, f"blk.{LAST}.ffn_act")),
        Fault("ffn_norm_no_weight_last_layer", [(f"blk.{LAST}.ffn_norm", _norm_without_weight)],
              (0, LAST, f"blk.{LAST}.ffn_norm")),
        Fault("causal_mask_missing_last_layer", [(f"blk.{LAST}.attn_weights", _mask_missing)],
              (0, LAST, f"blk.{LAST}.attn_weights")),
        Fault("kv_window_drops_oldest_from_step_3", [(f"blk.{LAST}.attn_weights", _window_drops_oldest)],
              (3, LAST, f"blk.{LAST}.attn_weights"), min_steps=3),
        Fault("v_bias_twice_from_step_3", [("blk.1.v", _v_bias_twice)], (3, 1, "blk.1.v"), min_steps=3),
        Fault("vocab_tail_garbage_from_step_3", [("logits", _vocab_tail_late)], (3, None, "logits"), min_steps=3)]


@pytest.fixture(scope="module", params=("f32", "q4_k_m"))   # the finest and the coarsest class
def captured(request, synth_dir, llama_lib):
    from harness.synth import default_fixture
    path = default_fixture(request.param, preset="tiny", seed=0, cache_dir=synth_dir)
    req = DiffRequest(path, tokens=PROMPT, steps=STEPS)
    ref = capture_reference(req)
    model = model_for(req, ref)
    assert model.config.n_layer == LAST + 1
    return request.param, req, ref, model


def test_last_layer_and_late_step_faults_are_localized_exactly(captured):
    wtype, req, ref, model = captured
    res = run_zoo(req.gguf, tokens=PROMPT, steps=STEPS, faults=DEEP, ref=ref, model=model)
    found = {r["fault"]: r["found_loc"] for r in res.rows}
    assert found == {"(clean)": None,
                     "swiglu_swapped_last_layer": (0, 2, "blk.2.ffn_act"),
                     "ffn_norm_no_weight_last_layer": (0, 2, "blk.2.ffn_norm"),
                     "causal_mask_missing_last_layer": (0, 2, "blk.2.attn_weights"),
                     "kv_window_drops_oldest_from_step_3": (3, 2, "blk.2.attn_weights"),
                     "v_bias_twice_from_step_3": (3, 1, "blk.1.v"),
                     "vocab_tail_garbage_from_step_3": (3, None, "logits")}, wtype
    assert res.ok, [r["explanation"] for r in res.failures]


def _softmax_sum_off(x, ctx):
    "The last layer's softmax rows sum to 1.01 (a normalizer that counts one term too few)."
    return x * 1.01


def test_end_to_end_drift_and_local_error_point_to_different_ops(captured):
    """A 1% softmax-normalizer error in the last layer. End to end, the softmax's own error sits
    inside its drift tolerance: on F32 the first end-to-end failure is the next op (kqv, whose
    drift tolerance is tighter), on Q4_K_M nothing fails end to end at all. The local error names
    the softmax on both."""
    wtype, req, ref, model = captured
    site = f"blk.{LAST}.attn_weights"
    fault = Fault("softmax_sum_off_last_layer", [(site, _softmax_sum_off)], (0, LAST, site))
    cmp = diff_gguf(DiffRequest(req.gguf, tokens=PROMPT, steps=STEPS, faults=[fault]), model=model, ref=ref).comparison
    first = cmp.first
    assert (first.step, first.layer, first.site, first.kind) == (0, 2, "blk.2.attn_weights", "local"), wtype
    assert first.row["local_rel_l2"] == pytest.approx(0.01, rel=1e-3)
    rows = cmp.table.set_index(["step", "site"])
    assert bool(rows.loc[(0, site), "passed"]) and not bool(rows.loc[(0, site), "local_passed"])
    if wtype == "f32":
        assert cmp.first_e2e == (0, "blk.2.kqv")
        assert bool(rows.loc[(0, "blk.2.kqv"), "local_passed"])        # kqv itself is right
    else:
        assert cmp.first_e2e is None
