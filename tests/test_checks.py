"""Reference-free probes: each fires on the fault it targets and stays quiet on clean traces,
ours and llama.cpp's, on every weight type; the probe command keeps its exit codes."""
import json

import pytest
import torch

from harness.cli import main
from probes.checks import CHECKS, fired, run_checks, summarize
from probes.context import probe_trace
from harness.ours.inject import REGISTRY, Fault

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]
STEPS = 2

TARGETS = [  # (probe, the zoo fault it must catch)
    ("attention_rows", "causal_mask_missing"),
    ("kv_positions", "kv_pos_stuck"),
    ("rope_pair_norm", "rope_interleaved"),
    ("rope_relative", "decode_pos_off_by_one"),
    ("rope_frequency", "rope_base_wrong"),
    ("logit_spikes", "vocab_tail_garbage"),
    ("hidden_norms", "fp16_softmax_overflow"),
    ("residual_adds", "residual_dropped_mid"),
    ("matmul_layout", "qkv_weight_transposed"),
    ("matmul_layout", "lm_head_transpose"),
]
QWEN3_PROBES = {"head_norms"}   # nothing to check on qwen2; their targets are in tests/test_qwen3.py


@pytest.fixture(scope="module")
def torch_model(tiny_f32):
    from harness.ours.model import load_model
    return load_model(tiny_f32, kv_dtype=torch.float16)


def _torch_records(model, faults=(), checks=None):
    with model.hooks([h for f in faults for h in f.hooks]):
        trace = model.run_with_cache(PROMPT, STEPS)
    return run_checks(trace, model, checks)


def _quiet(records):
    bad = [r for r in records if not r["passed"]]
    return "\n".join(f"{r['name']} {r['site']}@{r['step']}: {r['detail']}" for r in bad[:5])


def test_every_probe_has_a_target():
    assert {p for p, _ in TARGETS} == set(CHECKS) - QWEN3_PROBES


def test_clean_torch_trace_is_quiet(torch_model):
    records = _torch_records(torch_model)
    assert not fired(records), _quiet(records)
    assert {r["name"] for r in records} == set(CHECKS) - QWEN3_PROBES   # every qwen2 probe had something to check


@pytest.mark.parametrize("probe, fault", TARGETS)
def test_probe_fires_on_its_fault(torch_model, probe, fault):
    records = _torch_records(torch_model, [REGISTRY[fault]], [probe])
    bad = [r for r in records if not r["passed"]]
    assert bad, f"{probe} stayed quiet on {fault}"
    first = bad[0]
    if fault in ("causal_mask_missing", "rope_interleaved", "rope_base_wrong", "qkv_weight_transposed"):
        assert (first["step"], first["site"].split(".")[1]) == (0, "0")           # prefill, layer 0
    if fault in ("kv_pos_stuck", "decode_pos_off_by_one"):
        assert first["step"] == 1 and all(r["step"] >= 1 for r in bad)           # decode only
    if fault == "residual_dropped_mid":
        assert {r["site"] for r in bad} == {"blk.1.ffn_inp"}
    if fault == "vocab_tail_garbage":
        assert "padded [PAD] tail" in first["detail"] and "token 10" in first["detail"]


def test_layout_probe_names_the_layout(torch_model):
    recs = _torch_records(torch_model, [REGISTRY["qkv_weight_transposed"]], ["matmul_layout"])
    bad = [r for r in recs if not r["passed"]]
    assert {r["site"].rsplit(".", 1)[1] for r in bad} == {"q_proj"}
    assert all("matches with the weight transposed" in r["detail"] for r in bad)
    recs = _torch_records(torch_model, [REGISTRY["lm_head_transpose"]], ["matmul_layout"])
    bad = [r for r in recs if not r["passed"]]
    assert [r["site"] for r in bad] == ["logits"] * (STEPS + 1)
    assert "wrong leading dimension" in bad[0]["detail"]

    def layer2_weight_in_layer1(x, ctx):
        if ctx.layer == 1:
            return (ctx.inputs["x"] @ ctx.model.gguf.weights["blk.2.ffn_up.weight"].T).view(x.shape)
    wrong = Fault("wrong_layer", [("blk.*.ffn_up", layer2_weight_in_layer1)])
    bad = [r for r in _torch_records(torch_model, [wrong], ["matmul_layout"]) if not r["passed"]]
    assert bad and "matches layer 2's ffn_up.weight" in bad[0]["detail"]


def test_probe_values_are_reported(torch_model):
    summary = summarize(_torch_records(torch_model, [REGISTRY["vocab_tail_garbage"]]))
    row = next(s for s in summary if s["name"] == "logit_spikes")
    assert row["fired"] and row["value"] > 20 and "logit" in row["detail"]
    assert [s["name"] for s in summary] == list(CHECKS)


def test_clean_llama_trace_is_quiet(tiny_gguf):
    trace, path = probe_trace(tiny_gguf, "llama", tokens=PROMPT, steps=STEPS)
    records = run_checks(trace, path)
    assert not fired(records), _quiet(records)
    trace, model = probe_trace(tiny_gguf, "torch", tokens=PROMPT, steps=STEPS)
    records = run_checks(trace, model)
    assert not fired(records), _quiet(records)


def test_probe_cli_exit_codes(tiny_f32, capsys):
    toks = ",".join(map(str, PROMPT))
    assert main(["probe", tiny_f32, "--source", "llama", "--tokens", toks, "--steps", "1"]) == 0
    assert "all probes quiet" in capsys.readouterr().out
    rc = main(["probe", tiny_f32, "--tokens", toks, "--steps", "1", "--inject", "causal_mask_missing",
               "--format", "json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 1 and data["fired"] == ["attention_rows"]
    assert data["meta"]["faults"] == ["causal_mask_missing"] and data["records"]
    rc = main(["probe", tiny_f32, "--tokens", toks, "--steps", "1", "--inject", "kv_pos_stuck",
               "--checks", "kv_positions", "--format", "markdown"])
    out = capsys.readouterr().out
    assert rc == 1 and "| kv_positions | FIRED |" in out


@pytest.mark.parametrize("argv, message", [
    (["probe", "{f32}", "--source", "llama", "--inject", "kv_pos_stuck"], "only be injected into the PyTorch"),
    (["probe", "{f32}", "--checks", "nope"], "unknown probe"),
    (["probe", "{f32}", "--tokens", "1,99999"], "out of range"),
    (["probe", "{f32}", "--tokens", "1", "--steps", "-2"], "--steps must be >= 0"),
    (["probe", "{f32}", "--inject", "nope"], "unknown fault"),
    (["probe", "/nonexistent.gguf"], "no such file"),
])
def test_probe_bad_input_exits_2(tiny_f32, capsys, argv, message):
    rc = main([a.replace("{f32}", tiny_f32) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and err.count("\n") == 0
