"""The memory budget (harness.budget): estimates from the shapes, refusal with what would fit,
micro-batch sizing; and the command line's exit 2 in one line for a run that cannot fit or an
out-of-memory that happens anyway. Nothing large is allocated: available memory is faked."""
from dataclasses import replace

import pytest

from harness.budget import (GiB, WORKING_SET, BudgetError, Plan, auto_ubatch, check, estimate, parse_size,
                            suggestions, working_set)
from harness.cli import main
from harness.synth import PRESETS

CFG = PRESETS["qwen2.5-0.5b"].config()
GPU_PLAN = Plan(4096, 2, device="cuda", our_weight_bytes=2 * GiB, llama_weight_bytes=GiB)


def test_estimate_grows_with_the_prompt_and_micro_batches_bound_it():
    sizes = [estimate(CFG, replace(GPU_PLAN, n_prompt=n)).gpu for n in (512, 2048, 4096)]
    assert sizes[0] < sizes[1] < sizes[2]
    # whole traces: the attention sites grow as T x P; at 4096 tokens past the 80% of an 80 GB
    # card that a run takes without micro-batches (auto_ubatch)
    assert sizes[2] > 0.8 * 80 * GiB > estimate(CFG, replace(GPU_PLAN, n_prompt=2048)).gpu
    small = estimate(CFG, replace(GPU_PLAN, ubatch=256))
    assert small.gpu < 16 * GiB and small.host < 4 * GiB
    assert "captured tensors (one batch)" in small.parts


def test_check_refuses_with_the_estimate_and_what_would_fit():
    with pytest.raises(BudgetError) as e:
        check(CFG, GPU_PLAN, host=64 * GiB, gpu=60 * GiB)
    msg = str(e.value)
    assert "\n" not in msg and "needs about" in msg and "GPU 60.0 GiB" in msg
    assert "micro-batches of" in msg and "a prompt of at most" in msg
    assert check(CFG, replace(GPU_PLAN, ubatch=256), host=64 * GiB, gpu=80 * GiB).gpu < 80 * GiB


def test_suggestions_fit_and_nothing_fits():
    hint = suggestions(CFG, replace(GPU_PLAN, ubatch=64), host=64 * GiB, gpu=5 * GiB)
    assert "micro-batches of" in hint and "a prompt of at most" in hint
    u = int(hint.split("micro-batches of ")[1].split()[0])
    n = int(hint.split("a prompt of at most ")[1].split()[0])
    for key, value in (("ubatch", u), ("n_prompt", n)):     # the largest that fits
        assert estimate(CFG, replace(replace(GPU_PLAN, ubatch=64), **{key: value})).gpu <= 5 * GiB
        assert estimate(CFG, replace(replace(GPU_PLAN, ubatch=64), **{key: value + 1})).gpu > 5 * GiB
    with pytest.raises(BudgetError, match="nothing smaller fits"):
        check(CFG, GPU_PLAN, host=64 * GiB, gpu=GiB)          # below the weights alone


def test_auto_ubatch():
    assert auto_ubatch(CFG, replace(GPU_PLAN, n_prompt=512), 64 * GiB, 80 * GiB) is None
    u = auto_ubatch(CFG, GPU_PLAN, 64 * GiB, 80 * GiB)
    assert 1 <= u < 4096 and estimate(CFG, replace(GPU_PLAN, ubatch=u)).gpu <= 0.8 * 80 * GiB
    # the largest batch whose working set (what scales with the batch) stays under the limit
    assert working_set(estimate(CFG, replace(GPU_PLAN, ubatch=u))) <= WORKING_SET
    assert working_set(estimate(CFG, replace(GPU_PLAN, ubatch=u + 1))) > WORKING_SET
    assert auto_ubatch(CFG, GPU_PLAN, 64 * GiB, 80 * GiB, limit=2 * GiB) < u


# PyTorch's allocations during a micro-batched report on an H100 (bench.py --long, eleventh session;
# max_memory_allocated minus memory_allocated before): (preset, prompt, micro-batch, lazy, GiB)
MEASURED_GROWTH = [("qwen2.5-0.5b", 32768, 90, False, 13.90 - 2.41), ("qwen2.5-7b", 8192, 140, False, 46.77 - 34.89),
                   ("qwen2.5-32b", 2048, 126, True, 37.09 - 21.45)]


@pytest.mark.parametrize("preset,T,U,lazy,measured", MEASURED_GROWTH)
def test_estimate_bounds_what_the_gpu_measured(preset, T, U, lazy, measured):
    """The parts of the estimate that PyTorch allocates during the report (everything but the
    weights, llama.cpp's own buffers and the runtimes) are at least what was measured, and not
    wildly more (the tenth session's estimate was 4.5 GiB short: a batch held twice, unbounded
    float64 temporaries; the 32B row's lazy weights expand the 3 GiB output matrix)."""
    cfg = PRESETS[preset].config()
    est = estimate(cfg, Plan(T, 8, device="cuda", ubatch=U, lazy=lazy))
    ours = {k: v for k, (_, v) in est.parts.items()
            if not k.startswith(("llama.cpp", "runtimes", "CUDA")) and k != "our weights"}
    assert measured * GiB <= sum(ours.values()) <= (measured + 6) * GiB, ours
    assert ("our largest matrix, expanded" in ours) == lazy


