import math

import torch

from harness.compare import compare
from harness.metrics import logit_stats, pair_stats
from harness.tolerance import Policy
from harness.trace import Trace


def test_pair_stats_worst_element_and_errors():
    ref = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) + 1
    ours = ref.clone()
    ours[1, 2, 3] = -34.1
    s = pair_stats(ours, ref)
    assert s.worst_index == (1, 2, 3)
    assert math.isclose(s.ours_value, -34.1, rel_tol=1e-6) and s.ref_value == 24.0
    assert math.isclose(s.max_abs, 58.1, rel_tol=1e-6)
    assert math.isclose(s.rel_l2, 58.1 / float(ref.norm()), rel_tol=1e-6)
    assert pair_stats(ref, ref).rel_l2 == 0 and pair_stats(ref, ref).cosine == 1.0


def test_pair_stats_nonfinite_and_masked_inf():
    ref = torch.tensor([0.0, float("-inf"), 1.0])
    assert pair_stats(ref.clone(), ref).rel_l2 == 0            # -inf on both sides agrees
    bad = ref.clone()
    bad[2] = float("nan")
    s = pair_stats(bad, ref)
    assert s.nonfinite == 1 and math.isinf(s.rel_l2) and s.worst_index == (2,)


def test_logit_spike_found_on_one_side_only():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 2000, generator=g)
    ours = ref + 1e-4 * torch.randn(3, 2000, generator=g)
    ours[2, 1234] = 15.19
    rows, spikes = logit_stats(ours, ref)
    assert [s["token"] for s in spikes] == [1234] and spikes[0]["row"] == 2
    assert spikes[0]["side"] == "ours" and math.isclose(spikes[0]["ours"], 15.19, rel_tol=1e-6)
    assert rows[2]["top1_ours"] == 1234 and not rows[2]["top1_agree"] and rows[0]["top1_agree"]
    assert logit_stats(ref, ref)[1] == []


def _trace(values: dict) -> Trace:
    t = Trace(n_layer=1, tokens=[1, 2], n_prompt=2, meta={"source": "llama.cpp"})
    for k, v in values.items():
        t(0, k, v)
    return t


def test_local_error_names_the_op_not_the_drift():
    """ours drifts at attn_norm (end to end) but each op is fine on the reference's inputs except q."""
    g = torch.Generator().manual_seed(1)
    ref = {n: torch.randn(2, 4, 8, generator=g) for n in ("blk.0.q_proj", "blk.0.q", "blk.0.q_rope")}
    ref["blk.0.attn_norm"] = torch.randn(2, 32, generator=g)
    ours = {n: v * 1.01 for n, v in ref.items()}               # 1% drift everywhere end to end
    local = {n: v.clone() for n, v in ref.items()}
    local["blk.0.q"] = ref["blk.0.q"] + 1.0                    # the one op that is wrong
    cmp = compare(_trace(ours), _trace(ref), Policy("cpu", "F32", table={"regimes": {}}), _trace(local))
    assert cmp.first_e2e == (0, "blk.0.attn_norm")
    assert (cmp.first.step, cmp.first.layer, cmp.first.site, cmp.first.kind) == (0, 0, "blk.0.q", "local")
    assert cmp.first.inputs[0]["site"] == "blk.0.q_proj" and cmp.first.inputs[0]["local_passed"]


def test_batched_stats_equal_per_pair_stats():
    from harness.metrics import batch_stats, stats_vector
    g = torch.Generator().manual_seed(0)
    ours = [torch.randn(3, 4, generator=g), torch.randn(7, generator=g), torch.randn(2, 5, 6, generator=g)]
    refs = [x + 0.01 * torch.randn(x.shape, generator=g) for x in ours]
    per_pair = torch.stack([stats_vector(a, b) for a, b in zip(ours, refs)])
    assert torch.allclose(batch_stats(ours, refs), per_pair, rtol=1e-12, atol=1e-12)
    ours[1][3] = float("nan")                      # falls back to the per-pair path, still exact
    per_pair = torch.stack([stats_vector(a, b) for a, b in zip(ours, refs)])
    assert torch.allclose(batch_stats(ours, refs), per_pair, equal_nan=True)


def test_shape_mismatch_is_a_divergence_not_a_crash():
    """A foreign engine whose KV cache does not grow dumps kq with P=1 at decode: that site fails."""
    ref = Trace(n_layer=1, tokens=[1, 2, 3], n_prompt=2, meta={"source": "llama.cpp"})
    ours = Trace(n_layer=1, tokens=[1, 2, 3], n_prompt=2, meta={"source": "engine"})
    g = torch.Generator().manual_seed(2)
    for step, P in ((0, 2), (1, 3)):
        T = 2 if step == 0 else 1
        q = torch.randn(T, 4, 8, generator=g)
        ref(step, "blk.0.q_rope", q)
        ours(step, "blk.0.q_rope", q.clone())
        ref(step, "blk.0.kq", torch.randn(4, T, P, generator=g))
        ours(step, "blk.0.kq", ref[step, "blk.0.kq"].clone() if step == 0 else torch.randn(4, 1, 1, generator=g))
    cmp = compare(ours, ref, Policy("cpu", "F32", table={"regimes": {}}))
    assert (cmp.first.step, cmp.first.site) == (1, "blk.0.kq")
    assert "shape (4, 1, 1) instead of (4, 1, 3)" in cmp.first.row["worst"]
