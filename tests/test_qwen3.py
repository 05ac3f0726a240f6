"""qwen3 end to end on the tiny-qwen3 fixtures (head size 128 from attention.key_length while
d_model / n_head = 64; per-head Q/K norms; no QKV biases) of every weight type: the clean report,
the fault zoo with the qwen3 faults at their exact sites, explanations that read the
architecture's op inputs, record + gate, the probes, and the CLI around them."""
import dataclasses
import json
import os

import pytest
import torch

from harness.cli import build_parser, main
from harness.compare.comparator import compare_traces, trace_arch
from harness.compare.tolerance import Policy
from harness.gguf.arch import ARCHS, QWEN2, QWEN3
from harness.gguf.load import read_config_file
from harness.ours.inject import REGISTRY, Fault, FaultError, RunInfo, check_faults
from harness.sites import all_sites, validate_pattern
from harness.synth import PRESETS
from probes.zoo import run_zoo

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]
TOKENS = ",".join(map(str, PROMPT))
SITES = all_sites(3, QWEN3.sites)

# the qwen3 faults and the one place each must be found on a multi-token prefill
QWEN3_FAULTS = {
    "qk_norm_whole": (0, 0, "blk.0.q_norm"),
    "qk_norm_after_rope": (0, 0, "blk.0.q_norm"),
    "k_norm_missing": (0, 0, "blk.0.k_norm"),
    "k_norm_uses_q_weight": (0, 0, "blk.0.k_norm"),
    "head_dim_from_d_model": (0, 0, "blk.0.q_norm"),
}


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _misses(res):
    return "\n".join(f"{r['fault']}: {r['status']}, expected {r['expected']}, found {r['found']} ({r['explanation']})"
                     for r in res.failures)


# -- the clean report ------------------------------------------------------------------------------
def test_clean_report_has_no_divergence(tiny_qwen3_gguf, capsys):
    rc, out, err = _cli(capsys, "report", tiny_qwen3_gguf, "--tokens", TOKENS, "--steps", 2, "--format", "json")
    data = json.loads(out)
    worst = max(data["table"], key=lambda r: r["local_rel_l2"] / max(r["local_tol_rel"], 1e-30))
    assert rc == 0 and data["verdict"] == "match" and data["first_divergence"] is None, \
        (err, worst["site"], worst["step"], worst["local_rel_l2"], worst["local_tol_rel"])
    assert data["meta"]["architecture"] == "qwen3" and data["meta"]["ours"]["architecture"] == "qwen3"
    assert data["meta"]["compared"] == 3 * len(SITES)                 # every qwen3 site, prefill + 2 steps
    assert {r["site"] for r in data["table"]} == set(SITES)
    assert not any(r["site"].endswith((".q", ".k", ".v")) for r in data["table"])    # no bias sites


# -- the zoo ---------------------------------------------------------------------------------------
def test_zoo_localizes_every_qwen3_fault_exactly(tiny_qwen3_gguf):
    """Every fault that exists in qwen3 is found at exactly its expected (step, layer, site), the
    qwen3 faults at the sites above; the QKV-bias fault is skipped with its reason; the clean
    run finds nothing. One capture, 22 comparisons, one decode step."""
    res = run_zoo(tiny_qwen3_gguf, tokens=PROMPT, steps=1)
    assert res.ok, _misses(res)
    rows = {r["fault"]: r for r in res.rows}
    assert set(rows) == {"(clean)"} | set(REGISTRY)
    assert rows["(clean)"]["status"] == "clean" and rows["(clean)"]["found_loc"] is None
    skipped = {n for n, r in rows.items() if r["status"] == "skipped"}
    assert skipped == {"drop_qkv_bias"}
    assert "qwen3 has no QKV biases" in rows["drop_qkv_bias"]["explanation"]
    for name, loc in QWEN3_FAULTS.items():
        assert (rows[name]["status"], rows[name]["found_loc"]) == ("hit", loc), rows[name]
    for name, r in rows.items():
        if name == "(clean)" or name in skipped:
            continue
        assert r["status"] == "hit" and r["found_loc"] == r["expected_loc"], r
        # fp16_softmax_overflow: without Qwen2's bias outliers the normed q.k stay far below
        # float16's exp range, so on qwen3 the fault cannot show and nothing may diverge
        assert (r["expected_loc"] is None) == (name == "fp16_softmax_overflow"), r
    assert rows["residual_dropped_mid"]["found_loc"] == (0, 1, "blk.1.ffn_inp")
    assert rows["qkv_weight_transposed"]["found_loc"] == (0, 0, "blk.0.q_proj")
    assert rows["kv_pos_stuck"]["found_loc"] == (1, 0, "blk.0.attn_weights")
    assert res.meta["architecture"] == "qwen3"


