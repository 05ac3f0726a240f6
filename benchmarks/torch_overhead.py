"""Per-op and per-site overhead of our PyTorch side, on the CPU: ``python benchmarks/torch_overhead.py``.

A 24-layer model with tiny dimensions (so compute is small and what is timed is mostly the per-op
and per-site Python overhead that also dominates the GPU report) runs a prefill + decode steps with
every site captured, as ``diff_on_device`` does. Reported: best and median over repeats of this
process's CPU time (1 torch thread; CPU rather than wall time, so a busy machine disturbs it less):
  plain             ``Model.run``, no hooks
  sink              ``run_with_cache`` into a sink that drops each tensor
  anchored          the same, anchored on a reference trace (the local-error pass)
  compare per-pair  a Comparator fed every pair of both passes, then its table, one pair at a time
  compare batched   the same with batched, deferred reductions (what a GPU run does)
  stream batched    both passes streaming into a batched Comparator, then the table: the work of
                    ``diff_on_device`` on a GPU (its float64 reductions cost more on a CPU)
  report            ``diff_on_device`` with the reference given (on the CPU: per-pair stats)
``--profile`` prints a cProfile of one "stream batched" instead. The reference is our own trace,
so the comparison does real work on (near-)equal tensors without llama.cpp.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from harness import synth  # noqa: E402
from harness.compare.comparator import Comparator  # noqa: E402
from harness.ours.model import load_model  # noqa: E402
from harness.diff import DiffRequest, diff_on_device  # noqa: E402
from harness.compare.tolerance import Policy  # noqa: E402

PRESET = synth.Preset(n_layer=24, d_model=128, d_ff=256, n_head=4, n_head_kv=2, n_vocab=1024, n_ctx=2048,
                      rope_base=1e6, rms_eps=1e-6, tied=False, n_regular=1000, n_special=3)


def fixture(directory: str = "build/fixtures") -> str:
    """The 24-layer small-dims F16 fixture (written once, via a preset registered for this run)."""
    synth.PRESETS.setdefault("bench24", PRESET)
    return synth.default_fixture("f16", preset="bench24", seed=0, cache_dir=directory)


def timings(fn, repeats: int) -> tuple[float, float]:
    """(best, median) CPU seconds of ``repeats`` warm calls."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times), statistics.median(times)


def compare_traces(ref, model, batched: bool) -> None:
    comp = Comparator(Policy("cuda", model.gguf.weight_type), batched=batched)
    for key, r in ref.items():
        comp.add(*key, r, r)
        comp.add_local(*key, r, r)
    comp.result({}, ref)


def stream_batched(ref, model, args) -> None:
    comp = Comparator(Policy("cuda", model.gguf.weight_type), batched=True)
    model.run_with_cache(*args, sink=lambda s, n, x: comp.add(s, n, x, ref[s, n]), to_cpu=False)
    model.run_with_cache(*args, sink=lambda s, n, x: comp.add_local(s, n, x, ref[s, n]), anchor=ref,
                         to_cpu=False)
    comp.result({}, ref)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", help="comma-separated rows to time (default: all)")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    path = fixture()
    model = load_model(path, kv_dtype=torch.float16, mirror="cuda")   # as the GPU report runs it
    prompt = [300 + 7 * i for i in range(a.tokens)]
    ref = model.run_with_cache(prompt, a.steps)
    ref.meta["backend"] = "cuda"
    args = (prompt, a.steps, ref.tokens[a.tokens:])
    if a.profile:
        out = os.path.join(tempfile.mkdtemp(), "torch_overhead.prof")
        cProfile.runctx("stream_batched(ref, model, args)", globals(), locals(), out)
        pstats.Stats(out).sort_stats("tottime").print_stats(30)
        return
    drop = lambda *_: None  # noqa: E731
    req = DiffRequest(path, tokens=prompt, steps=a.steps)
    rows = {
        "plain": lambda: model.run(*args, keep_logits=False),
        "sink": lambda: model.run_with_cache(*args, sink=drop, to_cpu=False),
        "anchored": lambda: model.run_with_cache(*args, sink=drop, anchor=ref, to_cpu=False),
        "compare per-pair": lambda: compare_traces(ref, model, False),
        "compare batched": lambda: compare_traces(ref, model, True),
        "stream batched": lambda: stream_batched(ref, model, args),
        "report": lambda: diff_on_device(req, model=model, ref=ref),
    }
    print(f"{PRESET.n_layer} layers, {a.tokens}+{a.steps} tokens, {len(ref)} sites per pass, "
          f"{a.repeats} repeats: best / median CPU ms")
    for name, fn in rows.items():
        if not a.only or name in a.only.split(","):
            best, med = timings(fn, a.repeats)
            print(f"  {name:18s} {best * 1e3:8.1f} {med * 1e3:8.1f}")


if __name__ == "__main__":
    main()