# The layered lockstep (llama.cpp in process, H100; the first row the thirteenth session's, the rest
# the fourteenth's: b130858 at the 12 GiB working set, then 7ec66eb at 16 GiB): the same measure of growth.
MEASURED_LAYERED = [("qwen2.5-0.5b", 32768, 403, False, 7.54 - 2.41), ("qwen2.5-7b", 8192, 711, False, 40.24 - 34.89),
                    ("qwen2.5-32b", 2048, 1339, True, 28.10 - 21.45), ("qwen2.5-0.5b", 32768, 561, False, 8.86 - 2.41),
                    ("qwen2.5-7b", 8192, 985, False, 41.32 - 34.89), ("qwen2.5-32b", 2048, 1772, True, 28.97 - 21.45)]


@pytest.mark.parametrize("preset,T,U,lazy,measured", MEASURED_LAYERED)
def test_layered_estimate_bounds_what_the_gpu_measured(preset, T, U, lazy, measured):
    """The layered plan's estimate of PyTorch's growth is at least what was measured. It is
    conservative, 2.2-2.4x the measure (two stages' scores of ours held and our activations counted
    apart), hence a looser ceiling than the whole-batch rows'."""
    cfg = PRESETS[preset].config()
    est = estimate(cfg, Plan(T, 8, device="cuda", ubatch=U, lazy=lazy, layered=True))
    ours = sum(v for k, (_, v) in est.parts.items()
               if not k.startswith(("llama.cpp", "runtimes", "CUDA")) and k != "our weights")
    assert measured * GiB <= ours <= 2.5 * measured * GiB


def test_parse_size():
    assert parse_size("8G") == 8 * GiB and parse_size("512MiB") == 512 << 20 and parse_size("1000") == 1000
    with pytest.raises(ValueError):
        parse_size("lots")


def test_report_that_cannot_fit_exits_2_with_the_estimate(tiny_f32, llama_lib, monkeypatch, capsys):
    monkeypatch.setenv("LLAMADIFF_HOST_MEMORY", "256M")          # a machine far smaller than the run
    rc = main(["report", tiny_f32, "--tokens", ",".join(["5"] * 300), "--steps", "2", "--in-process"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("llamadiff: error: this run needs about host") and "host 256.0 MiB" in err


def test_record_that_cannot_fit_exits_2(tiny_f32, llama_lib, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("LLAMADIFF_HOST_MEMORY", "100M")
    rc = main(["record", tiny_f32, "--tokens", "5,6,7", "--name", "r", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "needs about" in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("exc", [MemoryError("no memory"), RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")])
def test_out_of_memory_that_happens_anyway_is_one_line_exit_2(monkeypatch, capsys, exc):
    import harness.cli as cli

    def boom(args):
        raise exc
    monkeypatch.setattr(cli, "cmd_faults", boom)
    assert main(["faults"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llamadiff: error: out of memory") and err.count("\n") == 1


def test_other_errors_are_not_taken_for_out_of_memory(monkeypatch):
    import harness.cli as cli

    def boom(args):
        raise RuntimeError("a bug")
    monkeypatch.setattr(cli, "cmd_faults", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["faults"])


@pytest.mark.parametrize("preset, expected", [(None, "expandable_segments:True"),
                                              ("max_split_size_mb:64", "max_split_size_mb:64")])
def test_importing_harness_sets_expandable_segments_unless_the_user_chose(preset, expected):
    """PyTorch's CUDA allocator reads PYTORCH_CUDA_ALLOC_CONF at its first GPU allocation: the
    package sets expandable segments (the 32k-token row of RESULTS.md) and keeps a user's value."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    if preset:
        env["PYTORCH_CUDA_ALLOC_CONF"] = preset
    out = subprocess.run([sys.executable, "-c", "import os, harness; print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])"],
                         env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == expected


def test_in_process_micro_batches_hold_one_layer_not_the_batch():
    """With llama.cpp in this process its nodes are handed over as computed and each layer is
    compared and dropped (harness.stream): the captured part is one layer's, the same for a
    model twice as deep, where a whole batch's doubles; so the micro-batch can be larger."""
    plan = Plan(32768, 8, device="cuda", ubatch=256, our_weight_bytes=GiB, llama_weight_bytes=GiB)
    deep = replace(CFG, n_layer=2 * CFG.n_layer)
    for cfg_ in (CFG, deep):
        whole, layered = estimate(cfg_, plan), estimate(cfg_, replace(plan, layered=True))
        assert "captured tensors (one layer)" in layered.parts and "captured tensors (one batch)" not in layered.parts
        assert layered.parts["captured tensors (one layer)"][1] < whole.parts["captured tensors (one batch)"][1] / 10
    one = [estimate(c, replace(plan, layered=True)).parts["captured tensors (one layer)"][1] for c in (CFG, deep)]
    two = [estimate(c, plan).parts["captured tensors (one batch)"][1] for c in (CFG, deep)]
    assert one[0] == one[1] and two[1] > 1.9 * two[0]
    u_whole = auto_ubatch(CFG, replace(plan, ubatch=None), 64 * GiB, 80 * GiB)
    u_layered = auto_ubatch(CFG, replace(plan, ubatch=None, layered=True), 64 * GiB, 80 * GiB)
    assert u_layered > 3 * u_whole