def test_qwen3_fault_locations_follow_the_run_shape(tiny_qwen3_f32):
    """With a one-token prompt, norm-after-RoPE moves to decode step 1 (position 0 is not
    rotated); the other qwen3 faults stay at prefill. A qwen3 file whose key_length equals
    d_model / n_head cannot show the head-size fault."""
    cfg = read_config_file(tiny_qwen3_f32)
    one = RunInfo(cfg, n_prompt=1, n_steps=1)
    assert REGISTRY["qk_norm_after_rope"].where(one) == (1, 0, "blk.0.q_norm")
    assert REGISTRY["qk_norm_after_rope"].where(RunInfo(cfg, n_prompt=1, n_steps=0)) is None
    assert REGISTRY["k_norm_missing"].where(one) == (0, 0, "blk.0.k_norm")
    assert REGISTRY["head_dim_from_d_model"].where(dataclasses.replace(cfg, key_length=64)) is None
    res = run_zoo(tiny_qwen3_f32, tokens=[5], steps=1, faults=["qk_norm_after_rope", "qk_norm_whole"])
    assert res.ok, _misses(res)
    found = {r["fault"]: r["found_loc"] for r in res.rows}
    assert found["qk_norm_after_rope"] == (1, 0, "blk.0.q_norm")
    assert found["qk_norm_whole"] == (0, 0, "blk.0.q_norm")


def test_qwen2_zoo_skips_the_qwen3_faults(tiny_f32, capsys):
    rc, out, _ = _cli(capsys, "zoo", tiny_f32, "--tokens", TOKENS, "--steps", 1, "--format", "json",
                      "--faults", "swiglu_swapped," + ",".join(QWEN3_FAULTS))
    data = json.loads(out)
    assert rc == 0 and data["ok"], out
    rows = {r["fault"]: r for r in data["rows"]}
    assert rows["swiglu_swapped"]["status"] == "hit"
    for name in QWEN3_FAULTS:
        assert rows[name]["status"] == "skipped" and "qwen2 has none" in rows[name]["explanation"], rows[name]
    assert data["verdict"] == "OK: 1/1 faults localized, clean run: no divergence, 5 skipped (not for qwen2)"


def test_zoo_table_says_why_a_fault_is_skipped(tiny_qwen3_f32, capsys):
    rc, out, _ = _cli(capsys, "zoo", tiny_qwen3_f32, "--tokens", TOKENS, "--steps", 0,
                      "--faults", "drop_qkv_bias,k_norm_missing")
    assert rc == 0, out
    assert "OK: 1/1 faults localized, clean run: no divergence, 1 skipped (not for qwen3)" in out
    assert "skipped, qwen2 only: drop_qkv_bias (needs the QKV bias adds at q/k/v; qwen3 has no QKV biases)" in out
    assert "(tiny-qwen3" not in out and "(qwen3, F32)" in out


def test_faults_are_refused_where_they_do_not_exist(tiny_qwen3_f32, tiny_f32, capsys):
    """Injecting a fault into a model that cannot have the bug would silently change nothing:
    report, probe and gate refuse it in one line (exit 2)."""
    for argv, name in ((["report", tiny_qwen3_f32, "--tokens", "1,2"], "drop_qkv_bias"),
                       (["probe", tiny_f32, "--tokens", "1,2"], "k_norm_missing")):
        rc, out, err = _cli(capsys, *argv, "--inject", name)
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"llamadiff: error: {name} is a ") and "it cannot be injected into this model" in err
    with pytest.raises(FaultError, match="drop_qkv_bias is a qwen2 fault, not for qwen3"):
        check_faults([REGISTRY["drop_qkv_bias"]], read_config_file(tiny_qwen3_f32))
    check_faults([REGISTRY[n] for n in QWEN3_FAULTS], read_config_file(tiny_qwen3_f32))   # no error


