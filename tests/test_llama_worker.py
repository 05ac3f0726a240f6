"""llama.cpp in a worker process (harness.llama.worker): same traces, and a crash never kills the caller."""
import ctypes
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("llama_cpp")

from harness.llama import worker as llama_worker  # noqa: E402
from harness.llama.runner import LlamaError, LlamaOptions, LlamaRunner  # noqa: E402
from harness.llama.worker import IsolatedRunner, LlamaCrash, open_runner, run_isolated  # noqa: E402
from harness.sites import SiteFilter  # noqa: E402

PROMPT = [5, 17, 300, 42, 99, 7]
AMX = "amx_int8" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else False


# module-level, so that the worker can unpickle them by name
def _segfault():
    ctypes.string_at(0)


def _abort():
    os.abort()


def _oom_kill():
    os.kill(os.getpid(), signal.SIGKILL)


def _pid():
    return os.getpid()


@pytest.fixture
def rope_too_wide(tmp_path, tiny_f32):
    """A GGUF our header checks accept but llama.cpp aborts on: RoPE over 128 dimensions of
    64-wide heads (GGML_ASSERT(n_embd_head == n_rot) in its qwen2 graph, built with the context)."""
    from tests.gguf_edit import rewrite
    return rewrite(tiny_f32, tmp_path / "rope128.gguf", set_keys={"qwen2.rope.dimension_count": 128})


def test_isolated_trace_equals_in_process(tiny_f32):
    opts = LlamaOptions(kv_type="f32")
    with LlamaRunner(tiny_f32, LlamaOptions(kv_type="f32", isolate=False)) as r:
        here = r.run(PROMPT, 2)
    with open_runner(tiny_f32, opts) as r:
        assert isinstance(r, IsolatedRunner) and r.n_vocab == 1024
        there = r.run(PROMPT, 2)
        assert r.tokenize("hello") == LlamaRunner(tiny_f32, LlamaOptions(isolate=False)).tokenize("hello")
    assert there.tokens == here.tokens and there.n_prompt == here.n_prompt
    assert set(there.tensors) == set(here.tensors) and len(here) > 0
    for key, x in here.tensors.items():
        assert torch.equal(there[key], x), key
    assert there.meta["isolated"] is True and there.meta["extra_bufts"] is False


def test_streaming_sink_gets_every_step(tiny_f32):
    seen = []
    with open_runner(tiny_f32, LlamaOptions()) as r:
        tr = r.run(PROMPT, 3, sink=lambda s, n, x: seen.append((s, n)), filt=SiteFilter("logits"))
    assert seen == [(s, "logits") for s in range(4)] and len(tr) == 0


def test_clean_errors_come_back_and_the_worker_stays(tiny_f32):
    with open_runner(tiny_f32, LlamaOptions()) as r:
        pid = run_isolated(_pid)
        with pytest.raises(LlamaError, match="token id 5000 out of range") as e:
            r.run([5, 5000])
        assert not isinstance(e.value, LlamaCrash)
        assert run_isolated(_pid) == pid
        assert len(r.run(PROMPT, 0, filt=SiteFilter("logits"))) == 1


@pytest.mark.parametrize("fn, sig", [(_segfault, "SIGSEGV"), (_abort, "SIGABRT"), (_oom_kill, "SIGKILL")])
def test_worker_crash_is_an_exception_and_the_next_call_works(fn, sig, tiny_f32):
    before = run_isolated(_pid)
    with pytest.raises(LlamaCrash, match=sig) as e:
        run_isolated(fn)
    assert "\n" not in str(e.value)
    if sig == "SIGKILL":
        assert "out of memory" in str(e.value)
    assert run_isolated(_pid) != before          # a fresh worker
    with open_runner(tiny_f32, LlamaOptions()) as r:
        assert len(r.run(PROMPT, 0, filt=SiteFilter("logits"))) == 1


def test_real_llama_abort_names_stage_and_assert(rope_too_wide):
    with pytest.raises(LlamaCrash) as e:
        with open_runner(rope_too_wide, LlamaOptions()) as r:
            r.run(PROMPT, 1)
    msg = str(e.value)
    assert msg.startswith("llama.cpp crashed (SIGABRT) at context creation of rope128.gguf: qwen2.cpp:")
    assert "GGML_ASSERT(n_embd_head == n_rot) failed" in msg and "\n" not in msg


def test_a_runner_whose_worker_died_refuses_further_use(tiny_f32):
    r = IsolatedRunner(tiny_f32, LlamaOptions())
    with pytest.raises(LlamaCrash, match="SIGSEGV"):
        run_isolated(_segfault)
    with pytest.raises(LlamaError, match="worker of this runner is gone"):
        r.run(PROMPT)
    r.close()


