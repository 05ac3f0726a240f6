"""The example C engine (examples/qwen2_engine.c) against llama.cpp on the tiny F32 qwen2 fixture.

The engine is compiled with gcc, llama.cpp is recorded (prefill + 2 decode steps, F32 KV cache),
the engine runs on exactly the recorded tokens, and `llamadiff compare` (end to end) must give:
the clean engine exit 0 (and greedy picks equal to llama.cpp's); each planted bug exit 1 with the
first end-to-end failure at the bug's first wrong op, (step, layer, site) exactly."""
from __future__ import annotations

import json
import subprocess

import pytest

from harness.cli import main
from tests.example_engine import BUGS, SRC, build

PROMPT = [3, 14, 15, 92, 65]
STEPS = 2


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_f32, llama_lib):
    tmp = tmp_path_factory.mktemp("example_engine")
    exe = build(tmp / "qwen2_engine")
    rc = main(["record", str(tiny_f32), "--tokens", ",".join(map(str, PROMPT)), "--steps", str(STEPS),
               "--kv-type", "f32", "--name", "ref", "--out-dir", str(tmp)])
    assert rc == 0
    m = json.loads((tmp / "ref" / "manifest.json").read_text())
    return exe, tiny_f32, tmp, m


def engine(built, name, *extra):
    exe, gguf, tmp, m = built
    out = tmp / name
    prompt = m["tokens"][:m["n_prompt"]]
    r = subprocess.run([str(exe), str(gguf), str(out), "--tokens", ",".join(map(str, prompt)),
                        "--steps", str(len(m["tokens"]) - m["n_prompt"]), *extra],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return out


def compare(built, out):
    tmp = built[2]
    js = tmp / f"{out.name}.json"
    rc = main(["compare", str(tmp / "ref"), str(out), "--format", "json", "--out", str(js)])
    return rc, json.loads(js.read_text())


def test_clean_engine_matches_llama_cpp(built):
    m = built[3]
    out = engine(built, "clean")                       # greedy
    assert json.loads((out / "manifest.json").read_text())["tokens"] == m["tokens"]  # same greedy picks
    rc, d = compare(built, out)
    worst = max(row["rel_l2"] for row in d["table"])
    assert rc == 0 and d["verdict"] == "match", (d["first_end_to_end_failure"], worst)
    assert len(d["table"]) == len(m["tensors"])       # every recorded (step, site) was compared
    assert worst < 1e-5


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_planted_bug_first_divergence(built, bug):
    m = built[3]
    forced = ",".join(map(str, m["tokens"][m["n_prompt"]:]))  # teacher-forced on llama.cpp's picks
    out = engine(built, bug, "--bug", bug, "--decode-tokens", forced)
    rc, d = compare(built, out)
    assert rc == 1
    first = d["first_divergence"]
    assert (first["step"], first["layer"], first["site"]) == BUGS[bug]
    assert d["first_end_to_end_failure"] == [BUGS[bug][0], BUGS[bug][2]]


def test_bad_input_one_line(built, tmp_path):
    exe, gguf = built[0], built[1]
    for args in ([str(tmp_path / "missing.gguf"), str(tmp_path / "o"), "--tokens", "1", "--steps", "1"],
                 [str(gguf), str(tmp_path / "o"), "--tokens", "1,x", "--steps", "1"],
                 [str(gguf), str(tmp_path / "o"), "--tokens", "1", "--steps", "1", "--bug", "nope"],
                 [str(gguf), str(tmp_path / "o"), "--tokens", "99999", "--steps", "1"],
                 [str(SRC), str(tmp_path / "o"), "--tokens", "1", "--steps", "1"]):
        r = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert not (tmp_path / "o").exists()


def test_tied_output_reads_token_embd(built, tiny_tied_f32, tmp_path):
    """Without output.weight the engine's LM head is token_embd (as llama.cpp's): still a match."""
    exe = built[0]
    assert main(["record", str(tiny_tied_f32), "--tokens", "3,14,15", "--steps", "1", "--kv-type", "f32",
                 "--name", "reft", "--out-dir", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "reft" / "manifest.json").read_text())
    r = subprocess.run([str(exe), str(tiny_tied_f32), str(tmp_path / "eng"), "--tokens", "3,14,15", "--steps", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "eng" / "manifest.json").read_text())["tokens"] == m["tokens"]
    assert main(["compare", str(tmp_path / "reft"), str(tmp_path / "eng"), "--format", "json",
                 "--out", str(tmp_path / "c.json")]) == 0
