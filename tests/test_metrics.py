import math

import pytest
import torch

import pandas as pd

from harness.compare.comparator import compare_traces, decisive_column, group_of, layer_group
from harness.compare.metrics import abs_error, logit_stats, pair_stats
from harness.compare.tolerance import Policy
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


def test_abs_error_is_inf_aware_like_the_metrics():
    inf, nan = float("inf"), float("nan")
    ref = torch.tensor([1.0, -inf, inf, 2.0, 3.0])
    ours = torch.tensor([1.5, -inf, -inf, nan, inf])
    err = abs_error(ours, ref)
    assert err.dtype == torch.float64 and err.tolist() == [0.5, 0.0, inf, inf, inf]
    assert float(err.max()) == pair_stats(ours, ref).max_abs


def test_decisive_column_and_layer_groups():
    t = pd.DataFrame(dict(layer=[None, 0, 0, 1, None], site=["embd", "blk.0.q", "blk.0.k", "blk.1.q", "logits"],
                          passed=[True] * 5, local_passed=[pd.NA] * 5))
    assert decisive_column(t) == "passed" and decisive_column(t.drop(columns="local_passed")) == "passed"
    assert decisive_column(t.assign(local_passed=[pd.NA, True, False, True, pd.NA])) == "local_passed"
    assert list(layer_group(t)) == ["embd", "blk.0", "blk.0", "blk.1", "logits"]
    assert [group_of(lay, s) for lay, s in zip([None, 0, 1], ["embd", "blk.0.q", "blk.1.q"])] == ["embd", "blk.0", "blk.1"]


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
    cmp = compare_traces(_trace(ours), _trace(ref), Policy("cpu", "F32", table={"regimes": {}}), _trace(local))
    assert cmp.first_e2e == (0, "blk.0.attn_norm")
    assert (cmp.first.step, cmp.first.layer, cmp.first.site, cmp.first.kind) == (0, 0, "blk.0.q", "local")
    assert cmp.first.inputs[0]["site"] == "blk.0.q_proj" and cmp.first.inputs[0]["local_passed"]


def test_numel_groups_bound_the_elements_reduced_at_once():
    from harness.compare.metrics import numel_groups
    ts = [torch.zeros(n) for n in (12, 7, 60, 5, 5, 0, 9)]
    groups = numel_groups(ts, limit=20)
    assert [(g.start, g.stop) for g in groups] == [(0, 2), (2, 3), (3, 7)]     # 19 | 60 alone | 19
    assert numel_groups(ts, limit=1000) == [slice(0, 7)] and numel_groups([], limit=5) == []


@pytest.mark.parametrize("limit", [None, 20])      # one concatenation, or groups of <= 20 elements
def test_batched_stats_equal_per_pair_stats(limit, monkeypatch):
    import harness.compare.metrics as M
    from harness.compare.metrics import batch_stats, stats_vector
    if limit:
        monkeypatch.setattr(M, "BATCH_ELEMENTS", limit)
    g = torch.Generator().manual_seed(0)
    ours = [torch.randn(3, 4, generator=g), torch.randn(7, generator=g), torch.randn(2, 5, 6, generator=g)]
    refs = [x + 0.01 * torch.randn(x.shape, generator=g) for x in ours]
    per_pair = torch.stack([stats_vector(a, b) for a, b in zip(ours, refs)])
    assert torch.allclose(batch_stats(ours, refs), per_pair, rtol=1e-12, atol=1e-12)
    ours[1][3] = float("nan")                      # handled inside the batch (no fallback)
    per_pair = torch.stack([stats_vector(a, b) for a, b in zip(ours, refs)])
    assert torch.allclose(batch_stats(ours, refs), per_pair, equal_nan=True)


