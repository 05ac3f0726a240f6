"""Systematic-error statistics (harness.compare.systematic) and their place in the verdict."""
import math

import pandas as pd
import pytest
import torch

from harness.compare import systematic as S


def _noise(shape, seed=0, scale=1e-6):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(shape, generator=g, dtype=torch.float64)
    return ref, ref + scale * torch.randn(shape, generator=g, dtype=torch.float64)


def _row(vec):
    return S.row_values(vec.tolist())


def test_unbiased_noise_gives_small_z():
    ref, ours = _noise((16, 256))
    r = _row(S.sys_vector(ours, ref, True))
    assert abs(r["sys_z_slope"]) < 5 and abs(r["sys_z_offset"]) < 5 and abs(r["sys_z_chan"]) < 5
    assert abs(r["sys_slope"]) < 1e-6


def test_sums_of_row_blocks_give_the_whole_tensors_statistics():
    """A micro-batched prefill adds each batch's sums: the same six numbers as the whole tensor,
    also when finished many pairs at once (a decode row has no channel statistic)."""
    ref, ours = _noise((20, 8, 16))
    ours = ours + 3e-6 * ref + 2e-6 * torch.linspace(-1, 1, 128, dtype=torch.float64).reshape(8, 16)
    whole = _row(S.sys_vector(ours, ref, True))
    parts = [S.sys_sums(ours[a:b], ref[a:b], True) for a, b in ((0, 7), (7, 8), (8, 20))]
    sums, chan = sum(p[0] for p in parts), sum(p[1] for p in parts)
    one = S.sys_finish_many([sums, S.sys_sums(ours[:1], ref[:1], True)[0]], [chan, None])
    for k, v in zip(S.COLUMNS, one[0]):
        assert v == pytest.approx(whole[k], rel=1e-9), k
    assert math.isnan(one[1][4]) and one[1][0] == pytest.approx(_row(S.sys_vector(ours[:1], ref[:1], True))["sys_slope"])


@pytest.mark.parametrize("limit", [None, 50])      # one concatenation, or groups of <= 50 elements
def test_many_pairs_at_once_give_each_pairs_statistics(limit, monkeypatch):
    """sys_sums_many / sys_pairs (the batched GPU path) give each pair's sys_sums / sys_pair:
    token-major pairs with their channel sums, a one-row pair, a 1-D one, a non-token-major one,
    an empty one, and one with NaN and inf on either side; also reduced in bounded groups."""
    if limit:
        import harness.compare.metrics as M
        monkeypatch.setattr(M, "BATCH_ELEMENTS", limit)
    shapes = [((12, 4, 8), True), ((1, 32), True), ((40,), True), ((6, 9), False), ((0, 5), True), ((5, 6), True)]
    ours, refs, tms = [], [], []
    for i, (shape, tm) in enumerate(shapes):
        ref, o = _noise(shape, seed=i, scale=1e-3)
        ours.append((o + 2e-4).float())
        refs.append(ref.float())
        tms.append(tm)
    ours[-1][1, 2], refs[-1][3, 0] = float("nan"), float("inf")
    sums, chan, counts = S.sys_sums_many(ours, refs, tms)
    assert counts == [32, 32, 0, 0, 0, 6]
    at = 0
    for i, (o, r, tm) in enumerate(zip(ours, refs, tms)):
        one, ch = S.sys_sums(o, r, tm)
        assert sums[i].tolist() == pytest.approx(one.tolist(), rel=1e-12, abs=1e-18), i
        if ch is None:
            assert counts[i] == 0
        else:
            assert chan[at:at + counts[i]].tolist() == pytest.approx(ch.tolist(), rel=1e-12, abs=1e-18), i
            at += counts[i]
    many = S.sys_finish_pairs(S.sys_pairs(ours, refs, tms))
    for i, (o, r, tm) in enumerate(zip(ours, refs, tms)):
        assert many[i].tolist() == pytest.approx(S.sys_vector(o, r, tm).tolist(), rel=1e-9, nan_ok=True), i
    assert not math.isnan(many[0, 5]) and math.isnan(many[1, 5]) and math.isnan(many[3, 5])


