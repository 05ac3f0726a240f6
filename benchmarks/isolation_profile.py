"""Where the cost of running llama.cpp in its worker process goes, on the GPU.

    python benchmarks/isolation_profile.py [T] [steps]      (default 32 8; qwen2.5-0.5b F16 preset)

Times (median of 5 warm repeats), llama.cpp in-process vs in the worker:
  capture   runner.run with every site, tensors dropped (worker: includes the transfer)
  compare   diff_on_device on an already captured trace (in-process trace vs one that came over
            by CUDA IPC, and the latter cloned into this process's memory): does memory imported
            from another process slow our side down? In-process once more at the end, with the
            idle worker alive: does a second CUDA context on the GPU?
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from harness.llama.runner import LlamaOptions  # noqa: E402
from harness.llama.worker import open_runner  # noqa: E402
from harness.diff import DiffRequest, diff_on_device, model_for  # noqa: E402
from harness.synth import default_fixture  # noqa: E402
from harness.trace import Trace  # noqa: E402


def median(fn, n=5) -> float:
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    T, steps = (int(a) for a in (sys.argv[1:3] if len(sys.argv) > 2 else (32, 8)))
    gguf = default_fixture("f16", preset="qwen2.5-0.5b", seed=0, cache_dir="build/fixtures")
    prompt = list(range(300, 300 + T))
    req = DiffRequest(gguf, tokens=prompt, steps=steps, device="cuda", all_outputs=False)
    out = {}
    for iso in (False, True, False):      # in-process again, with the idle worker alive
        r = open_runner(gguf, LlamaOptions(device="cuda", keep_on_device=True, all_outputs=False, isolate=iso),
                        T + steps + 1)
        toks = [int(x.argmax()) for x in r.logits_plain(prompt, steps)[:-1]]
        iso_tag = f"{iso}{' (worker alive)' if not iso and out else ''}"
        out[f"capture iso={iso_tag}"] = median(lambda: r.run(prompt, steps, toks, sink=lambda *a: None))
        ref = r.run(prompt, steps, toks)
        model = model_for(req, ref)
        out[f"compare iso={iso_tag}"] = median(lambda: diff_on_device(req, model=model, ref=ref))
        out[f"report iso={iso_tag}"] = median(lambda: diff_on_device(req, model=model, runner=r))
        if iso:      # the same trace with its tensors copied into this process's own memory
            own = Trace(ref.n_layer, ref.tokens, ref.n_prompt, ref.meta, {k: v.clone() for k, v in ref.tensors.items()})
            out["compare iso, cloned"] = median(lambda: diff_on_device(req, model=model, ref=own))
            del own
        del ref
        r.close()
    for k, v in out.items():
        print(f"{k:40s} {v * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