def test_batched_stats_nonfinite_pairs_equal_per_pair_stats():
    """NaN and +-inf on one or both sides, mixed with finite pairs in one batch: every pair's
    reductions equal stats_vector's (index, worst error, non-finite count and the worst pair of
    values exactly; the norms and dot product to rounding), and so does every PairStats."""
    from harness.compare.metrics import batch_stats, finish_stats, stats_vector
    g = torch.Generator().manual_seed(3)
    inf, nan = float("inf"), float("nan")
    cases = [  # (index, ours value, ref value) planted in a random pair of shape (4, 5)
        [], [(7, nan, None)], [(2, None, nan)], [(11, nan, nan)], [(3, inf, None)], [(5, None, -inf)],
        [(0, -inf, -inf), (19, inf, inf)],          # equal infs on both sides are ignored
        [(6, inf, -inf)], [(8, nan, inf)], [(1, -inf, -inf), (4, 2.5, None)],
        [(9, inf, inf), (12, nan, None), (13, None, -inf)],
        [(i, -inf, -inf) for i in range(20)],      # all masked: nothing left to compare
    ]
    ours, refs = [], []
    for planted in cases:
        a, b = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
        for i, x, y in planted:
            if x is not None:
                a.view(-1)[i] = x
            if y is not None:
                b.view(-1)[i] = y
        ours.append(a)
        refs.append(b)
    ours.append(torch.randn(7, generator=g))       # a finite pair of another shape
    refs.append(ours[-1] + 1e-3)
    got = batch_stats(ours, refs)
    want = torch.stack([stats_vector(a, b) for a, b in zip(ours, refs)])
    exact = [0, 1, 6, 7, 8]                        # index, worst |diff|, nonfinite, ours/ref at worst
    assert torch.equal(got[:, exact].nan_to_num(), want[:, exact].nan_to_num())
    assert torch.equal(got[:, exact].isnan(), want[:, exact].isnan())
    assert torch.allclose(got, want, rtol=1e-12, atol=0, equal_nan=True)
    assert want[:, 6].tolist() == [0, 1, 1, 1, 1, 1, 0, 1, 1, 0, 2, 0, 0]
    for a, b, x, y in zip(ours, refs, got.tolist(), want.tolist()):
        s, t = finish_stats(x, tuple(a.shape)), finish_stats(y, tuple(a.shape))
        assert (s.worst_index, s.nonfinite, s.max_abs) == (t.worst_index, t.nonfinite, t.max_abs)
        assert s.rel_l2 == t.rel_l2 or math.isclose(s.rel_l2, t.rel_l2, rel_tol=1e-12)


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
    cmp = compare_traces(ours, ref, Policy("cpu", "F32", table={"regimes": {}}))
    assert (cmp.first.step, cmp.first.site) == (1, "blk.0.kq")
    assert "shape (4, 1, 1) instead of (4, 1, 3)" in cmp.first.row["worst"]


def test_finish_many_equals_finish_stats_row_by_row():
    """The vectorized finish (one numpy pass over a whole flush) gives exactly the PairStats values,
    edge cases included: empty and scalar shapes, zero reference, non-finite pairs, NaN values."""
    from dataclasses import astuple, fields

    import numpy as np

    from harness.compare.metrics import PairStats, finish_many, finish_stats
    g = torch.Generator().manual_seed(5)
    inf, nan = float("inf"), float("nan")
    rows = [[float(i % 7), *(torch.rand(5, generator=g, dtype=torch.float64) * 3).tolist(), 0.0,
             *torch.randn(2, generator=g, dtype=torch.float64).tolist()] for i in range(40)]
    shapes = [(2, 7), (7,), (3, 1, 4), (8,)] * 10
    edge = [([3.0, inf, 1.0, 2.0, 2.0, 1.0, 2.0, nan, 1.0], (2, 2)),     # non-finite pair
            ([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], (0, 4)),       # empty
            ([0.0, 0.5, 0.5, 0.0, 0.3, 0.0, 0.0, 0.5, 0.0], ()),           # scalar, zero reference
            ([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], (3,)),         # both zero
            ([1.0, 0.0, 0.0, 1e-31, 1e-31, 1e-62, 0.0, 1e-31, 1e-31], (3,)),   # below tiny
            ([5.0, 2.0, 1.5, 4.0, 3.0, -12.0, 0.0, -1.0, 1.0], (2, 3))]
    rows += [r for r, _ in edge]
    shapes += [s for _, s in edge]
    cols = finish_many(np.array(rows, dtype=np.float64), shapes)
    names = [f.name for f in fields(PairStats)]
    for i, (r, shape) in enumerate(zip(rows, shapes)):
        want = astuple(finish_stats(r, shape))
        got = tuple(cols[n][i] for n in names)
        assert got == want or all(x == y or (x != x and y != y) for x, y in zip(got, want)), (shape, got, want)
        assert [type(x) for x in got] == [type(x) for x in want]



def test_large_pairs_reduced_without_sync_equal_per_pair_stats(monkeypatch):
    """Large pairs are reduced optimistically (no finiteness check) and checked together: the
    finite ones keep those values, the non-finite ones are reduced again on the masked path; the
    table equals comparing each pair on its own, NaN and inf included."""
    from harness.compare.comparator import Comparator
    g = torch.Generator().manual_seed(3)
    ref = {n: torch.randn(4, 64, generator=g) for n in ("blk.0.attn_norm", "blk.0.ffn_inp", "blk.0.ffn_norm",
                                                        "blk.0.l_out")}
    ours = {n: v + 1e-3 * torch.randn(v.shape, generator=g) for n, v in ref.items()}
    ours["blk.0.ffn_inp"][1, 5] = float("nan")
    ours["blk.0.l_out"][2, 7], ref["blk.0.l_out"][2, 7] = float("inf"), float("inf")   # masked alike
    ref["blk.0.ffn_norm"][0, 0] = float("-inf")
    policy = Policy("cpu", "F32", table={"regimes": {}})
    plain = compare_traces(_trace(ours), _trace(ref), policy, batched=False).table
    monkeypatch.setattr(Comparator, "LARGE", 16)          # every pair of this test is "large"
    monkeypatch.setattr(Comparator, "LARGE_HOLD", 600)    # checked in two groups
    large = compare_traces(_trace(ours), _trace(ref), policy, batched=True).table
    assert list(large["nonfinite"]) == [0, 1, 1, 0] and list(plain["nonfinite"]) == [0, 1, 1, 0]
    import pandas as pd
    pd.testing.assert_frame_equal(plain, large)


