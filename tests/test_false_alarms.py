"""benchmarks/false_alarms.py keeps its contract: clean runs on fresh seeds and prompts, exit 0
when none diverges, 1 when one does (named with its first divergence), 2 in one line on bad input."""
import importlib.util
import json
import pathlib
import sys

import pytest

from harness.ours.inject import REGISTRY

SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "false_alarms.py"


@pytest.fixture(scope="module")
def fa():
    spec = importlib.util.spec_from_file_location("false_alarms", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["false_alarms"] = mod          # its dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("false_alarms", None)


ARGS = ["--presets", "tiny", "--types", "f32", "--seeds", "1", "--prompts-per-seed", "1", "--steps", "2",
        "--max-prompt", "12", "--long", "0", "--keep-fixtures"]


def test_clean_runs_exit_0_and_a_divergent_one_exits_1(fa, synth_dir, llama_lib, tmp_path, capsys, monkeypatch):
    out = tmp_path / "fa.json"
    assert fa.main(ARGS + ["--cache-dir", str(synth_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| cpu/tiny/f32 | 1 | 1 | 2 | 0 | 0 | 0 | 0 |" in printed
    res = json.loads(out.read_text())["regimes"][0]
    assert res["runs"] == 1 and res["divergences"] == 0 and res["steps"] == 2
    assert {r for r in res["headroom"]} >= {"matmul", "norm", "softmax", "logits"} and max(res["headroom"].values()) < 1
    assert all(2 <= n <= 12 for n in res["prompt_lens"])
    # the same runs with a real bug on our side: the run is a divergence, exit 1, named with its first divergence
    real = fa.diff_gguf
    monkeypatch.setattr(fa, "diff_gguf", lambda req, **kw: real(
        type(req)(req.gguf, tokens=req.tokens, steps=req.steps, faults=[REGISTRY["drop_qkv_bias"]]), **kw))
    assert fa.main(ARGS + ["--cache-dir", str(synth_dir)]) == 1
    printed = capsys.readouterr().out
    assert "| cpu/tiny/f32 | 1 | 1 | 2 | 1 | 1 |" in printed
    assert printed.count("FALSE ALARM cpu/tiny/f32 seed 100") == 1 and "blk.0.q at prefill" in printed


def test_fresh_seeds_and_prompts_only(fa, capsys):
    assert fa.main(["--first-seed", "2"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    import numpy as np
    from harness import calibrate
    prompts = fa.random_prompts(np.random.default_rng(0), 50, 1000, 40)
    assert len(prompts) == 50 and not any(p in calibrate.PROMPTS for p in prompts)
    assert min(map(len, prompts)) >= 2 and max(map(len, prompts)) <= 40 and max(max(p) for p in prompts) < 1000
