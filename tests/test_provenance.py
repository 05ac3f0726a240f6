"""harness.provenance: what every trace, recorded run and report says about where it came from."""
import json
import os

import pytest

from harness.cli import main
from harness.provenance import (CPU_MODEL_NOTE, EXTRA_BUFTS_NOTE, ISA_FLAGS, cpu_info, from_engine, machine_provenance,
                                numerics_differences, summary_line)
from harness.runs.record import record
from harness.runs.store import load_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32_RUN = os.path.join(ROOT, "reference_runs", "tiny-f32")
LLAMA_KEYS = ("llama_cpp_python", "system_info", "backend", "extra_bufts", "kv_type", "flash_attn", "cpu_model",
              "platform", "python", "torch")
BASE = {"llama_cpp_python": "0.3.36", "backend": "cpu", "extra_bufts": False, "kv_type": "f16",
        "flash_attn": False, "cpu_model": "AMD EPYC", "cpu_flags": ["avx", "avx2", "f16c", "fma"]}


def _json_plain(x) -> bool:
    return json.loads(json.dumps(x)) == x


# -- pure functions ------------------------------------------------------------------------------
def test_identical_provenances_have_no_difference():
    assert numerics_differences(BASE, dict(BASE)) == []
    assert numerics_differences({}, BASE) == [] and numerics_differences(BASE, {}) == []   # unknown: no claim


@pytest.mark.parametrize("key, value, words", [
    ("backend", "cuda", "backend: recorded cpu, here cuda"),
    ("kv_type", "f32", "KV cache type: recorded f16, here f32"),
    ("extra_bufts", True, "extra buffer types (CPU weight repacking): recorded off, here on"),
    ("flash_attn", True, "flash attention: recorded off, here on"),
    ("cpu_model", "Intel(R) Xeon(R) Platinum 8480+", "CPU: recorded on 'AMD EPYC', here 'Intel"),
    ("cpu_flags", ["avx", "avx2", "f16c", "fma", "amx_int8"],
     "CPU: kernel-selecting features only recorded: -, only here: amx_int8"),
    ("llama_cpp_python", "0.3.40", "llama-cpp-python: recorded 0.3.36, here 0.3.40"),
])
def test_each_numerics_moving_change_is_one_line(key, value, words):
    lines = numerics_differences(BASE, {**BASE, key: value})
    assert len(lines) == 1 and words in lines[0], lines
    if key.startswith("cpu"):
        assert "numerics may differ by about 1e-4 relative" in lines[0]


def test_cpu_model_and_features_make_one_line():
    other = {**BASE, "cpu_model": "Intel(R) Xeon(R) Platinum 8480+", "cpu_flags": BASE["cpu_flags"][1:]}
    lines = numerics_differences(BASE, other)
    assert lines == [f"CPU: recorded on 'AMD EPYC', here 'Intel(R) Xeon(R) Platinum 8480+'; kernel-selecting "
                     f"features only recorded: avx, only here: -: llama.cpp's CPU results differ between CPU "
                     f"models, numerics may differ by {CPU_MODEL_NOTE}"]


def test_cpu_differences_do_not_count_between_gpu_runs():
    cuda = {**BASE, "backend": "cuda", "gpu_names": ["NVIDIA H100 80GB HBM3"]}
    assert numerics_differences(cuda, {**cuda, "cpu_model": "other"}) == []
    lines = numerics_differences(cuda, {**cuda, "gpu_names": ["NVIDIA H200"]})
    assert len(lines) == 1 and lines[0].startswith("GPU: recorded on NVIDIA H100")


def test_machine_provenance_is_plain_json_and_knows_this_cpu():
    m = machine_provenance("cpu")
    assert _json_plain(m)
    assert m["cpu_model"] == cpu_info()[0] and m["torch"] and m["python"] and m["platform"]
    assert "gpu_names" not in m
    if os.path.exists("/proc/cpuinfo"):
        assert set(m["cpu_flags"]) <= set(ISA_FLAGS)
        flags = open("/proc/cpuinfo").read()
        assert ("avx2" in m["cpu_flags"]) == (" avx2" in flags)
    m["cpu_model"] = "changed"
    assert machine_provenance("cpu")["cpu_model"] == cpu_info()[0]    # callers get copies


