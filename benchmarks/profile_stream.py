"""Time the micro-batched (streaming) report on the GPU, and what its parts cost:
    python benchmarks/profile_stream.py [TOKENS [UBATCH]]     (default 2048 97; + 8 steps)
Qwen2.5-0.5B-shaped F16, llama.cpp in-process, the same runner throughout; prints one line per
variant: as shipped and without the systematic statistics; then plain decode and capture alone at
the same micro-batch, one report's time by phase, its top CUDA kernels, and a cProfile by own time."""
import cProfile
import pstats
import sys
import time

import torch

sys.path.insert(0, ".")
import harness.compare.comparator as cmpmod  # noqa: E402
from harness.diff import DiffRequest, diff_on_device, llama_options, model_for  # noqa: E402
from harness.llama.worker import open_runner  # noqa: E402
from harness.gguf.load import read_config_file  # noqa: E402
from harness.stream import Lockstep  # noqa: E402
from harness.synth import default_fixture  # noqa: E402
from harness.trace import Trace  # noqa: E402

T = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
U = int(sys.argv[2]) if len(sys.argv) > 2 else 97
p = default_fixture("f16", preset="qwen2.5-0.5b", cache_dir="build/fixtures")
req = DiffRequest(p, tokens=[300 + (7 * i) % 5000 for i in range(T)], steps=8, device="cuda", ubatch=U, isolate=False)
runner = open_runner(p, llama_options(req, keep_on_device=True, ubatch=U), n_ctx_needed=T + 9)   # loaded once
model = model_for(req, Trace(read_config_file(p).n_layer, meta=dict(runner.meta)))


def timed(label):
    torch.cuda.synchronize()
    t = time.time()
    res = diff_on_device(req, model=model, runner=runner).comparison
    torch.cuda.synchronize()
    print(f"{label}: {time.time() - t:.2f} s, rows {len(res.table)}, first {res.first.site if res.first else None}",
          flush=True)


timed("warm-up (as shipped)")
timed("as shipped")
null = cmpmod._default_null
cmpmod._default_null = lambda: None
timed("no systematic statistics")
cmpmod._default_null = null


class Drop:                # a sink that keeps nothing: llama.cpp's capture alone
    def __call__(self, step, site, x):
        pass

    def batch_done(self, step, pos0, tokens):
        pass


toks = [int(lg.argmax()) for lg in runner.logits_plain(req.tokens, 8)[:-1]]
for label, fn in (("plain decode, same micro-batch", lambda: runner.logits_plain(req.tokens, 8, toks)),
                  ("capture on GPU alone", lambda: runner.run(req.tokens, 8, sink=Drop()))):
    fn()
    torch.cuda.synchronize()
    t = time.time()
    fn()
    torch.cuda.synchronize()
    print(f"{label}: {time.time() - t:.3f} s", flush=True)

# Where a report's time goes (each phase synchronised at its ends, so the total is a little above
# the report's). Prefill batches run our stages inside llama.cpp's eval callback (harness.stream),
# so "llama.cpp decode" includes them; the other phases say how much of it is ours: our stages
# with their recorders (pair statistics queued), and the reductions (at stage and batch ends).
spent = {"llama.cpp decode (ours inside)": 0.0, "our stages + recorder": 0.0, "reductions": 0.0}
depth = [0]


def clocked(key, fn):
    def run(*a, **k):
        depth[0] += 1
        torch.cuda.synchronize()
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            torch.cuda.synchronize()
            spent[key] += time.perf_counter() - t
            depth[0] -= 1
    return run


real_decode, real_advance, real_reduce = type(runner)._decode, Lockstep._advance, Lockstep._reduce
type(runner)._decode = clocked("llama.cpp decode (ours inside)", real_decode)
Lockstep._advance = clocked("our stages + recorder", real_advance)
Lockstep._reduce = clocked("reductions", real_reduce)
t0 = time.time()
diff_on_device(req, model=model, runner=runner)
total = time.time() - t0
spent["our stages + recorder"] -= spent["reductions"]     # an approximation: most reductions run inside
n_batches = -(-T // U) + 8
print(f"phases of one report ({total:.2f} s, {n_batches} llama_decode calls): " + ", ".join(
    f"{k} {v:.2f} s ({1000 * v / n_batches:.0f} ms per call)" for k, v in spent.items()), flush=True)
type(runner)._decode, Lockstep._advance, Lockstep._reduce = real_decode, real_advance, real_reduce
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    diff_on_device(req, model=model, runner=runner)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20), flush=True)
cProfile.run("diff_on_device(req, model=model, runner=runner); torch.cuda.synchronize()", "/tmp/prof_stream")
pstats.Stats("/tmp/prof_stream").sort_stats("tottime").print_stats(30)
