"""GPU benchmark of llamadiff: ``python benchmarks/bench.py [--out DIR] [--with-7b]``.

For each model and prompt length it measures (median of repeats, warm):
  plain     llama.cpp prefill + N decode steps, no eval callback
  cap_host  the same with every site captured and copied to host memory (the naive capture)
  cap_dev   the same with every site captured into GPU memory (no host copy)
  report    the full divergence report: capture + our model + our model anchored on the
            reference (local errors) + every site compared, streaming on the GPU; model load excluded;
            llama.cpp in this process (``isolate=False``, the in-process fast path)
  isolated  the same report with llama.cpp in its worker process (the default): the captured
            tensors come over by CUDA IPC; the difference to ``report`` is the cost of isolation
All llama.cpp runs output logits for the last token of each step only (``all_outputs=False``).
  loads     llama.cpp model+context load, and our GGUF load (dequantized on the GPU)
  peak host RSS of the report process, and peak GPU memory (device-wide, from cudaMemGetInfo)
``--with-7b`` adds the 7B-shaped Q4_K_M model at 512 tokens, eagerly dequantized and with lazy
(layer-by-layer) weights. ``--long ROWS`` (issue 16) runs micro-batched reports instead, e.g.
``--long 05b-32k,7b-8k,32b-2k``: the micro-batch size the memory budget picks, plain decode with the
same micro-batches, the full report (harness.diff.diff_stream, llama.cpp in this process), and
GPU memory sampled every 5 ms during the report. Each is also given as a ratio to ``plain``, the number that travels between machines.
Each (model, length) runs in fresh subprocesses so that peak RSS belongs to that work alone.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def median_time(fn, repeats: int) -> float:
    fn()                                   # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _GpuPeak:
    """Device-wide used memory high-water mark, sampled around each phase."""

    def __init__(self):
        import torch
        self.torch, self.peak = torch, 0

    def sample(self):
        free, total = self.torch.cuda.mem_get_info()
        self.peak = max(self.peak, total - free)


def _setup(gguf: str, T: int, steps: int, isolate: bool = False):
    from harness.llama.runner import LlamaOptions
    from harness.llama.worker import open_runner
    from harness.gguf.load import read_config_file
    import numpy as np
    cfg = read_config_file(gguf)
    prompt = np.random.default_rng(0).integers(300, min(cfg.n_vocab, 100000), T).tolist()
    t0 = time.perf_counter()
    opts = LlamaOptions(device="cuda", keep_on_device=True, all_outputs=False, isolate=isolate)
    runner = open_runner(gguf, opts, n_ctx_needed=T + steps + 1)
    llama_load = time.perf_counter() - t0
    logits = runner.logits_plain(prompt, steps)     # greedy picks fix the decode tokens for every repeat
    tokens = [int(l.argmax()) for l in logits[:-1]]
    return runner, prompt, tokens, llama_load


def child_capture(gguf: str, T: int, steps: int, repeats: int) -> dict:
    runner, prompt, toks, _ = _setup(gguf, T, steps)
    plain = median_time(lambda: runner.logits_plain(prompt, steps, toks), repeats)
    drop = lambda step, site, t: None  # noqa: E731
    # where a capture's time goes: the callback asked at every node, wanting none; then saying
    # yes to every site's node (llama.cpp synchronises after each) without copying; then copies
    ask = median_time(lambda: runner.run(prompt, steps, toks, sink=drop, capture=False), repeats)
    runner.dry_capture = True
    sync = median_time(lambda: runner.run(prompt, steps, toks, sink=drop), repeats)
    runner.dry_capture = False
    dev = median_time(lambda: runner.run(prompt, steps, toks, sink=drop), repeats)
    runner.on_device = False      # the naive path: every tensor copied to host
    host = median_time(lambda: runner.run(prompt, steps, toks, sink=drop), repeats)
    return dict(plain_s=plain, cb_ask_s=ask, cb_sync_s=sync, cap_dev_s=dev, cap_host_s=host)


def child_plain(gguf: str, T: int, steps: int, repeats: int) -> dict:
    """Plain decode alone, run by main() with LLAMADIFF_CUDA_GRAPHS=1: llama.cpp's own default
    (CUDA graphs on), the speed its users see; the other children run without them, as llamadiff does."""
    runner, prompt, toks, _ = _setup(gguf, T, steps)
    return dict(plain_graphs_s=median_time(lambda: runner.logits_plain(prompt, steps, toks), repeats),
                graphs_env=os.environ.get("GGML_CUDA_DISABLE_GRAPHS"))


def child_report(gguf: str, T: int, steps: int, repeats: int, lazy: bool = False, isolate: bool = False) -> dict:
    import torch
    from harness.diff import DiffRequest, diff_on_device, model_for
    gpu = _GpuPeak()
    gpu.sample()
    runner, prompt, toks, llama_load = _setup(gguf, T, steps, isolate)
    gpu.sample()
    req = DiffRequest(gguf, tokens=prompt, steps=steps, device="cuda", all_outputs=False, lazy_weights=lazy,
                      isolate=isolate)
    t0 = time.perf_counter()
    model = model_for(req, runner.run(prompt, 0, sink=lambda *a: None, filt=None, capture=False))
    torch.cuda.synchronize()
    torch_load = time.perf_counter() - t0
    gpu.sample()
    holder = {}

    def once():
        holder["res"] = diff_on_device(req, model=model, runner=runner)
        torch.cuda.synchronize()
        gpu.sample()

    report = median_time(once, repeats)
    cmp = holder["res"].comparison
    if isolate:
        return dict(report_iso_s=report, iso_diverged=cmp.diverged, iso_sites=len(cmp.table))
    return dict(report_s=report, llama_load_s=llama_load, torch_load_s=torch_load,
                peak_rss_gb=_peak_rss_gib(),
                peak_gpu_gb=gpu.peak / 2**30, sites_compared=len(cmp.table), diverged=cmp.diverged,
                first=cmp.first.site if cmp.first else None)


class _Sampler:
    """Device-wide used GPU memory sampled every 5 ms on a thread (llama.cpp's cudaMallocs
    included), between start() and stop()."""

    def __init__(self):
        import threading
        import torch
        self.torch, self.peak, self.on = torch, 0, False
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while self.on:
            free, total = self.torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(0.005)

    def start(self):
        self.on = True
        self.thread.start()

    def stop(self) -> int:
        self.on = False
        self.thread.join()
        return self.peak


_LOUD: list = []


def _loud_errors() -> None:
    """llama.cpp's error-level log lines to stderr (harness.llama.lib silences all of its log;
    a CUDA error's cause, e.g. 'out of memory' or 'invalid configuration argument', is only
    said there, before the abort)."""
    import ctypes
    from harness.llama.lib import llama
    lc = llama()
    cb = lc.llama_log_callback(lambda level, text, user: os.write(2, text) if level >= 4 and text else None)
    _LOUD.append(cb)                  # keep the callback alive
    lc.llama_log_set(cb, ctypes.c_void_p(0))


def child_stream(gguf: str, T: int, steps: int, repeats: int, lazy: bool = False, ubatch: int = 0) -> dict:
    """Issue 16: a micro-batched report of a T-token prompt (batch size from the memory budget,
    or ``ubatch`` tokens when given)."""
    _loud_errors()
    from dataclasses import replace
    import numpy as np
    import torch
    from harness.diff import DiffRequest, diff_stream, model_for, plan_request
    from harness.gguf.load import read_config_file
    from harness.llama.runner import LlamaOptions
    from harness.llama.worker import open_runner
    from harness.trace import Trace
    cfg = read_config_file(gguf)
    prompt = np.random.default_rng(0).integers(300, min(cfg.n_vocab, 100000), T).tolist()
    req = DiffRequest(gguf, tokens=prompt, steps=steps, device="cuda", lazy_weights=True if lazy else None,
                      isolate=False)
    if not ubatch:
        _, ubatch = plan_request(req)
        ubatch = ubatch or T
    rss = {"start": _peak_rss_gib()}            # peak host RSS after each phase (where does it grow?)
    with open_runner(gguf, LlamaOptions(device="cuda", isolate=False, ubatch=512), n_ctx_needed=T + steps + 1) as r:
        toks = [int(lg.argmax()) for lg in r.logits_plain(prompt, steps)[:-1]]
        plain512 = median_time(lambda: r.logits_plain(prompt, steps, toks), repeats)   # llama.cpp's default n_ubatch
    t0 = time.perf_counter()
    runner = open_runner(gguf, LlamaOptions(device="cuda", keep_on_device=True, isolate=False, ubatch=ubatch),
                         n_ctx_needed=T + steps + 1)
    llama_load = time.perf_counter() - t0
    rss["llama.cpp loads"] = _peak_rss_gib()
    toks = [int(lg.argmax()) for lg in runner.logits_plain(prompt, steps)[:-1]]
    plain = median_time(lambda: runner.logits_plain(prompt, steps, toks), repeats)
    req = replace(req, tokens=prompt, ubatch=ubatch)
    t0 = time.perf_counter()
    model = model_for(req, Trace(cfg.n_layer, meta=dict(runner.meta)))
    torch.cuda.synchronize()
    torch_load = time.perf_counter() - t0
    rss["our load"] = _peak_rss_gib()
    diff_stream(replace(req, tokens=prompt[:min(T, 2 * ubatch)], steps=1), model, runner)   # warm-up
    torch.cuda.synchronize()
    rss["warm-up"] = _peak_rss_gib()
    free, total = torch.cuda.mem_get_info()
    held = total - free          # llama.cpp (weights, both contexts' caches and buffers) + our weights
    torch_held = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved())   # of it, PyTorch's
    torch.cuda.reset_peak_memory_stats()
    sampler = _Sampler()
    sampler.start()
    t0 = time.perf_counter()
    res = diff_stream(req, model, runner)
    torch.cuda.synchronize()
    report = time.perf_counter() - t0
    peak = sampler.stop()
    cmp = res.comparison
    return dict(ubatch=ubatch, plain_s=plain, plain512_s=plain512, report_s=report, llama_load_s=llama_load, torch_load_s=torch_load,
                held_gb=held / 2**30, peak_gpu_gb=peak / 2**30, above_held_gb=(peak - held) / 2**30,
                torch_held_gib=[b / 2**30 for b in torch_held],      # allocated, reserved (cached) before
                torch_peak_gib=[torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30],
                peak_rss_gb=_peak_rss_gib(),
                sites_compared=len(cmp.table), diverged=cmp.diverged, first=cmp.first.site if cmp.first else None,
                first_step=cmp.first.step if cmp.first else None,
                first_explanation=cmp.first.explanation[:400] if cmp.first else None,
                lazy=bool(getattr(model.blocks[0].attn.mq, "lazy", False)), peak_rss_after_gib=rss)


def _peak_rss_gib() -> float:
    """This process's peak RSS: VmHWM where Linux has it. Not ru_maxrss, which a child started
    by fork + exec inherits from its parent's peak (measured: 3.0 GiB in a child that used 11 MB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


