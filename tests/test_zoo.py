"""The fault zoo: every named fault is found at exactly its expected (step, layer, site) on every
weight type, the clean run stays clean, and the zoo/faults commands keep their exit codes."""
import json
import textwrap

import pytest
import torch

from harness.cli import main
from harness.diff import DiffRequest, capture_reference, model_for
from harness.ours.inject import REGISTRY, Fault, RunInfo, get_fault, split_specs
from probes.zoo import run_zoo

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]
ISSUE_FAULTS = {"drop_qkv_bias", "lm_head_transpose", "kv_pos_stuck", "q_register", "qkv_weight_transposed",
                "rope_interleaved", "rope_base_wrong", "attn_no_scale", "causal_mask_missing", "gqa_head_mod",
                "rmsnorm_no_weight", "rmsnorm_eps", "swiglu_swapped", "residual_dropped_mid",
                "decode_pos_off_by_one", "fp16_softmax_overflow", "vocab_tail_garbage"}


def _misses(res):
    return "\n".join(f"{r['fault']}: expected {r['expected']}, found {r['found']} ({r['explanation']})"
                     for r in res.failures)


def test_registry_has_every_fault_of_the_issue():
    assert ISSUE_FAULTS <= set(REGISTRY)
    for f in REGISTRY.values():
        assert f.doc and f.where_doc and f.known, f.name


QWEN2_FAULTS = [name for name, f in REGISTRY.items() if f.applies_to("qwen2")]


def test_zoo_localizes_every_fault_exactly(tiny_gguf):
    """The whole zoo on one weight type: one capture, one model, 18 comparisons (one decode
    step is all the decode-only faults need); the qwen3-only faults are skipped, not scored."""
    res = run_zoo(tiny_gguf, tokens=PROMPT, steps=1)
    assert res.ok, _misses(res)
    rows = {r["fault"]: r for r in res.rows}
    assert rows["(clean)"]["status"] == "clean" and rows["(clean)"]["found_loc"] is None
    assert set(rows) == {"(clean)"} | set(REGISTRY)
    assert {n for n, r in rows.items() if r["status"] == "skipped"} == set(REGISTRY) - set(QWEN2_FAULTS)
    assert len(QWEN2_FAULTS) == 17
    for name in QWEN2_FAULTS:
        r = rows[name]
        assert r["expected_loc"] is not None, f"{name} cannot show with this prompt: the zoo would test nothing"
        assert r["found_loc"] == r["expected_loc"], name
    # the locations follow the faults' semantics (not just whatever the tool said)
    assert rows["residual_dropped_mid"]["found_loc"] == (0, 1, "blk.1.ffn_inp")              # n_layer // 2
    assert rows["kv_pos_stuck"]["found_loc"][0] == rows["decode_pos_off_by_one"]["found_loc"][0] == 1
    assert rows["fp16_softmax_overflow"]["found_loc"] == (0, 1, "blk.1.attn_weights")
    assert res.meta["policy"]["exact"], res.meta["policy"]        # calibrated for this weight type


def test_expected_location_follows_the_run_shape(tiny_f32):
    """One-token prompt: position-dependent bugs move to decode step 1, prefill-only bugs vanish;
    no decode step: decode-only bugs vanish. The zoo agrees with every one of these."""
    from harness.gguf.load import read_config_file
    cfg = read_config_file(tiny_f32)
    one = RunInfo(cfg, n_prompt=1, n_steps=2)
    assert REGISTRY["rope_interleaved"].where(one) == (1, 0, "blk.0.q_rope")
    assert REGISTRY["attn_no_scale"].where(one) == (1, 0, "blk.0.attn_weights")
    assert REGISTRY["causal_mask_missing"].where(one) is None
    assert REGISTRY["drop_qkv_bias"].where(one) == (0, 0, "blk.0.q")
    prefill_only = RunInfo(cfg, n_prompt=8, n_steps=0)
    assert REGISTRY["kv_pos_stuck"].where(prefill_only) is None
    assert REGISTRY["decode_pos_off_by_one"].where(prefill_only) is None
    assert REGISTRY["residual_dropped_mid"].where(cfg) == (0, 1, "blk.1.ffn_inp")   # plain config works too
    names = ["rope_interleaved", "attn_no_scale", "causal_mask_missing", "kv_pos_stuck", "decode_pos_off_by_one"]
    res = run_zoo(tiny_f32, tokens=[5], steps=1, faults=names)
    assert res.ok, _misses(res)
    found = {r["fault"]: r["found_loc"] for r in res.rows}
    assert found["causal_mask_missing"] is None
    assert found["rope_interleaved"] == (1, 0, "blk.0.q_rope")


def test_fp16_overflow_is_a_real_overflow(tiny_f32):
    """The half-precision normalizer really overflows where the scores are large (layer 1 and 2
    of tiny) and leaves layer 0 (scaled scores below ~5) bit-identical to the clean model."""
    req = DiffRequest(tiny_f32, tokens=PROMPT, steps=1)
    ref = capture_reference(req)
    model = model_for(req, ref)
    scale = model.config.head_dim ** -0.5
    assert float(ref[0, "blk.0.kq"].max()) * scale < 11 < float(ref[0, "blk.1.kq"].max()) * scale
    clean = model.run_with_cache(PROMPT, 1)
    with model.hooks(REGISTRY["fp16_softmax_overflow"].hooks):
        bad = model.run_with_cache(PROMPT, 1)
    assert torch.equal(bad[0, "blk.0.attn_weights"], clean[0, "blk.0.attn_weights"])
    assert not torch.isfinite(bad[0, "blk.1.attn_weights"]).all()
    assert REGISTRY["fp16_softmax_overflow"].where(model.config, ref=ref) == (0, 1, "blk.1.attn_weights")


