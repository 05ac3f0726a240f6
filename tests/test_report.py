"""The divergence report: clean runs are clean, injected bugs are named, the CLI keeps its contract."""
import json
from dataclasses import replace

import pytest

from harness.cli import main
from harness.diff import DiffRequest, capture_reference, diff_gguf, model_for
from harness.ours.inject import REGISTRY

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]
STEPS = 4
ISSUE_FAULTS = ("drop_qkv_bias", "lm_head_transpose", "kv_pos_stuck", "q_register")


@pytest.fixture(scope="module")
def shared(tiny_gguf):
    """One llama.cpp capture and one model per weight type, reused by every fault."""
    req = DiffRequest(tiny_gguf, tokens=PROMPT, steps=STEPS)
    ref = capture_reference(req)
    return req, ref, model_for(req, ref)


def test_clean_model_has_no_divergence(shared):
    req, ref, model = shared
    res = diff_gguf(req, model=model, ref=ref)
    t = res.comparison.table
    assert not res.comparison.diverged, res.comparison.first and res.comparison.first.explanation
    assert len(t) == (STEPS + 1) * (3 * 20 + 3)          # every site of every layer, every step
    assert bool(t["local_passed"].all())
    assert res.comparison.logit_rows["top1_agree"].all()


@pytest.mark.parametrize("name", ISSUE_FAULTS)
def test_injected_bug_is_localized(shared, name):
    req, ref, model = shared
    fault = REGISTRY[name]
    req = DiffRequest(req.gguf, tokens=PROMPT, steps=STEPS, faults=[fault])
    first = diff_gguf(req, model=model, ref=ref).comparison.first
    assert first is not None
    assert (first.step, first.layer, first.site) == fault.where(model.config)