LONG = {"05b-32k": ("qwen2.5-0.5b F16", "qwen2.5-0.5b", "f16", 32768, False),
        "05b-2k": ("qwen2.5-0.5b F16", "qwen2.5-0.5b", "f16", 2048, False),
        "7b-8k": ("qwen2.5-7b Q4_K_M", "qwen2.5-7b", "q4_k_m", 8192, False),
        "32b-2k": ("qwen2.5-32b-shaped Q4_K_M, lazy weights", "qwen2.5-32b", "q4_k_m", 2048, True)}


def long_table(rows: list[dict]) -> str:
    lines = ["| model | tokens | micro-batch | plain decode (same micro-batch) | plain decode (n_ubatch 512) | "
             "full report | report / plain (same; 512) | GPU held before the report | peak GPU | peak above held | "
             "peak host RSS | sites | first divergence |", "|" + "---|" * 13]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['T']}+{r['steps']} | error: {r['error']} |" + " |" * 10)
            continue
        lines.append(f"| {r['model']} | {r['T']}+{r['steps']} | {r['ubatch']} | {r['plain_s']:.2f} s | "
                     f"{r['plain512_s']:.2f} s | {r['report_s']:.2f} s | {r['report_s'] / r['plain_s']:.1f}x; "
                     f"{r['report_s'] / r['plain512_s']:.1f}x | {r['held_gb']:.1f} GiB | "
                     f"{r['peak_gpu_gb']:.1f} GiB | {r['above_held_gb']:.1f} GiB | {r['peak_rss_gb']:.2f} GiB | "
                     f"{r['sites_compared']} | {r['first'] or 'none'} |")
    return "\n".join(lines)