@pytest.mark.parametrize("kind", ["slope", "offset", "chan"])
def test_each_statistic_sees_its_bug_far_below_the_noise_rms(kind):
    ref, ours = _noise((16, 256))
    if kind == "slope":
        ours = ours + 2e-6 * ref                           # 1 + 2e-6 scale, noise rms 1e-6
    elif kind == "offset":
        ours = ours + 1e-6                                 # constant shift of 1e-6 rms
    else:
        ours = ours + 2e-6 * torch.randn(256, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    r = _row(S.sys_vector(ours, ref, True))
    assert abs(r[f"sys_z_{kind}"]) > 20
    clean = _row(S.sys_vector(_noise((16, 256))[1], _noise((16, 256))[0], True))
    assert abs(clean[f"sys_z_{kind}"]) < 5


def test_exact_sites_and_channel_needs_two_tokens():
    ref = torch.randn(1, 64, dtype=torch.float64)
    r = _row(S.sys_vector(ref.clone(), ref, True))
    assert r["sys_z_slope"] == 0 and r["sys_z_offset"] == 0 and math.isnan(r["sys_z_chan"])
    moved = _row(S.sys_vector(ref * (1 + 1e-3), ref, False))
    assert moved["sys_z_slope"] > 1e6 and moved["sys_slope"] == pytest.approx(1e-3, rel=1e-6)
    masked = torch.tensor([[1.0, float("-inf"), 2.0], [3.0, 4.0, float("-inf")]])
    assert math.isfinite(_row(S.sys_vector(masked, masked, False))["sys_z_slope"])


def _null(thr=10.0):
    return S.Null({"thresholds": {"cpu/f32/float32": {"matmul": {s: thr for s in S.STATS}}},
                   "n_max": {"cpu/f32/float32": {"matmul": 4096}}})


def test_verdict_needs_calibration_z_and_effect():
    null = _null()
    row = dict(sys_slope=1e-3, sys_z_slope=50.0, sys_offset=0.0, sys_z_offset=0.0, sys_chan=math.nan,
               sys_z_chan=math.nan, shape=(8, 512))
    assert null.verdict("cpu/f32/float32", "matmul", row)[:1] == (False,)
    assert null.verdict("cpu/f32/float32", "matmul", row)[2] == "slope"
    assert null.verdict("cpu/f32/float32", "norm", row)[0] is None          # family never calibrated
    assert null.verdict("cuda/f32/float32", "matmul", row)[0] is None       # regime never calibrated
    assert null.verdict("cpu/f32/float32", "matmul", dict(row, sys_z_slope=9.0))[0] is True
    # a tensor larger than any calibrated: a clean bias's z grows with the size, so not tested
    assert null.verdict("cpu/f32/float32", "matmul", dict(row, shape=(9, 512)))[0] is None
    assert S.Null({"thresholds": _null().table["thresholds"]}).verdict("cpu/f32/float32", "matmul", row)[0] is None
    # a deterministic rounding bias below the effect floor never fails, however large its z
    assert null.verdict("cpu/f32/float32", "matmul", dict(row, sys_slope=S.EFFECT_FLOOR / 2, sys_z_slope=1e6))[0]


def test_observe_ignores_samples_below_the_effect_floor_and_build_null_keeps_a_floor():
    t = pd.DataFrame(dict(local_tol_regime=["cpu/f32/float32"] * 3, family=["norm", "norm", "matmul"],
                          sys_slope=[1e-9, 1e-3, 1e-3], sys_z_slope=[500.0, 3.0, 6.0],
                          sys_offset=[0.0] * 3, sys_z_offset=[0.0] * 3, sys_chan=[math.nan] * 3,
                          sys_z_chan=[math.nan] * 3, shape=[(2, 8), (4, 8), (3, 5)]))
    obs = S.observe({}, t)
    assert obs["cpu/f32/float32"]["norm"]["slope"][:2] == [3.0, 2]
    assert "chan" not in obs["cpu/f32/float32"]["norm"]
    null = S.build_null(obs, {"cpu": {}})
    assert null["thresholds"]["cpu/f32/float32"]["norm"]["slope"] == S.Z_FLOOR
    assert null["thresholds"]["cpu/f32/float32"]["matmul"]["slope"] == S.SAFETY * 6.0
    assert null["n_max"]["cpu/f32/float32"] == {"norm": 32, "matmul": 15}
    kept = S.build_null({}, {}, previous=null)
    assert kept["thresholds"] == null["thresholds"]


def test_shipped_null_has_thresholds_at_or_above_the_floor():
    table = S.Null().table
    thr = table["thresholds"]
    assert any(r.startswith("cpu/") for r in thr)
    assert all(v >= S.Z_FLOOR for fams in thr.values() for st in fams.values() for v in st.values())


# -- in the comparison -------------------------------------------------------------------------
def _diff(path, faults=(), systematic=True, sites=None, ref_sites=None):
    """``ref_sites``: keep only these of llama.cpp's captured sites (a reference without the inputs)."""
    from harness.compare.comparator import compare_traces
    from harness.diff import DiffRequest, capture_reference, model_for, model_policy, run_ours
    from harness.sites import SiteFilter
    from harness.trace import Trace
    req = DiffRequest(path, tokens=[5, 17, 300, 41, 9, 77, 2, 640, 31], steps=2, sites=sites)
    ref = capture_reference(req)
    if ref_sites is not None:
        ref = Trace(ref.n_layer, ref.tokens, ref.n_prompt, dict(ref.meta),
                    {k: v for k, v in ref.tensors.items() if SiteFilter(ref_sites).wants_site(k[1])})
    model = model_for(req, ref)
    filt = SiteFilter(sites) if sites else None
    ours, local = run_ours(model, ref, faults, filt), run_ours(model, ref, faults, filt, anchor=ref)
    return compare_traces(ours, ref, model_policy(model, "cpu"), local, systematic=systematic,
                          judge_unanchored=not sites)          # as harness.diff does


def test_clean_tiny_has_no_systematic_alarm(tiny_f32, llama_lib):
    cmp = _diff(tiny_f32)
    assert not cmp.diverged
    t = cmp.table
    assert t["sys_passed"].notna().all() and bool(t["sys_passed"].all())
    assert (t["local_passed"] == t["local_elem_passed"]).all()


def test_scale_bug_below_tolerance_is_localized_by_the_slope(synth_dir, llama_lib):
    from harness.mde import perturb_fault
    from harness.synth import default_fixture
    path = default_fixture("q8_0", preset="tiny", seed=0, cache_dir=synth_dir)
    site = "blk.1.ffn_up"
    fault = perturb_fault("scale", 1e-4, site, 1)            # 1e-4 x: 100x below the q8 matmul tolerance
    cmp = _diff(path, [fault])
    assert (cmp.first.step, cmp.first.layer, cmp.first.site) == (1, 1, site)
    row = cmp.first.row
    assert row["local_elem_passed"] and row["sys_passed"] is False and row["sys_stat"] == "slope"
    assert row["sys_slope"] == pytest.approx(1e-4, rel=0.05)
    assert "systematic" in cmp.first.explanation
    before = _diff(path, [fault], systematic=False)
    assert not before.diverged and "sys_passed" not in before.table


def test_not_tested_where_the_reference_lacks_the_op_inputs(tiny_f32, llama_lib):
    """A reference of logits alone: our "local" logits ran on our own output_norm (end-to-end drift,
    which is systematic), so the statistics must not judge them; the end-to-end verdict decides.
    (A ``--sites logits`` run captures output_norm too, as the anchor: judged locally.)"""
    anchored = _diff(tiny_f32, sites="logits")
    assert set(anchored.table["site"]) == {"logits"} and anchored.meta["end_to_end_sites"] == []
    cmp = _diff(tiny_f32, sites="logits", ref_sites="logits")
    t = cmp.table
    assert list(t["site"].unique()) == ["logits"] and t["sys_passed"].isna().all()
    assert (t["local_passed"] == t["passed"]).all() and cmp.meta["end_to_end_sites"] == ["logits"]


def test_float16_stored_references_are_not_tested():
    from harness.compare.comparator import Comparator
    from harness.runs.store import StoragePolicy
    assert Comparator(StoragePolicy("cpu", "F32", storage="float16")).null is None
    assert Comparator(StoragePolicy("cpu", "F32")).null is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_statistics_on_the_gpu_match_the_cpu():
    ref, ours = _noise((16, 256))
    ours = ours + 3e-6 * ref
    a = _row(S.sys_vector(ours.float().cuda(), ref.float().cuda(), True))
    b = _row(S.sys_vector(ours.float(), ref.float(), True))
    for k in S.COLUMNS:
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-12)


def test_collecting_null_computes_everything_and_judges_nothing(tiny_f32, llama_lib):
    cmp = _diff(tiny_f32, systematic=S.Null.collecting())
    t = cmp.table
    assert t["sys_z_slope"].notna().all() and t["sys_passed"].isna().all()
    assert S.observe({}, t)["cpu/f32/float32"]["matmul"]["n"] == 9 * 512