def test_split_specs_keeps_user_patterns_whole():
    assert split_specs("drop_qkv_bias, kv_pos_stuck") == ["drop_qkv_bias", "kv_pos_stuck"]
    assert split_specs("a_mod:fn@blk.*.q,blk.*.k,q_register") == ["a_mod:fn@blk.*.q,blk.*.k", "q_register"]


USER_FAULT = textwrap.dedent('''
    import torch
    from harness.ours.inject import Fault

    def zero_layer1_v(x, ctx):
        """Layer 1's v projection reads a zeroed weight."""
        if ctx.layer == 1:
            return torch.zeros_like(x)
    zero_layer1_v.expected = (0, 1, "blk.1.v_proj")

    def wrong_claim(x, ctx):
        """Corrupts layer 1 but claims layer 2: the zoo must call this a miss."""
        if ctx.layer == 1:
            return x * 2
    wrong_claim.expected = (0, 2, "blk.2.ffn_up")

    def unscored(x, ctx):
        return x + 1

    AS_RECORD = Fault("as_record", [("blk.0.ffn_gate", lambda x, ctx: -x)], expected=(0, 0, "blk.0.ffn_gate"))
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = "llamadiff_user_faults_t"
    (tmp_path / f"{name}.py").write_text(USER_FAULT)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_user_fault_through_the_api_and_report(tiny_f32, user_module, capsys):
    f = get_fault(f"{user_module}:zero_layer1_v@blk.*.v_proj")
    assert f.known and f.where(None) == (0, 1, "blk.1.v_proj")
    rc = main(["report", tiny_f32, "--tokens", "1,2,3", "--steps", "1", "--inject",
               f"{user_module}:zero_layer1_v@blk.*.v_proj"])
    assert rc == 1 and "the first op that diverges is blk.1.v_proj at prefill" in capsys.readouterr().out
    assert isinstance(get_fault(f"{user_module}:AS_RECORD"), Fault)
    lambda_fault = Fault("api", [("blk.2.ffn_up", lambda x, ctx: x * 0)], expected=(0, 2, "blk.2.ffn_up"))
    res = run_zoo(tiny_f32, tokens=PROMPT, steps=1, faults=[lambda_fault])
    assert res.ok and res.rows[1]["status"] == "hit"


def test_zoo_cli_scores_user_faults_and_exits_1_on_a_miss(tiny_f32, user_module, capsys):
    toks = ",".join(map(str, PROMPT))
    rc = main(["zoo", tiny_f32, "--tokens", toks, "--steps", "1", "--faults",
               f"drop_qkv_bias,{user_module}:zero_layer1_v@blk.*.v_proj,{user_module}:AS_RECORD",
               "--faults", f"{user_module}:unscored@blk.0.ffn_up,blk.0.ffn_gate"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "OK: 3/3 faults localized" in out and "1 unscored" in out and "hit" in out
    rc = main(["zoo", tiny_f32, "--tokens", toks, "--steps", "1", "--format", "json",
               "--faults", f"{user_module}:wrong_claim@blk.*.ffn_up"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 1 and not data["ok"]
    row = data["rows"][1]
    assert row["status"] == "miss"
    assert (row["found"], row["expected"]) == ("prefill blk.1.ffn_up", "prefill blk.2.ffn_up")
    assert data["rows"][0]["status"] == "clean"


def test_zoo_markdown_and_faults_list(tiny_f32, capsys):
    rc = main(["zoo", tiny_f32, "--tokens", "1,2,3", "--steps", "1", "--faults", "swiglu_swapped",
               "--format", "markdown"])
    out = capsys.readouterr().out
    assert rc == 0 and "| swiglu_swapped | prefill blk.0.ffn_act | prefill blk.0.ffn_act | hit |" in out
    assert main(["faults"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in REGISTRY)
    assert main(["faults", "--format", "json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} == set(REGISTRY)


@pytest.mark.parametrize("argv, message", [
    (["zoo", "/nonexistent.gguf", "--tokens", "1"], "no such file"),
    (["zoo", "{f32}", "--tokens", "1", "--prompt", "hi"], "at most one of --prompt"),
    (["zoo", "{f32}", "--tokens", "1,x"], "--tokens must be comma-separated integers"),
    (["zoo", "{f32}", "--tokens", "1", "--steps", "-1"], "--steps must be >= 0"),
    (["zoo", "{f32}", "--tokens", "1,99999"], "out of range"),
    (["zoo", "{f32}", "--tokens", "1", "--faults", "no_such_fault"], "unknown fault"),
    (["zoo", "{f32}", "--tokens", "1", "--faults", "no_such_module_xyz:fn@blk.*.q"], "cannot load fault"),
    (["zoo", "{f32}", "--tokens", "1", "--faults", "harness.ours.faults:drop_qkv_bias@blk.*.nope"], "matches no site"),
    (["zoo", "{f32}", "--tokens", "1", "--format", "pdf"], None),
])
def test_zoo_bad_input_exits_2(tiny_f32, capsys, argv, message):
    rc = main([a.replace("{f32}", tiny_f32) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    if message:
        assert message in err and err.count("\n") == 0 and "Traceback" not in err