def check_microbatch(fixtures: str, T: int = 512, ubatch: int = 128) -> str:
    """On the GPU: the streaming report with micro-batches against one batch, clean and with a
    fault; the same verdicts and first divergence expected."""
    import numpy as np
    from harness.diff import DiffRequest, diff_on_device
    from harness.ours.inject import get_fault
    from harness.synth import default_fixture
    gguf = default_fixture("f16", preset="qwen2.5-0.5b", seed=0, cache_dir=fixtures)
    prompt = np.random.default_rng(0).integers(300, 100000, T).tolist()
    out = []
    for faults in ([], [get_fault("drop_qkv_bias")], [get_fault("decode_pos_off_by_one")]):
        res = [diff_on_device(DiffRequest(gguf, tokens=prompt, steps=3, device="cuda", faults=faults, ubatch=u,
                                          isolate=False)).comparison for u in (0, ubatch)]
        a, b = res[0].table, res[1].table
        same = list(zip(a.step, a.site)) == list(zip(b.step, b.site))
        out.append(f"faults {[f.name for f in faults]}: rows {len(a)}/{len(b)} same keys {same}, "
                   f"passed equal {bool((a.passed.values == b.passed.values).all()) if same else '-'}, "
                   f"local_passed equal {bool((a.local_passed.values == b.local_passed.values).all()) if same else '-'}, "
                   f"first {[(c.first.step, c.first.site) if c.first else None for c in res]}, "
                   f"ubatch {[c.meta.get('ubatch') for c in res]}")
    return "\n".join(out)


