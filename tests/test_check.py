"""`llamadiff check`: the example C engine (examples/qwen2_engine.c) against live llama.cpp, decided
by each op's local error (our op on the engine's own inputs against the engine's output).

The engine is compiled with gcc and run greedily (its own picks: llama.cpp is then fed exactly the
trace's tokens). Every verdict is asserted at its exact (step, layer, site)."""
from __future__ import annotations

import json
import subprocess

import pytest

from harness.check import anchors_of, not_checkable, span_of, storage_widening
from harness.cli import main
from harness.runs.store import load_run, write_trace
from harness.sites import all_sites
from harness.trace import Trace
from tests.example_engine import BUGS, build

PROMPT = "3,14,15,92,65"


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return build(tmp_path_factory.mktemp("engine") / "qwen2_engine")


def engine(exe, gguf, out, *extra, steps=2):
    r = subprocess.run([str(exe), str(gguf), str(out), "--tokens", PROMPT, "--steps", str(steps), *extra],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return out


def check(tmp_path, *args):
    js = tmp_path / "check.json"
    rc = main(["check", *map(str, args), "--format", "json", "--out", str(js)])
    return rc, (json.loads(js.read_text()) if js.exists() else None)


def first(d):
    f = d["first_divergence"]
    return f["step"], f["layer"], f["site"]


def test_clean_engine_exit_0(exe, tiny_f32, tmp_path):
    out = engine(exe, tiny_f32, tmp_path / "clean")
    rc, d = check(tmp_path, tiny_f32, out)
    assert rc == 0 and d["verdict"] == "match"
    n = len(load_run(out).trace)
    assert d["meta"]["compared"] == n and not d["meta"]["not_checkable"]
    worst_local = max(r["local_rel_l2"] for r in d["table"])
    assert worst_local < 2e-6, worst_local            # a float32 C engine: rounding-level op differences


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_planted_bug_exact_site_decided_locally(exe, tiny_f32, tmp_path, bug):
    out = engine(exe, tiny_f32, tmp_path / bug, "--bug", bug)
    rc, d = check(tmp_path, tiny_f32, out)
    assert rc == 1 and first(d) == BUGS[bug]
    assert d["first_divergence"]["kind"] == "local"


def test_bias_bug_explained_by_its_inputs(exe, tiny_f32, tmp_path):
    out = engine(exe, tiny_f32, tmp_path / "nb", "--bug", "no_qkv_bias")
    rc, d = check(tmp_path, tiny_f32, out)
    f = d["first_divergence"]
    assert [(i["site"], i["passed"]) for i in f["inputs"]] == [("blk.0.q_proj", True)]
    assert "your blk.0.q_proj matches llama.cpp, your blk.0.q does not" in f["explanation"]


def test_drift_upstream_and_bug_later_local_names_the_bug(exe, tiny_f32, tmp_path):
    """The engine holds its embeddings in bfloat16 (a numeric difference, not a bug; dumped as BF16)
    and skips the QKV biases in the last layer only. End to end, errors exceed tolerance upstream of
    the bug; the local error passes there and names the bug's exact site."""
    out = engine(exe, tiny_f32, tmp_path / "drift", "--store", "embd=bf16", "--bug", "no_qkv_bias",
                 "--bug-layer", "2")
    rc, d = check(tmp_path, tiny_f32, out)
    assert rc == 1 and first(d) == (0, 2, "blk.2.q")
    keys = [(r["step"], r["site"]) for r in d["table"]]
    e2e = tuple(d["first_end_to_end_failure"])
    assert keys.index(e2e) < keys.index((0, "blk.2.q")), e2e     # an end-to-end verdict blames drift
    before = d["table"][:keys.index((0, "blk.2.q"))]
    assert all(r["local_passed"] for r in before)
    embd = d["table"][0]
    assert embd["site"] == "embd" and "bfloat16 storage" in embd["local_tol_regime"]


def test_last_token_logits_only(exe, tiny_f32, tmp_path):
    out = engine(exe, tiny_f32, tmp_path / "last", "--last-logits")
    assert tuple(load_run(out).trace[(0, "logits")].shape)[0] == 1
    assert check(tmp_path, tiny_f32, out)[0] == 0
    bad = engine(exe, tiny_f32, tmp_path / "last_bad", "--last-logits", "--bug", "lm_head_transposed")
    rc, d = check(tmp_path, tiny_f32, bad)
    assert rc == 1 and first(d) == (0, None, "logits")


def test_sparse_trace_spans_and_not_checkable(exe, tiny_f32, tmp_path):
    """An engine without score tensors (flash attention): kqv's local error spans kq and
    attn_weights; those sites are listed as not checkable; the lane bug is found at kqv."""
    full = load_run(engine(exe, tiny_f32, tmp_path / "lane", "--bug", "q_wrong_lane")).trace
    keep = {k: t for k, t in full.tensors.items() if not k[1].endswith((".kq", ".attn_weights"))}
    sparse = write_trace(Trace(full.n_layer, full.tokens, full.n_prompt, {}, keep), tmp_path / "sparse")
    rc, d = check(tmp_path, tiny_f32, sparse)
    assert rc == 1 and first(d) == (0, 0, "blk.0.kqv")
    assert d["meta"]["not_checkable"] == ["blk.{0,1,2}.kq at every step", "blk.{0,1,2}.attn_weights at every step"]
    assert d["meta"]["local_spans"]["blk.0.kqv"] == ["blk.0.kq", "blk.0.attn_weights", "blk.0.kqv"]
    assert "local error over blk.0.kq, blk.0.attn_weights, blk.0.kqv" in d["first_divergence"]["explanation"]


def test_recorded_reference_instead_of_gguf(exe, tiny_f32, tmp_path):
    out = engine(exe, tiny_f32, tmp_path / "eng", "--bug", "kv_pos_stuck")
    toks = json.loads((out / "manifest.json").read_text())["tokens"]
    assert main(["record", str(tiny_f32), "--tokens", PROMPT, "--steps", "2", "--name", "ref",
                 "--out-dir", str(tmp_path)]) == 0
    if json.loads((tmp_path / "ref" / "manifest.json").read_text())["tokens"] != toks:
        pytest.skip("the buggy engine picked other tokens than llama.cpp's greedy ones")   # pragma: no cover
    rc, d = check(tmp_path, tmp_path / "ref", out, "--gguf", tiny_f32)
    assert rc == 1 and first(d) == BUGS["kv_pos_stuck"]


def test_bad_input_exit_2_one_line(exe, tiny_f32, tiny_qwen3_f32, tmp_path, capsys):
    out = engine(exe, tiny_f32, tmp_path / "e")
    for args in ([tiny_f32, tmp_path / "missing"],                 # no trace there
                 [tmp_path / "nofile.gguf", out],                   # no GGUF
                 [tiny_qwen3_f32, out],                             # another model
                 [tiny_f32]):                                       # no trace given
        capsys.readouterr()
        assert main(["check", *map(str, args)]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("llamadiff: error:"), (args, err)


# -- the pieces ------------------------------------------------------------------------------------
def test_anchors_and_spans_walk_through_missing_sites():
    present = set(all_sites(2)) - {"blk.1.kq", "blk.1.attn_weights", "blk.0.l_out"}
    assert anchors_of("blk.1.kqv", present) == ["blk.1.v", "blk.1.q_rope", "blk.1.k_rope"]
    assert span_of("blk.1.kqv", present) == ["blk.1.kq", "blk.1.attn_weights", "blk.1.kqv"]
    assert anchors_of("blk.1.attn_norm", present) == ["blk.0.ffn_inp", "blk.0.ffn_out"]
    assert anchors_of("blk.0.attn_norm", present) == ["embd"]
    assert span_of("blk.0.q", present) == ["blk.0.q"]


def test_storage_widening_per_site():
    sites = all_sites(1)
    w = storage_widening({(0, "blk.0.attn_norm"): "bfloat16", (1, "blk.0.attn_norm"): "float32",
                          (0, "blk.0.q"): "float16"}, sites)
    assert w[("blk.0.attn_norm", "e2e")] == w[("blk.0.attn_norm", "local")] == "bfloat16"
    assert w[("blk.0.q_proj", "local")] == "bfloat16" and ("blk.0.q_proj", "e2e") not in w
    assert w[("blk.0.q", "e2e")] == "float16" and ("blk.0.q_rope", "e2e") not in w
    assert w[("blk.0.q_rope", "local")] == "float16"
    assert ("blk.0.kq", "local") not in w and ("embd", "local") not in w


def test_not_checkable_lines():
    eng = Trace(2, [1, 2, 3], 2)
    for step in (0, 1):
        for s in all_sites(2):
            if not s.endswith(".kq") and not (s == "logits" and step == 1) and s != "blk.1.k":
                eng.tensors[(step, s)] = 0
    assert not_checkable(all_sites(2), [0, 1], eng) == ["blk.{0,1}.kq at every step", "blk.1.k at every step",
                                                        "logits at decode step 1"]


@pytest.mark.gpu
@pytest.mark.parametrize("bug", [None, "no_qkv_bias", "kv_pos_stuck"])
def test_check_on_cuda(exe, tiny_f32, tmp_path, bug):
    """`check --device cuda`: llama.cpp's CUDA build and our ops on the GPU, the trace from the C engine."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from harness.llama.lib import has_gpu_offload
    if not has_gpu_offload():
        pytest.skip("llama-cpp-python has no GPU offload in this build")
    out = engine(exe, tiny_f32, tmp_path / "e", *(["--bug", bug] if bug else []))
    rc, d = check(tmp_path, tiny_f32, out, "--device", "cuda")
    assert d["meta"]["ref"]["backend"] == "cuda"
    if bug is None:
        assert rc == 0, d["first_divergence"]
    else:
        assert rc == 1 and first(d) == BUGS[bug]


def test_transformers_candidate(tiny_f32, tmp_path):
    """`check --candidate hf`: transformers' model of the GGUF (its own GGUF reader) per op against
    llama.cpp: clean exit 0; a bias element zeroed in transformers' layer 1 is found at blk.1.q."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    import torch
    from harness.check import CheckRequest, check as check_lib
    from harness.hf.trace import hf_trace, load_hf
    rc, d = check(tmp_path, tiny_f32, "--candidate", "hf", "--tokens", PROMPT, "--steps", "2")
    assert rc == 0 and d["meta"]["ours"]["source"] == "transformers"
    assert max(r["local_rel_l2"] for r in d["table"]) < 1e-6
    hfm = load_hf(tiny_f32)
    with torch.no_grad():
        hfm.model.model.layers[1].self_attn.q_proj.bias[5] = 0.0
    cand = hf_trace(hfm, [int(t) for t in PROMPT.split(",")], 2)
    res = check_lib(CheckRequest(gguf=str(tiny_f32)), candidate=cand)
    f = res.comparison.first
    assert (f.step, f.layer, f.site) == (0, 1, "blk.1.q") and f.kind == "local"
    assert "transformers' blk.1.q_proj matches llama.cpp" in f.explanation


def test_systematic_error_below_the_tolerance_in_an_engine(synth_dir, llama_lib, tmp_path):
    """An engine (our model's own trace, written as another engine would) whose one Q8_0 matmul
    scales its output by 1 + 1e-4: every element is within the 1% element-wise tolerance, and the
    systematic statistics name the op, in the engine's terms."""
    from harness.ours.model import load_model
    from harness.synth import default_fixture
    gguf = default_fixture("q8_0", preset="tiny", seed=0, cache_dir=synth_dir)
    model = load_model(gguf)

    def scale(x, ctx):
        return x * (1 + 1e-4) if ctx.step == 0 else None
    prompt = [int(t) for t in PROMPT.split(",")]
    with model.hooks([("blk.1.ffn_up", scale)]):
        trace = model.run_with_cache(prompt, 2)
    out = write_trace(trace, tmp_path / "eng", engine={"name": "scaled-engine", "kv_type": "f32"})
    rc, d = check(tmp_path, gguf, out)
    f = d["first_divergence"]
    assert rc == 1 and first(d) == (0, 1, "blk.1.ffn_up")
    assert f["row"]["local_elem_passed"] is True and f["row"]["sys_passed"] is False
    assert "systematic (slope: expected = (1 -0.0001) x yours" in f["explanation"], f["explanation"]