def test_a_large_pair_reduced_in_slices_equals_it_reduced_at_once(monkeypatch):
    """A pair over STATS_ELEMENTS is reduced in slices of its first axis (bounded float64
    temporaries): the same vector as at once, worst element (its flat index, first of a tie)
    included, for a strided tensor, with non-finite values, and on the optimistic path."""
    import harness.compare.metrics as M
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(7, 5, 6, generator=g)
    ours = (ref + 1e-3 * torch.randn(ref.shape, generator=g)).permute(0, 2, 1).contiguous().permute(0, 2, 1)
    ours[4, 2, 3] = ref[4, 2, 3] + 0.5               # the worst element, in the fifth slice
    ours[6, 0, 0] = ref[6, 0, 0] - 0.5               # a tie later on: the first one wins
    whole = M.stats_vector(ours, ref)
    monkeypatch.setattr(M, "STATS_ELEMENTS", 40)     # slices of one row (30 elements)
    for fn in (M.stats_vector, M.optimistic_stats):
        assert torch.allclose(fn(ours, ref), whole, rtol=1e-12, atol=0)
    assert int(M.stats_vector(ours, ref)[0]) == (4 * 5 + 2) * 6 + 3
    ours[1, 1, 1], ref[2, 0, 0] = float("nan"), float("inf")
    monkeypatch.setattr(M, "STATS_ELEMENTS", 1 << 24)
    whole = M.stats_vector(ours, ref)
    monkeypatch.setattr(M, "STATS_ELEMENTS", 70)     # slices of two rows
    assert torch.allclose(M.stats_vector(ours, ref), whole, rtol=1e-12, atol=0, equal_nan=True)
    assert int(whole[6]) == 2 and int(whole[0]) == 1 * 30 + 1 * 6 + 1


def test_logit_stats_in_row_slices_equal_at_once(monkeypatch):
    import harness.compare.metrics as M
    g = torch.Generator().manual_seed(6)
    ref = torch.randn(9, 50, generator=g)
    ours = ref + 0.05 * torch.randn(ref.shape, generator=g)
    ours[2, 7], ref[6, 11] = 40.0, -40.0             # one-sided spikes in two row slices
    whole = M.logit_stats(ours, ref, k=5)
    monkeypatch.setattr(M, "STATS_ELEMENTS", 120)    # two rows at a time
    sliced = M.logit_stats(ours, ref, k=5)
    assert [r["row"] for r in sliced[0]] == list(range(9)) and len(whole[1]) == 2
    assert sliced[1] == whole[1]
    for a, b in zip(sliced[0], whole[0]):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-12) for k in a)


def test_batched_stats_in_pieces_equal_per_pair_stats(monkeypatch):
    """Each pair's segment is reduced in pieces of PIECE elements, then per pair: the same
    vectors, the worst element the first of a tie that spans two pieces, NaN and inf included;
    the systematic sums likewise."""
    import harness.compare.metrics as M
    import harness.compare.systematic as S
    g = torch.Generator().manual_seed(1)
    ours = [torch.randn(3, 7, generator=g), torch.randn(5, generator=g), torch.randn(4, 9, generator=g)]
    refs = [x + 0.01 * torch.randn(x.shape, generator=g) for x in ours]
    refs[2][1, 2], ours[2][1, 2] = 0.0, 2.0           # a tie at flat 11 and 31 (pieces of 4: the 3rd and 8th)
    refs[2][3, 4], ours[2][3, 4] = 1.0, -1.0
    want = torch.stack([M.stats_vector(a, b) for a, b in zip(ours, refs)])
    sys_want = S.sys_sums_many(ours, refs, [True, False, True])
    monkeypatch.setattr(M, "PIECE", 4)
    got = M.batch_stats(ours, refs)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-15) and int(got[2, 0]) == 11
    sys_got = S.sys_sums_many(ours, refs, [True, False, True])
    assert torch.allclose(sys_got[0], sys_want[0], rtol=1e-12, atol=1e-15)
    assert torch.allclose(sys_got[1], sys_want[1], rtol=1e-12, atol=1e-15) and sys_got[2] == sys_want[2]
    ours[0][2, 6], refs[1][4] = float("nan"), float("inf")
    want = torch.stack([M.stats_vector(a, b) for a, b in zip(ours, refs)])
    assert torch.allclose(M.batch_stats(ours, refs), want, rtol=1e-12, atol=1e-15, equal_nan=True)