def test_registered_faults_name_the_sites_of_their_architectures():
    """Every site glob of a registered fault exists in one of the architectures it applies to,
    and each of those architectures has at least one of its sites (else it would inject nothing)."""
    for f in REGISTRY.values():
        archs = [ARCHS[a] for a in (f.architectures or ARCHS)]
        assert archs, f.name
        for glob in f.patterns.split(","):
            assert any(_matches(glob, a) for a in archs), (f.name, glob)
        for a in archs:
            assert any(_matches(g, a) for g in f.patterns.split(",")), (f.name, a.name)
    assert REGISTRY["drop_qkv_bias"].architectures == ("qwen2",)
    assert all(REGISTRY[n].architectures == ("qwen3",) for n in QWEN3_FAULTS)


def _matches(glob, spec):
    try:
        validate_pattern(glob, 3, spec.sites)
        return True
    except ValueError:
        return False


def test_user_fault_may_name_its_architecture(tiny_f32, tmp_path, monkeypatch, capsys):
    (tmp_path / "q3bugs_t.py").write_text(
        "def k_twice(x, ctx):\n"
        "    return x * 2\n"
        "k_twice.expected = (0, 0, 'blk.0.k_norm')\n"
        "k_twice.architectures = 'qwen3'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rc, out, _ = _cli(capsys, "zoo", tiny_f32, "--tokens", "1,2", "--steps", 0, "--faults", "q3bugs_t:k_twice@blk.*.k_norm")
    assert rc == 0 and "1 skipped (not for qwen2)" in out, out


# -- explanations read the architecture's op inputs ---------------------------------------------------
def test_first_divergence_at_q_rope_names_q_norm(tiny_qwen3_f32, capsys):
    rc, out, _ = _cli(capsys, "report", tiny_qwen3_f32, "--tokens", TOKENS, "--steps", 0, "--inject",
                      "rope_interleaved", "--format", "json")
    first = json.loads(out)["first_divergence"]
    assert rc == 1 and (first["step"], first["layer"], first["site"]) == (0, 0, "blk.0.q_rope")
    assert [i["site"] for i in first["inputs"]] == ["blk.0.q_norm"] and first["inputs"][0]["passed"]
    assert "blk.0.q_norm matches llama.cpp, q_rope does not" in first["explanation"]


def test_first_divergence_at_kqv_names_v_proj(tiny_qwen3_f32, capsys, monkeypatch):
    import harness.ours.inject as inject
    bad_kqv = Fault("kqv_bad", [("blk.0.kqv", lambda x, ctx: x * 1.5)], expected=(0, 0, "blk.0.kqv"))
    monkeypatch.setitem(inject.REGISTRY, "kqv_bad", bad_kqv)
    rc, out, _ = _cli(capsys, "report", tiny_qwen3_f32, "--tokens", TOKENS, "--steps", 0, "--inject", "kqv_bad",
                      "--format", "json")
    first = json.loads(out)["first_divergence"]
    assert rc == 1 and (first["step"], first["site"]) == (0, "blk.0.kqv")
    assert [i["site"] for i in first["inputs"]] == ["blk.0.attn_weights", "blk.0.v_proj"]
    assert "blk.0.attn_weights and blk.0.v_proj match llama.cpp, kqv does not" in first["explanation"]


def test_the_architecture_of_two_traces():
    """Named by either meta; else the architecture that has every site of the traces (an
    engine's dump without the key); else unknown."""
    assert trace_arch({"architecture": "qwen3"}, {}) is QWEN3
    assert trace_arch({}, {"architecture": "qwen2"}) is QWEN2
    assert trace_arch({}, {}, ["blk.0.q_norm", "blk.0.q_rope"]) is QWEN3
    assert trace_arch({}, {}, ["blk.0.q", "blk.0.q_rope"]) is QWEN2
    assert trace_arch({}, {}, []) is None


def test_dump_without_architecture_is_explained_by_its_sites(tiny_qwen3_f32):
    """Two bare traces (no architecture in either meta, as another engine's dump may be): the
    first divergence at q_rope still names q_norm as its input."""
    from harness.ours.model import load_model
    model = load_model(tiny_qwen3_f32)
    ref = model.run_with_cache(PROMPT, 0)
    with model.hooks(REGISTRY["rope_interleaved"].hooks):
        ours = model.run_with_cache(PROMPT, 0)
    ref.meta, ours.meta = {"source": "engine"}, {"source": "mine"}
    cmp = compare_traces(ours, ref, Policy("cpu", "F32", "float32"))
    assert cmp.meta["architecture"] == "qwen3"
    assert (cmp.first.site, [i["site"] for i in cmp.first.inputs]) == ("blk.0.q_rope", ["blk.0.q_norm"])


# -- record and gate -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen3_run(tmp_path_factory, synth_dir, llama_lib):
    """A recorded llama.cpp run (Q8_0 tiny-qwen3, 8-token prompt + 2 steps) and its GGUF."""
    from harness.runs.record import record
    from harness.synth import default_fixture
    gguf = default_fixture("q8_0", preset="tiny-qwen3", seed=0, cache_dir=synth_dir)
    res = record(gguf, "tiny-qwen3-q8_0", tokens=PROMPT, steps=2, out_dir=tmp_path_factory.mktemp("runs"))
    return res, gguf


def test_record_writes_the_real_architecture(qwen3_run):
    from harness.runs.store import load_run
    res, _ = qwen3_run
    m = res.manifest
    assert m["config"]["architecture"] == "qwen3" and m["config"]["key_length"] == 128
    assert m["dims"]["Dh"] == 128 and m["sites"] == all_sites(3, QWEN3.sites)
    assert res.n_tensors == 3 * len(SITES) and res.estimate.n_tensors == res.n_tensors
    run = load_run(res.path)
    assert run.trace.meta["architecture"] == "qwen3" and run.trace[0, "blk.0.q_norm"].shape == (8, 4, 128)


def test_run_without_dims_is_checked_against_key_length(qwen3_run, tmp_path):
    """A manifest without ``dims`` (a hand-written one): the head size comes from the config's
    key_length (128), not d_model / n_head (64)."""
    import shutil
    from harness.runs.store import load_run
    res, _ = qwen3_run
    dst = tmp_path / "nodims"
    shutil.copytree(res.path, dst)
    m = json.loads((dst / "manifest.json").read_text())
    del m["dims"]
    (dst / "manifest.json").write_text(json.dumps(m))
    assert load_run(dst).trace[1, "blk.2.k_rope"].shape == (1, 2, 128)


def test_gate_passes_our_model_and_localizes_a_fault(qwen3_run, capsys):
    res, gguf = qwen3_run
    rc, out, err = _cli(capsys, "gate", res.path, "--model", gguf)
    assert rc == 0 and "PASS" in out, out + err
    rc, out, err = _cli(capsys, "gate", res.path, "--model", gguf, "--inject", "k_norm_uses_q_weight", "--format", "json")
    first = json.loads(out)["first_divergence"]
    assert rc == 1 and (first["step"], first["layer"], first["site"]) == (0, 0, "blk.0.k_norm")
    assert "blk.0.k_proj matches" in first["explanation"]
    rc, _, err = _cli(capsys, "gate", res.path, "--model", gguf, "--inject", "drop_qkv_bias")
    assert rc == 2 and "qwen3 has no QKV biases" in err


def test_compare_a_dump_against_the_recorded_run(qwen3_run, tmp_path, capsys):
    """Another engine's dump (written without a config) against the recorded qwen3 run, end to
    end: the first divergence names q_norm as the input of q_rope."""
    from harness.ours.model import load_model
    from harness.runs.store import load_run, write_trace
    res, gguf = qwen3_run
    ref = load_run(res.path).trace
    model = load_model(gguf)
    with model.hooks(REGISTRY["rope_interleaved"].hooks):
        dump = model.run_with_cache(ref.tokens[:ref.n_prompt], ref.n_steps, ref.tokens[ref.n_prompt:])
    write_trace(dump, tmp_path / "dump")
    rc, out, _ = _cli(capsys, "compare", res.path, tmp_path / "dump", "--format", "json")
    first = json.loads(out)["first_divergence"]
    assert rc == 1 and first["site"] == "blk.0.q_rope" and first["step"] == 0
    assert "blk.0.q_norm matches" in first["explanation"]


# -- probes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["torch", "llama"])
def test_probes_are_quiet_on_clean_qwen3_traces(tiny_qwen3_gguf, source, capsys):
    rc, out, _ = _cli(capsys, "probe", tiny_qwen3_gguf, "--source", source, "--tokens", TOKENS, "--steps", 2,
                      "--format", "json")
    data = json.loads(out)
    assert rc == 0 and data["fired"] == [], [s for s in data["summary"] if s["fired"]]
    totals = {s["name"]: s["total"] for s in data["summary"]}
    # the RoPE probes read q_norm/k_norm as RoPE's input (qwen3 has no q/k sites): 3 layers x 2 x 3 steps
    assert totals["rope_pair_norm"] == totals["rope_relative"] == totals["rope_frequency"] == 18
    assert totals["head_norms"] == 18 and all(totals.values()), totals


HEAD_NORM_VARIANTS = {
    "qk_norm_whole": ("blk.0.q_norm", "the norm over the whole projection instead of per head"),
    "qk_norm_after_rope": ("blk.0.q_norm", "the norm applied after RoPE instead of before"),
    "k_norm_missing": ("blk.0.k_norm", "matches its input: the norm is not applied"),
    "k_norm_uses_q_weight": ("blk.0.k_norm", "with blk.0.attn_q_norm.weight (the other head norm's weight)"),
    "head_dim_from_d_model": ("blk.0.q_norm", "over 64-wide chunks of the 128-wide heads (head size taken as "
                                              "d_model / n_head)"),
}


@pytest.mark.parametrize("fault", list(HEAD_NORM_VARIANTS))
def test_head_norm_probe_names_the_variant(tiny_qwen3_f32, fault):
    from probes.checks import probe
    summary, records, _ = probe(tiny_qwen3_f32, tokens=PROMPT, steps=1, faults=[fault], checks=["head_norms"])
    bad = [r for r in records if not r["passed"]]
    site, words = HEAD_NORM_VARIANTS[fault]
    assert bad and (bad[0]["step"], bad[0]["site"]) == (0, site), bad[:1]
    assert words in bad[0]["detail"], bad[0]["detail"]


# -- CLI -----------------------------------------------------------------------------------------
def test_synth_accepts_every_preset(tmp_path, capsys):
    assert {"tiny-qwen3", "qwen3-0.6b", "qwen3-8b"} <= set(PRESETS)
    for preset in PRESETS:
        assert build_parser().parse_args(["synth", "x.gguf", "--preset", preset]).preset == preset
    rc, _, err = _cli(capsys, "synth", tmp_path / "x.gguf", "--preset", "qwen4")
    assert rc == 2 and "invalid choice: 'qwen4'" in err and "tiny-qwen3" in err
    out = tmp_path / "q3.gguf"
    rc, text, err = _cli(capsys, "synth", out, "--preset", "tiny-qwen3")
    assert rc == 0 and "preset tiny-qwen3" in text, err
    cfg = read_config_file(str(out))
    assert (cfg.architecture, cfg.head_dim, cfg.d_model // cfg.n_head) == ("qwen3", 128, 64)


def test_help_texts_say_gguf_not_qwen2_gguf(capsys):
    texts = []
    for argv in (["synth", "--help"], ["report", "--help"], ["zoo", "--help"], ["probe", "--help"],
                 ["record", "--help"], ["--help"]):
        assert main(argv) == 0
        texts.append(capsys.readouterr().out)
    joined = " ".join(" ".join(texts).split())
    assert "qwen2 GGUF" not in joined and "Qwen2 GGUF" not in joined and "PyTorch Qwen2" not in joined
    assert "GGUF file (architecture qwen2 or qwen3; others are refused)" in joined


@pytest.mark.parametrize("arch", ["llama", "qwen3moe"])
@pytest.mark.parametrize("cmd", [["report", "--tokens", "1,2"], ["zoo", "--tokens", "1,2"],
                                 ["probe", "--tokens", "1,2"], ["probe", "--source", "llama", "--tokens", "1,2"],
                                 ["record", "--tokens", "1,2", "--name", "x"]])
def test_unsupported_architecture_exits_2_in_one_line(tiny_qwen3_f32, tmp_path, capsys, arch, cmd):
    from tests.gguf_edit import rewrite
    path = rewrite(tiny_qwen3_f32, str(tmp_path / f"{arch}.gguf"), arch=arch)
    extra = ["--out-dir", str(tmp_path / "runs")] if cmd[0] == "record" else []
    rc, out, err = _cli(capsys, cmd[0], path, *cmd[1:], *extra)
    assert rc == 2 and out == "", out
    assert err == f"llamadiff: error: {path}: architecture '{arch}' is not supported (llamadiff models qwen2, qwen3)\n"
    assert not os.path.exists(tmp_path / "runs" / "x")