def test_dropped_bias_report_reads_like_a_diagnosis(tiny_f32, capsys):
    rc = main(["report", tiny_f32, "--tokens", ",".join(map(str, PROMPT)), "--steps", "2",
               "--inject", "drop_qkv_bias", "--format", "markdown"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "the first op that diverges is blk.0.q at prefill" in out
    assert "blk.0.q_proj matches llama.cpp, q does not" in out
    assert "worst element token" in out and "head" in out


def test_json_report_is_complete(tiny_f32, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["report", tiny_f32, "--tokens", "1,2,3,4", "--steps", "1", "--format", "json", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["verdict"] == "match" and data["first_divergence"] is None
    assert len(data["table"]) == 2 * 63
    row = data["table"][0]
    for key in ("step", "layer", "site", "max_abs", "rel_l2", "cosine", "worst_index", "ours", "ref", "passed",
                "local_rel_l2", "local_passed"):
        assert key in row
    assert {r["step"] for r in data["logits"]} == {0, 1}
    assert "no divergence" in capsys.readouterr().out


def test_ubatch_flag_micro_batches_the_prompt(tiny_f32, capsys):
    """--ubatch 4 on an 8-token prompt: two micro-batches, said in the header; the planted bug is
    found at the same site as in one batch."""
    toks = ",".join(map(str, PROMPT))
    rc = main(["report", tiny_f32, "--tokens", toks, "--steps", "1", "--ubatch", "4", "--inject", "drop_qkv_bias",
               "--format", "markdown"])
    out = capsys.readouterr().out
    assert rc == 1 and "micro-batches of 4 tokens" in out
    assert "the first op that diverges is blk.0.q at prefill" in out
    rc = main(["report", tiny_f32, "--tokens", toks, "--steps", "1", "--ubatch", "0"])
    assert rc == 0 and "micro-batches" not in capsys.readouterr().out


def test_progress_line_counts_the_compared_tokens(tiny_f32, capsys):
    """--progress with micro-batches of 3 on 8 tokens + 2 steps: one stderr line rewritten after each
    batch (3, 6, 8, then each step) and ended; stdout is the report alone. Without micro-batches
    nothing is printed."""
    import re
    toks = ",".join(map(str, PROMPT))
    rc = main(["report", tiny_f32, "--tokens", toks, "--steps", "2", "--ubatch", "3", "--progress"])
    out, err = capsys.readouterr()
    counts = [(int(a), int(b)) for a, b in re.findall(r"llamadiff: (\d+) of (\d+) tokens compared", err)]
    assert rc == 0 and counts == [(3, 10), (6, 10), (8, 10), (9, 10), (10, 10)]
    assert err.count("\r") == 5 and err.endswith("\n") and "(100%)" in err and "tokens compared" not in out
    rc = main(["report", tiny_f32, "--tokens", toks, "--steps", "1", "--ubatch", "0", "--progress"])
    assert rc == 0 and capsys.readouterr().err == ""


@pytest.mark.parametrize("argv, message", [
    (["report", "/nonexistent.gguf", "--tokens", "1"], "no such file"),
    (["report", "{f32}", "--tokens", "1,x"], "--tokens must be comma-separated integers"),
    (["report", "{f32}"], "exactly one of --prompt"),
    (["report", "{f32}", "--tokens", "1", "--prompt", "hi"], "exactly one of --prompt"),
    (["report", "{f32}", "--tokens", "1,99999"], "out of range"),
    (["report", "{f32}", "--tokens", "1", "--sites", "blk.*.nope"], "matches no site"),
    (["report", "{f32}", "--tokens", "1", "--inject", "no_such_fault"], "unknown fault"),
    (["report", "{f32}", "--tokens", "1", "--steps", "-1"], "--steps must be >= 0"),
    (["report", "{f32}", "--tokens", "1", "--ubatch", "-1"], "--ubatch must be >= 0"),
    (["report", "{f32}", "--tokens", "1", "--format", "pdf"], None),
])
def test_bad_input_exits_2_with_one_line(tiny_f32, capsys, argv, message):
    rc = main([a.replace("{f32}", tiny_f32) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    if message:
        assert message in err and err.count("\n") == 0 and "Traceback" not in err


def test_site_filter_limits_the_report(tiny_f32):
    res = diff_gguf(DiffRequest(tiny_f32, tokens=PROMPT, steps=1, sites="blk.1.*,logits"))
    assert set(res.comparison.table["site"]) == {f"blk.1.{k}" for k in
                                                 res.comparison.table["op"] if k != "logits"} | {"logits"}
    assert all(s.startswith("blk.1.") or s == "logits" for s in res.comparison.table["site"])


def _upstream_drift():
    """Our layer 0's output at the prefill moved by 1e-3 of its RMS: drift from outside a blk.1.*
    subset, the same on every CPU (natural drift of this size depends on the CPU's rounding)."""
    from harness.mde import perturb_fault
    return perturb_fault("shift", 1e-3, "blk.0.l_out", 0)


def test_a_site_subset_is_compared_on_llama_cpps_own_inputs(synth_dir, llama_lib):
    """``--sites blk.1.*``: llama.cpp also captures blk.0.l_out, the input of blk.1.attn_norm, as an
    anchor (not compared). Without it our "local" attn_norm ran on our own layer 0 and carried its
    drift past the local tolerance (a false divergence before). Bugs in the subset are still
    localized."""
    from harness.mde import perturb_fault
    from harness.synth import default_fixture
    path = default_fixture("q4_k_m", preset="tiny", seed=11, cache_dir=synth_dir)
    req = DiffRequest(path, tokens=[895, 745, 657, 488, 515, 328, 352, 311], steps=2, sites="blk.1.*",
                      faults=[_upstream_drift()])
    res = diff_gguf(req)
    t, cmp = res.comparison.table, res.comparison
    assert ("blk.0.l_out" in {k[1] for k in res.ref.keys()}) and set(t["layer"]) == {1}
    row = t[(t.step == 0) & (t.site == "blk.1.attn_norm")].iloc[0]
    assert row.rel_l2 > row.local_tol_rel > row.local_rel_l2      # drift end to end; exact on llama.cpp's input
    assert cmp.meta["end_to_end_sites"] == [] and bool(t["local_passed"].all())
    assert not cmp.diverged, cmp.first and cmp.first.explanation
    bug = perturb_fault("scale", 0.05, "blk.1.k_proj", 1)       # a bug in layer 1 at decode step 1
    first = diff_gguf(replace(req, faults=[_upstream_drift(), bug])).comparison.first
    assert (first.step, first.layer, first.site) == (1, 1, "blk.1.k_proj")
    first = diff_gguf(replace(req, faults=[REGISTRY["drop_qkv_bias"]])).comparison.first
    assert (first.step, first.layer, first.site, first.kind) == (0, 1, "blk.1.q", "local")


def test_an_op_whose_inputs_the_reference_lacks_is_judged_end_to_end(synth_dir, llama_lib):
    """A reference without blk.0.l_out (here: dropped from the capture, as in a recorded run of
    blk.1 alone): blk.1.attn_norm's "local" value ran on our layer 0, so it takes the end-to-end
    verdict, the header lists it, and a first divergence there says that the end-to-end error decides."""
    from harness.synth import default_fixture
    from harness.trace import Trace
    path = default_fixture("q4_k_m", preset="tiny", seed=11, cache_dir=synth_dir)
    req = DiffRequest(path, tokens=[895, 745, 657, 488, 515, 328, 352, 311], steps=2, sites="blk.1.*",
                      faults=[_upstream_drift()])
    full = capture_reference(req)
    ref = Trace(full.n_layer, full.tokens, full.n_prompt, dict(full.meta),
                {k: v for k, v in full.tensors.items() if k[1].startswith("blk.1.")})
    cmp = diff_gguf(req, ref=ref).comparison
    row = cmp.table[(cmp.table.step == 0) & (cmp.table.site == "blk.1.attn_norm")].iloc[0]
    assert row.local_rel_l2 > row.local_tol_rel and bool(row.local_passed) and bool(row.passed)
    assert cmp.meta["end_to_end_sites"] == ["blk.1.attn_norm", "blk.1.ffn_inp"] and not cmp.diverged
    first = diff_gguf(replace(req, faults=[REGISTRY["drop_qkv_bias"]]), ref=ref).comparison.first
    assert (first.step, first.site, first.kind) == (0, "blk.1.attn_norm", "end-to-end")   # layer 0's bug


def test_last_token_outputs_only(tiny_f32):
    """With llama.cpp asked for the last token's logits only, the last layer's sites from ffn_inp
    on hold one row; both the clean verdict and a fault's location survive."""
    from harness.llama.runner import LlamaOptions, LlamaRunner
    with LlamaRunner(tiny_f32, LlamaOptions(device="cpu", all_outputs=False), 64) as r:
        ref = r.run(PROMPT, 2)
    assert ref[0, "blk.2.l_out"].shape == (1, 256) and ref[0, "blk.2.attn_out"].shape == (8, 256)
    assert ref[0, "blk.1.l_out"].shape == (8, 256) and ref[0, "logits"].shape == (1, 1024)
    req = DiffRequest(tiny_f32, tokens=PROMPT, steps=2)
    assert not diff_gguf(req, ref=ref).comparison.diverged
    req.faults = [REGISTRY["lm_head_transpose"]]
    first = diff_gguf(req, ref=ref).comparison.first
    assert (first.step, first.site) == (0, "logits")


def test_batched_comparison_matches_per_pair(shared):
    """The GPU path's batched, deferred reductions (run here on the CPU) give the per-pair table:
    same rows, columns, verdicts and worst elements, errors equal to rounding; NaN and inf too.
    And diff_on_device (streaming, anchored pass) gives diff_gguf's table exactly."""
    import math

    import pandas as pd

    from harness.compare.comparator import compare_traces
    from harness.diff import diff_on_device
    from harness.compare.tolerance import Policy
    req, ref, model = shared
    res = diff_gguf(req, model=model, ref=ref)
    assert res.comparison.table.equals(diff_on_device(req, model=model, ref=ref).comparison.table)
    ours, local = res.ours, res.local
    for trace, key, i, value in ((ours, (1, "blk.1.q"), 5, math.nan), (local, (2, "blk.0.kq"), 3, math.inf),
                                 (local, (0, "blk.2.ffn_out"), 0, -math.inf)):
        trace.tensors[key] = trace[key].clone()
        trace[key].view(-1)[i] = value
    policy = Policy("cpu", model.gguf.weight_type)
    per_pair = compare_traces(ours, ref, policy, local).table
    batched = compare_traces(ours, ref, policy, local, batched=True).table
    pd.testing.assert_frame_equal(batched, per_pair, check_exact=False, rtol=1e-9)
    assert per_pair["sys_z_chan"].notna().sum() > 20     # the systematic columns, batched per segment too
    assert (batched["worst"] == per_pair["worst"]).all() and (batched["passed"] == per_pair["passed"]).all()
    bad = per_pair.set_index(["step", "site"])
    assert bad.loc[(1, "blk.1.q"), "nonfinite"] == 1 and not bad.loc[(2, "blk.0.kq"), "local_passed"]