def test_old_manifest_provenance_is_partial_not_an_error():
    run = load_run(F32_RUN)
    p = run.provenance
    assert "provenance" not in run.manifest["engine"]
    assert p["partial"] is True and p["backend"] == "cpu" and p["kv_type"] == "f16"
    assert p["cpu_model"] == run.engine["device_name"] and "extra_bufts" not in p   # unknown
    line = summary_line(run.trace.meta)
    assert "backend cpu" in line and "extra buffer types ?" in line and "partial" in line
    assert summary_line({"source": "numpy-engine"}) == "reference provenance: unknown (not recorded with the trace)"
    assert from_engine({"provenance": {"backend": "cuda"}, "backend": "cpu"}) == {"backend": "cuda"}


# -- live llama.cpp ------------------------------------------------------------------------------
def test_live_capture_and_recorded_run_carry_the_provenance(tiny_f32, llama_lib, tmp_path):
    res = record(tiny_f32, "prov", tokens=[1, 2, 3], steps=1, out_dir=tmp_path, sites="logits")
    eng = res.manifest["engine"]
    p = eng["provenance"]
    for key in LLAMA_KEYS:
        assert key in p, key
    assert _json_plain(p)
    assert p["backend"] == "cpu" and p["extra_bufts"] is False and eng["extra_bufts"] is False
    assert p["kv_type"] == "f16" and p["flash_attn"] is False
    assert p["llama_cpp_python"] == llama_lib.__version__ and "CPU" in p["system_info"]
    assert p["cpu_model"] == cpu_info()[0]
    run = load_run(res.path)
    assert run.provenance == p and run.trace.meta["provenance"] == p
    assert numerics_differences(run.provenance, llama_provenance_here(llama_lib)) == []


def llama_provenance_here(lc):
    from harness.llama.runner import LlamaOptions
    from harness.provenance import llama_provenance
    return llama_provenance(lc, gpu=False, options=LlamaOptions())


def test_json_and_markdown_reports_carry_the_provenance(tiny_f32, llama_lib, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["report", tiny_f32, "--tokens", "1,2,3", "--steps", "1", "--sites", "logits",
                 "--format", "json", "--out", str(out)]) == 0
    meta = json.loads(out.read_text())["meta"]
    for key in LLAMA_KEYS:
        assert key in meta["ref"]["provenance"], key
    assert meta["ref"]["provenance"]["extra_bufts"] is False
    assert meta["ours"]["machine"]["cpu_model"] == cpu_info()[0]
    capsys.readouterr()
    assert main(["report", tiny_f32, "--tokens", "1,2,3", "--steps", "1", "--sites", "logits",
                 "--format", "markdown"]) == 0
    md = capsys.readouterr().out
    want = (f"- reference provenance: llama-cpp-python {llama_lib.__version__}, backend cpu, CPU {cpu_info()[0]}, "
            "extra buffer types off, KV f16, flash attn off")
    assert want in md.splitlines()
    assert EXTRA_BUFTS_NOTE not in md


def test_header_says_when_the_reference_used_extra_buffer_types(tmp_path, capsys):
    """A recorded run whose llama.cpp repacked weights: the report says the tolerances do not cover it."""
    import shutil
    run = tmp_path / "r"
    shutil.copytree(F32_RUN, run)
    m = json.loads((run / "manifest.json").read_text())
    m["engine"]["provenance"] = {**BASE, "extra_bufts": True}
    (run / "manifest.json").write_text(json.dumps(m))
    assert main(["compare", str(run), F32_RUN, "--format", "markdown"]) == 0
    md = capsys.readouterr().out
    assert "extra buffer types on" in md and f"- {EXTRA_BUFTS_NOTE}" in md.splitlines()