def test_notebook_api_survives_a_llama_crash(rope_too_wide, tiny_f32):
    import harness
    with pytest.raises(LlamaCrash, match="SIGABRT"):
        harness.drilldown(rope_too_wide, tokens=PROMPT, steps=1)
    run = harness.drilldown(tiny_f32, tokens=PROMPT, steps=1)       # this process lives on
    assert not run.comparison.diverged


CLI_ARGS = {"report": ["--tokens", "5,17,300", "--steps", "2"],
            "zoo": ["--tokens", "5,17,300", "--steps", "2", "--faults", "drop_qkv_bias"],
            "probe": ["--tokens", "5,17,300", "--steps", "2", "--source", "llama"],
            "record": ["--tokens", "5,17,300", "--steps", "2", "--name", "crash"]}
SITECUSTOMIZE = """
import os
if os.environ.get("SEGV_AT_DECODE_CALL"):   # test only: the n-th llama_decode of a process segfaults
    import ctypes, llama_cpp
    real, calls = llama_cpp.llama_decode, [0]
    def llama_decode(ctx, batch):
        calls[0] += 1
        if calls[0] == int(os.environ["SEGV_AT_DECODE_CALL"]):
            ctypes.string_at(0)
        return real(ctx, batch)
    llama_cpp.llama_decode = llama_decode
"""


def _cli(command, model, out_dir, env=None):
    args = CLI_ARGS[command] + (["--out-dir", str(out_dir)] if command == "record" else [])
    return subprocess.run([sys.executable, "-m", "harness.cli", command, str(model), *args],
                          capture_output=True, text=True, timeout=300, env=env)


def _one_line(p, start):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), p.stderr[-2000:]
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("command", ["report", "zoo", "probe", "record"])
def test_cli_llama_abort_exits_2_with_one_line(command, rope_too_wide, tmp_path):
    out = tmp_path / "runs"
    _one_line(_cli(command, rope_too_wide, out),
              "llamadiff: error: llama.cpp crashed (SIGABRT) at context creation of rope128.gguf")


@pytest.mark.parametrize("command", ["report", "record"])
def test_cli_segfault_mid_run_exits_2_and_leaves_nothing(command, tiny_f32, tmp_path):
    """A SIGSEGV inside llama_decode at decode step 1, after the prefill's tensors were written."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, SEGV_AT_DECODE_CALL="2",
               PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "runs"
    _one_line(_cli(command, tiny_f32, out, env),
              "llamadiff: error: llama.cpp crashed (SIGSEGV) at decode step 1 of tiny-f32-s0.gguf")
    if command == "record":
        assert not out.exists() or os.listdir(out) == []          # nothing half-written


@pytest.mark.parametrize("wtype", ["q8_0", "q4_k_m"])
def test_extra_bufts_opt_in_works_or_fails_cleanly(wtype, synth_dir):
    """llama.cpp's own default (weights repacked into extra buffer types: AMX on Sapphire Rapids
    and later, x86/ARM repack of Q4_K elsewhere). On an AMX CPU this may crash in llama_decode:
    in the worker that is a LlamaCrash naming the decode step, never a dead test process."""
    from harness.synth import default_fixture
    path = default_fixture(wtype, preset="tiny", seed=0, cache_dir=synth_dir)
    try:
        with open_runner(path, LlamaOptions(extra_bufts=True)) as r:
            tr = r.run(PROMPT, 1, filt=SiteFilter("logits"))
    except LlamaCrash as e:        # one line naming the signal and the stage, whichever it was
        assert re.match(r"llama\.cpp crashed \(\w+( \w+)?\) at (load|context creation|decode step \d|capture step \d)",
                        str(e)) and "\n" not in str(e), str(e)
        return
    assert tr.meta["extra_bufts"] is True and tr[1, "logits"].shape == (1, 1024)
    assert torch.isfinite(tr[1, "logits"]).all()


@pytest.mark.skipif(not AMX, reason="this CPU has no AMX-INT8: llama.cpp's AMX buffer type is never used here")
def test_amx_default_off_is_what_runs(synth_dir):
    """On an AMX CPU, the default (no extra buffer types) runs the quantized fixture cleanly."""
    from harness.synth import default_fixture
    path = default_fixture("q8_0", preset="tiny", seed=0, cache_dir=synth_dir)
    with open_runner(path, LlamaOptions()) as r:
        tr = r.run(PROMPT, 2, filt=SiteFilter("logits"))
    assert torch.isfinite(tr[2, "logits"]).all()


def test_stop_worker_then_restart(tiny_f32):
    run_isolated(_pid)
    llama_worker.stop_worker()
    assert llama_worker.worker_if_alive() is None
    assert isinstance(run_isolated(_pid), int)