def run_long(args) -> int:
    from harness.synth import default_fixture
    rows = []
    for key in args.long.split(","):
        label, preset, wtype, T, lazy = LONG[key]
        t0 = time.perf_counter()
        try:
            gguf = default_fixture(wtype, preset=preset, seed=0, cache_dir=args.fixtures)
        except Exception as e:  # noqa: BLE001 - a row not reached is reported, not extrapolated
            rows.append(dict(model=label, T=T, steps=args.steps, error=f"fixture: {e}"))
            continue
        print(f"[{label}] fixture ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        row = dict(model=label, T=T, steps=args.steps)
        row.update(run_child("stream", gguf, T, args.steps, args.repeats, lazy, args.ubatch))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    text = long_table(rows)
    print(text)
    with open(os.path.join(args.out, "long.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


def run_child(kind: str, gguf: str, T: int, steps: int, repeats: int, lazy: bool = False,
              ubatch: int = 0, env: dict | None = None) -> dict:
    """``kind``: capture, report (in-process llama.cpp), isolated (llama.cpp in its worker) or stream
    (micro-batches of ``ubatch`` tokens; 0: the memory budget's choice)."""
    out = subprocess.run([sys.executable, __file__, "--child", kind, gguf, str(T), str(steps), str(repeats),
                          str(int(lazy)), str(ubatch)],
                         capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    if out.returncode != 0:
        log = os.path.join(os.environ.get("OUT", "/tmp"), f"child-{kind}-{T}.err")
        with open(log, "w") as f:
            f.write(out.stderr)
        said = [ln for ln in out.stderr.strip().splitlines() if "GGML_ASSERT" in ln or "Error" in ln or "error" in ln]
        last = said[-1] if said else (out.stderr.strip().splitlines() or [f"rc {out.returncode}"])[-1]
        return {"error": f"{last.strip()[:300]} (rc {out.returncode}, stderr in {os.path.basename(log)})"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = ("| model | tokens | plain decode | capture→host | capture on GPU | full report | report isolated | "
            "isolation cost | report / plain | capture→host / plain | capture on GPU / plain | llama.cpp load | "
            "our load | peak host RSS | peak GPU mem | sites |\n|" + "---|" * 16)
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['T']} | error: {r['error']} |" + " |" * 13)
            continue
        p, iso = r["plain_s"], r.get("report_iso_s")
        iso_txt = (f"{iso*1e3:.0f} ms | {100 * (iso / r['report_s'] - 1):+.0f}%" if iso is not None
                   else f"{r.get('iso_error', '-')} | -")
        lines.append(
            f"| {r['model']} | {r['T']}+{r['steps']} | {p*1e3:.1f} ms | {r['cap_host_s']*1e3:.0f} ms | "
            f"{r['cap_dev_s']*1e3:.0f} ms | {r['report_s']*1e3:.0f} ms | {iso_txt} | {r['report_s']/p:.1f}x | "
            f"{r['cap_host_s']/p:.1f}x | {r['cap_dev_s']/p:.1f}x | {r['llama_load_s']:.2f} s | "
            f"{r['torch_load_s']:.2f} s | {r['peak_rss_gb']:.2f} GiB | {r['peak_gpu_gb']:.1f} GiB | "
            f"{r['sites_compared']} |")
    return "\n".join(lines)


def capture_table(rows: list[dict]) -> str:
    """Where a capture's time goes (issue 16's 3x target): the callback alone, llama.cpp's
    synchronisation after each node we say yes to, then our copies."""
    lines = ["| model | tokens | plain decode | plain decode, CUDA graphs on | full report / that | "
             "callback, no node wanted | every site's node wanted, no copy | "
             "capture on GPU | per wanted node: sync / copy |", "|" + "---|" * 9]
    for r in rows:
        if "cb_sync_s" not in r:
            continue
        n = max(r.get("sites_compared", 0), 1)
        g = r.get("plain_graphs_s")
        if g is None:
            graphs = f"{r.get('plain_graphs_error', 'not measured')[:80]} | -"
        else:
            graphs = f"{g*1e3:.1f} ms | " + (f"{r['report_s'] / g:.1f}x" if "report_s" in r else "-")
        lines.append(f"| {r['model']} | {r['T']}+{r['steps']} | {r['plain_s']*1e3:.1f} ms | {graphs} | {r['cb_ask_s']*1e3:.1f} ms | "
                     f"{r['cb_sync_s']*1e3:.1f} ms | {r['cap_dev_s']*1e3:.1f} ms | "
                     f"{(r['cb_sync_s'] - r['cb_ask_s']) / n * 1e6:.1f} us / "
                     f"{(r['cap_dev_s'] - r['cb_sync_s']) / n * 1e6:.1f} us (over {n} site tensors) |")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, gguf, T, steps, repeats, lazy, ubatch = sys.argv[2], sys.argv[3], *map(int, sys.argv[4:9])
        res = child_capture(gguf, T, steps, repeats) if kind == "capture" else \
            child_plain(gguf, T, steps, repeats) if kind == "plain" else \
            child_stream(gguf, T, steps, repeats, bool(lazy), ubatch) if kind == "stream" else \
            child_report(gguf, T, steps, repeats, bool(lazy), isolate=kind == "isolated")
        print(json.dumps(res))
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    ap.add_argument("--lengths", default="32,512,2048")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--with-7b", action="store_true")
    ap.add_argument("--fixtures", default="build/fixtures")
    ap.add_argument("--long", help="issue 16 rows, comma-separated: " + ", ".join(LONG))
    ap.add_argument("--ubatch", type=int, default=0, help="--long: micro-batch size (default: the memory budget's)")
    ap.add_argument("--check-microbatch", action="store_true", help="GPU: micro-batched vs one batch, same verdicts?")
    args = ap.parse_args()
    if args.check_microbatch:
        print(check_microbatch(args.fixtures))
        return 0
    from harness.synth import default_fixture
    os.makedirs(args.out, exist_ok=True)
    if args.long:
        return run_long(args)
    configs = [("qwen2.5-0.5b F16", "qwen2.5-0.5b", "f16", int(t), False) for t in args.lengths.split(",") if t]
    if args.with_7b:
        configs.append(("qwen2.5-7b Q4_K_M", "qwen2.5-7b", "q4_k_m", 512, False))
        configs.append(("qwen2.5-7b Q4_K_M, lazy weights", "qwen2.5-7b", "q4_k_m", 512, True))
    rows = []
    for label, preset, wtype, T, lazy in configs:
        t0 = time.perf_counter()
        gguf = default_fixture(wtype, preset=preset, seed=0, cache_dir=args.fixtures)
        print(f"[{label}] fixture ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        row = dict(model=label, T=T, steps=args.steps)
        if lazy and rows and rows[-1]["T"] == T and "plain_s" in rows[-1]:      # same llama.cpp work as the row above
            row.update({k: rows[-1][k] for k in ("plain_s", "plain_graphs_s", "cb_ask_s", "cb_sync_s", "cap_dev_s", "cap_host_s")
                        if k in rows[-1]})
        else:
            row.update(run_child("capture", gguf, T, args.steps, args.repeats))
            pg = run_child("plain", gguf, T, args.steps, args.repeats, env={"LLAMADIFF_CUDA_GRAPHS": "1"})
            row.update({"plain_graphs_error": pg["error"]} if "error" in pg else pg)
        row.update(run_child("report", gguf, T, args.steps, args.repeats, lazy))
        if not lazy:
            iso = run_child("isolated", gguf, T, args.steps, args.repeats)
            row.update({"iso_error": iso["error"]} if "error" in iso else iso)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    text = table(rows) + "\n\n" + capture_table(rows)
    print(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
