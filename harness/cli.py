"""``llamadiff`` command line: small cmd_* functions that parse, call the library, render, exit.

Exit codes: 0 success / no divergence, 1 divergence found (or a failed check), 2 usage or input error.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

EXIT_OK, EXIT_DIVERGED, EXIT_USAGE = 0, 1, 2
GGUF_HELP = "GGUF file (architecture qwen2 or qwen3; others are refused)"


class UsageError(Exception):
    """Bad command-line input; one-line message, exit 2."""


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)        # mkstemp makes it owner-only; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def emit(text: str, out: str | None) -> None:
    if out:
        write_atomic(out, text)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def parse_tokens(s: str) -> list[int]:
    try:
        toks = [int(t) for t in s.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(f"--tokens must be comma-separated integers, got {s!r}") from None
    if not toks:
        raise UsageError("--tokens is empty")
    return toks


def _faults(specs: list[str] | None):
    from harness.ours.inject import get_fault
    return [get_fault(s) for s in specs or []]


def cmd_synth(args) -> int:
    from harness.synth import write_synthetic
    path = write_synthetic(args.out, preset=args.preset, wtype=args.type, seed=args.seed,
                           tied=True if args.tied else None)
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB, preset {args.preset}, {args.type}, seed {args.seed})")
    return EXIT_OK


def _check_report_args(args) -> None:
    if (args.prompt is None) == (args.tokens is None):
        raise UsageError("give exactly one of --prompt TEXT or --tokens 1,2,3")
    if args.steps < 0:
        raise UsageError("--steps must be >= 0")
    if getattr(args, "ubatch", None) is not None and args.ubatch < 0:
        raise UsageError("--ubatch must be >= 0 (0: the prompt in one batch)")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is visible to PyTorch")


def cmd_report(args) -> int:
    from harness.gguf.load import read_config_file
    from harness.diff import DiffRequest, diff_gguf, diff_on_device
    from harness.report.text import render
    from harness.sites import validate_pattern
    from harness.ours.inject import check_faults
    _check_report_args(args)
    cfg = read_config_file(args.model)
    if args.sites:
        validate_pattern(args.sites, cfg.n_layer, cfg.spec.sites)
    faults = _faults(args.inject)
    check_faults(faults, cfg)                 # before llama.cpp runs: a fault this model cannot have
    req = DiffRequest(args.model, prompt=args.prompt, tokens=parse_tokens(args.tokens) if args.tokens else None,
                      steps=args.steps, device=args.device, dtype=args.dtype, sites=args.sites,
                      faults=faults, kv_type=args.kv_type, lazy_weights=args.lazy_weights,
                      extra_bufts=args.extra_bufts, isolate=not args.in_process, ubatch=args.ubatch,
                      progress=_ProgressLine() if args.progress else None)
    res = diff_on_device(req) if args.device == "cuda" else diff_gguf(req)
    if req.progress is not None and req.progress.shown:
        print(file=sys.stderr)                    # end the progress line
    fmt = args.format
    if fmt == "html":
        from harness.report.html import render_html
        from harness.gguf.load import read_tokens
        text = render_html(res, vocab=read_tokens(args.model))
    else:
        text = render(res.comparison, fmt, color=args.out is None and sys.stdout.isatty())
    emit(text, args.out)
    if args.out:
        from harness.report.text import verdict_line
        print(verdict_line(res.comparison))
    return EXIT_DIVERGED if res.comparison.diverged else EXIT_OK


class _ProgressLine:
    """A DiffRequest.progress that rewrites one stderr line: tokens compared, elapsed, time left."""

    def __init__(self):
        import time
        self.clock, self.t0, self.shown = time.monotonic, time.monotonic(), False

    def __call__(self, done: int, total: int) -> None:
        spent = self.clock() - self.t0
        left = f", about {spent * (total - done) / done:.0f} s left" if 0 < done < total else ""
        print(f"\rllamadiff: {done:,} of {total:,} tokens compared ({100 * done // max(total, 1)}%), "
              f"{spent:.0f} s{left}   ", end="", file=sys.stderr, flush=True)
        self.shown = True


def _run_errors(fn):
    """harness.runs.store.RunError (bad run, trace or GGUF) -> UsageError (exit 2)."""
    from harness.runs.store import RunError
    try:
        return fn()
    except RunError as e:
        raise UsageError(str(e)) from None


def cmd_record(args) -> int:
    from harness.runs.record import human_bytes, record
    if (args.prompt is None) == (args.tokens is None):
        raise UsageError("give exactly one of --prompt TEXT or --tokens 1,2,3")
    if args.steps < 0:
        raise UsageError("--steps must be >= 0")
    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()] if args.layers else None
    except ValueError:
        raise UsageError(f"--layers must be comma-separated layer numbers, got {args.layers!r}") from None
    from harness.diff import check_capture
    check_capture(args.model, parse_tokens(args.tokens) if args.tokens else None, args.prompt, args.steps,
                  args.device, args.sites, layers, args.kv_type)       # BudgetError (exit 2) when it cannot fit
    res = _run_errors(lambda: record(
        args.model, args.name, tokens=parse_tokens(args.tokens) if args.tokens else None, prompt=args.prompt,
        steps=args.steps, out_dir=args.out_dir, device=args.device, sites=args.sites, layers=layers,
        float16=args.float16, kv_type=args.kv_type, flash_attn=args.flash_attn, overwrite=args.force,
        extra_bufts=args.extra_bufts,
        max_bytes=int(args.max_size * 2**20) if args.max_size else None,
        on_estimate=lambda est: print(f"recording {args.name}: {est}", flush=True)))
    print(f"wrote {res.path}: {res.n_tensors} tensors, {human_bytes(res.bytes)}")
    return EXIT_OK


def cmd_compare(args) -> int:
    from harness.report.text import render, verdict_line
    from harness.runs.store import compare_runs, load_run
    cmp = _run_errors(lambda: compare_runs(load_run(args.reference), load_run(args.candidate)))
    emit(render(cmp, args.format, color=args.out is None and sys.stdout.isatty()), args.out)
    if args.out:
        print(verdict_line(cmp))
    return EXIT_DIVERGED if cmp.diverged else EXIT_OK


def cmd_check(args) -> int:
    from harness.check import CheckRequest, check
    from harness.report.text import render, verdict_line
    gguf, ref = args.model, None
    if os.path.isdir(args.model):            # a recorded llama.cpp run instead of the GGUF
        ref, gguf = args.model, _run_gguf(args.model, args.gguf)
    elif args.gguf:
        raise UsageError("--gguf is for a recorded reference run; the first argument is already a GGUF")
    if (args.engine is None) == (args.candidate is None):
        raise UsageError("give the engine's trace directory (ENGINE_TRACE) or --candidate hf, not both")
    if args.device == "cuda":
        _check_report_args(argparse.Namespace(prompt="", tokens=None, steps=0, device="cuda"))
    req = CheckRequest(engine=args.engine, gguf=gguf, reference=ref, device=args.device, kv_type=args.kv_type,
                       extra_bufts=args.extra_bufts, isolate=not args.in_process, engine_kv=args.engine_kv)
    res = check(req, candidate=_hf_candidate(args, gguf, ref) if args.candidate else None)
    emit(render(res.comparison, args.format, color=args.out is None and sys.stdout.isatty()), args.out)
    if args.out:
        print(verdict_line(res.comparison))
    return EXIT_DIVERGED if res.comparison.diverged else EXIT_OK


def _hf_candidate(args, gguf: str, ref: str | None):
    """transformers' trace of the GGUF: on the recorded run's tokens, else on --tokens/--prompt
    (greedy decode steps, which llama.cpp is then fed)."""
    from harness.hf.trace import hf_trace, hf_trace_like
    if ref is not None:
        if args.prompt is not None or args.tokens is not None:
            raise UsageError("with a recorded run the tokens are the run's: drop --prompt/--tokens")
        from harness.runs.store import load_run
        return hf_trace_like(gguf, _run_errors(lambda: load_run(ref)).trace)
    _check_report_args(argparse.Namespace(prompt=args.prompt, tokens=args.tokens, steps=args.steps, device="cpu"))
    if args.tokens:
        tokens = parse_tokens(args.tokens)
    else:
        from harness.llama.runner import tokenize_file
        tokens = tokenize_file(gguf, args.prompt)
    return hf_trace(gguf, tokens, args.steps)


def _run_gguf(run: str, model: str | None) -> str:
    """The GGUF a recorded run was made on (``model``, or where its manifest says), sha256-checked."""
    from harness.runs.gate import locate_gguf
    from harness.runs.store import RecordedRun, read_manifest
    from harness.trace import Trace
    return _run_errors(lambda: locate_gguf(RecordedRun(run, read_manifest(run), Trace(0), "float32"), model))


def cmd_gate(args) -> int:
    from harness.runs.gate import junit_xml, markdown_summary, run_gate
    from harness.report.text import render
    res = _run_errors(lambda: run_gate(args.run, candidate=args.candidate, model=args.model,
                                       faults=_faults(args.inject), device=args.device, dtype=args.dtype))
    if args.junit:
        write_atomic(args.junit, junit_xml(res))
    if args.summary:
        write_atomic(args.summary, markdown_summary(res))
    emit(render(res.comparison, args.format, color=args.out is None and sys.stdout.isatty()), args.out)
    status = (f"gate {res.run.name}: {'PASS' if res.passed else 'FAIL'} ({res.candidate} vs {res.run.path}, "
              f"{res.comparison.meta.get('compared')} site tensors)")
    print(status, file=sys.stderr if args.format == "json" and not args.out else sys.stdout)
    for w in res.warnings:   # provenance differences: reported, never a change of the exit code
        print(f"llamadiff: warning: {w}", file=sys.stderr)
    return EXIT_OK if res.passed else EXIT_DIVERGED


def _probe_inputs(args) -> dict:
    """Shared checks of zoo/probe: tokens or prompt (neither: a default prompt), steps."""
    if args.prompt is not None and args.tokens is not None:
        raise UsageError("give at most one of --prompt TEXT or --tokens 1,2,3")
    if args.steps < 0:
        raise UsageError("--steps must be >= 0")
    return dict(tokens=parse_tokens(args.tokens) if args.tokens else None, prompt=args.prompt, steps=args.steps)


def _fault_specs(values: list[str] | None) -> list[str]:
    from harness.ours.inject import split_specs
    return [s for v in values or [] for s in split_specs(v)]


def cmd_zoo(args) -> int:
    from probes.render import render_zoo
    from probes.zoo import run_zoo
    res = run_zoo(args.model, faults=_fault_specs(args.faults) or None, device=args.device,
                  extra_bufts=args.extra_bufts, **_probe_inputs(args))
    emit(render_zoo(res, args.format, color=args.out is None and sys.stdout.isatty()), args.out)
    return EXIT_OK if res.ok else EXIT_DIVERGED


def cmd_probe(args) -> int:
    from probes.checks import probe
    from probes.context import CheckError
    from probes.render import render_probes
    checks = [c.strip() for c in args.checks.split(",") if c.strip()] if args.checks else None
    try:
        summary, records, meta = probe(args.model, source=args.source, faults=_fault_specs(args.inject),
                                       checks=checks, device=args.device, extra_bufts=args.extra_bufts,
                                       **_probe_inputs(args))
    except CheckError as e:
        raise UsageError(str(e)) from None
    emit(render_probes(summary, records, meta, args.format, color=args.out is None and sys.stdout.isatty()), args.out)
    return EXIT_DIVERGED if any(s["fired"] for s in summary) else EXIT_OK


def cmd_faults(args) -> int:
    from harness.ours.inject import REGISTRY
    from probes.render import render_faults
    emit(render_faults(REGISTRY.values(), args.format, color=sys.stdout.isatty()), None)
    return EXIT_OK


def _add_probe_commands(sub) -> None:
    """The fault zoo, the reference-free probes and the fault list (probes/)."""
    def inputs(x, steps_help):
        x.add_argument("model", help=GGUF_HELP)
        x.add_argument("--prompt", help="prompt text (default: a fixed English sentence)")
        x.add_argument("--tokens", help="prompt as comma-separated token ids")
        x.add_argument("--steps", type=int, default=3, help=steps_help)
        x.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        _add_extra_bufts(x)
        x.add_argument("--format", default="table", choices=["table", "markdown", "json"])
        x.add_argument("--out", help="write the output here instead of stdout")

    z = sub.add_parser("zoo", help="inject every named fault; check each is found at its expected op (exit 1 on a miss)")
    inputs(z, "decode steps after the prefill (default 3; decode-only faults need >= 1)")
    z.add_argument("--faults", action="append", metavar="A,B",
                   help="only these faults (names from 'llamadiff faults', or module:function@sites)")
    z.set_defaults(fn=cmd_zoo)

    pr = sub.add_parser("probe", help="reference-free checks on one trace (exit 1 if any probe fires)")
    inputs(pr, "decode steps after the prefill (default 3)")
    pr.add_argument("--source", default="torch", choices=["torch", "llama"], help="whose trace (default torch)")
    pr.add_argument("--inject", action="append", metavar="FAULT", help="inject a fault (torch source only)")
    pr.add_argument("--checks", help="only these probes, comma-separated (default: all)")
    pr.set_defaults(fn=cmd_probe)

    fl = sub.add_parser("faults", help="list the named faults and where each must be found")
    fl.add_argument("--format", default="table", choices=["table", "markdown", "json"])
    fl.set_defaults(fn=cmd_faults)


def _add_run_args(p: argparse.ArgumentParser, device_help: str) -> None:
    """The model, prompt, steps and device arguments shared by report and record."""
    p.add_argument("model", help=GGUF_HELP)
    p.add_argument("--prompt", help="prompt text (tokenized by llama.cpp with the GGUF's tokenizer)")
    p.add_argument("--tokens", help="prompt as comma-separated token ids")
    p.add_argument("--steps", type=int, default=4, help="decode steps after the prefill, teacher-forced "
                   "on llama.cpp's greedy picks (default 4)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help=device_help)
    _add_extra_bufts(p)


def _add_extra_bufts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--extra-bufts", action="store_true",
                   help="let llama.cpp repack weights into its extra CPU buffer types (AMX, x86/ARM repack), "
                        "as it does by default: numerics then depend on the CPU model and the tolerances "
                        "were not calibrated for it (off: the plain ggml CPU kernels, the same on every CPU)")


def build_parser() -> argparse.ArgumentParser:
    from harness.synth import PRESETS, WEIGHT_TYPES
    p = argparse.ArgumentParser(prog="llamadiff", description="Diff a GGUF (qwen2 or qwen3), op by op, against llama.cpp")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic GGUF (qwen2 or qwen3 shapes) with random weights")
    s.add_argument("out")
    s.add_argument("--preset", default="tiny", choices=list(PRESETS),
                   help="model shapes: " + ", ".join(f"{k} ({v.arch})" for k, v in PRESETS.items()))
    s.add_argument("--type", default="f32", choices=list(WEIGHT_TYPES))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tied", action="store_true", help="no output.weight: logits use token_embd.weight "
                   "(default: the preset's own choice)")
    s.set_defaults(fn=cmd_synth)

    r = sub.add_parser("report", help="divergence report of our PyTorch model against llama.cpp")
    _add_run_args(r, "where both sides run")
    r.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    r.add_argument("--sites", help="site glob(s), comma-separated, e.g. 'blk.*.q,logits' (llama.cpp also "
                   "captures their ops' inputs, as anchors for the local errors)")
    r.add_argument("--format", default="table", choices=["table", "markdown", "json", "html"])
    r.add_argument("--out", help="write the report here instead of stdout")
    r.add_argument("--inject", action="append", metavar="FAULT",
                   help="inject a fault into our side (name from 'llamadiff faults', or module:function@sites)")
    r.add_argument("--kv-type", default="f16", choices=["f16", "f32"], help="llama.cpp KV cache type")
    r.add_argument("--in-process", action="store_true",
                   help="run llama.cpp in this process instead of its worker: faster on CUDA (measured "
                        "6-48%% of a report), but a crash inside llama.cpp then kills llamadiff")
    r.add_argument("--lazy-weights", action="store_true", default=None,
                   help="keep our weight matrices quantized and expand one at a time when used (for models "
                        "whose float weights do not fit beside llama.cpp's; automatic on CUDA when needed)")
    r.add_argument("--ubatch", type=int, metavar="N",
                   help="decode the prompt N tokens at a time and compare each micro-batch before the next "
                        "(memory bounded by one batch); 0: one batch; default: chosen by the memory budget")
    r.add_argument("--progress", action="store_true",
                   help="micro-batched runs: show on stderr how many tokens are compared so far")
    r.set_defaults(fn=cmd_report)

    rec = sub.add_parser("record", help="record llama.cpp's tensors at every site into a reference run")
    _add_run_args(rec, "llama.cpp backend")
    rec.add_argument("--name", required=True, help="run name: the run is written to OUT_DIR/NAME")
    rec.add_argument("--sites", help="record only these site glob(s), e.g. 'blk.*.q,logits'")
    rec.add_argument("--layers", help="record only these layers, e.g. 0,1 (global sites are kept)")
    rec.add_argument("--float16", action="store_true", help="store float16 (half the size, adds rounding)")
    rec.add_argument("--out-dir", default="reference_runs", help="parent folder (default reference_runs)")
    rec.add_argument("--kv-type", default="f16", choices=["f16", "f32"], help="llama.cpp KV cache type")
    rec.add_argument("--flash-attn", action="store_true", help="llama.cpp flash attention (no kq/attn_weights)")
    rec.add_argument("--max-size", type=float, metavar="MIB", help="refuse when the estimate exceeds this")
    rec.add_argument("--force", action="store_true", help="replace an existing run of that name")
    rec.set_defaults(fn=cmd_record)

    c = sub.add_parser("compare", help="diff two traces (reference runs or other engines' dumps), end to end")
    c.add_argument("reference", help="reference run / trace directory (its policy applies)")
    c.add_argument("candidate", help="candidate trace directory")
    c.add_argument("--format", default="table", choices=["table", "markdown", "json"])
    c.add_argument("--out", help="write the report here instead of stdout")
    c.set_defaults(fn=cmd_compare)

    k = sub.add_parser("check", help="diff your own engine's trace against llama.cpp on the same GGUF, op by op")
    k.add_argument("model", help="the GGUF the engine ran (llama.cpp runs live on the trace's tokens), "
                   "or a recorded llama.cpp run of the same tokens")
    k.add_argument("engine", nargs="?", help="the engine's trace directory (docs/trace-format.md)")
    k.add_argument("--gguf", help="with a recorded run: the GGUF (default: the path its manifest names)")
    k.add_argument("--candidate", choices=["hf"], help="instead of a trace: Hugging Face transformers' model "
                   "of the GGUF (built by transformers' own GGUF reader), run on --prompt/--tokens")
    k.add_argument("--prompt", help="with --candidate hf: prompt text (llama.cpp's tokenizer)")
    k.add_argument("--tokens", help="with --candidate hf: prompt as comma-separated token ids")
    k.add_argument("--steps", type=int, default=4, help="with --candidate hf: greedy decode steps (default 4)")
    k.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where llama.cpp and our ops run")
    k.add_argument("--kv-type", default="f16", choices=["f16", "f32"],
                   help="llama.cpp's KV cache type (default f16, llama.cpp's own default)")
    k.add_argument("--engine-kv", choices=["f16", "f32"], help="your engine's KV cache type: our recomputation "
                   "of kq/kqv reads cached K/V so rounded (default: the trace's engine.kv_type, else f32)")
    k.add_argument("--in-process", action="store_true", help="run llama.cpp in this process (see report)")
    _add_extra_bufts(k)
    k.add_argument("--format", default="table", choices=["table", "markdown", "json"])
    k.add_argument("--out", help="write the report here instead of stdout")
    k.set_defaults(fn=cmd_check)

    g = sub.add_parser("gate", help="CI gate: re-run a candidate against a recorded reference run")
    g.add_argument("run", help="reference run directory, e.g. reference_runs/NAME")
    g.add_argument("--candidate", default="torch", help="'torch' (our model, default) or a trace directory")
    g.add_argument("--model", help="the GGUF (default: the manifest's path, or next to the run); sha256-checked")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the torch candidate runs")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    g.add_argument("--inject", action="append", metavar="FAULT", help="inject a fault into the torch candidate")
    g.add_argument("--junit", metavar="FILE", help="write JUnit XML (one test case per layer / global site)")
    g.add_argument("--summary", metavar="FILE.md", help="write a markdown summary")
    g.add_argument("--format", default="table", choices=["table", "markdown", "json"])
    g.add_argument("--out", help="write the report here instead of stdout")
    g.set_defaults(fn=cmd_gate)
    _add_probe_commands(sub)
    return p


def _known_errors() -> tuple[type, ...]:
    from harness.gguf.load import GGUFError
    from harness.sites import SiteError
    errs: list[type] = [UsageError, GGUFError, SiteError, FileNotFoundError]
    for mod, name in (("harness.llama.runner", "LlamaError"), ("harness.llama.lib", "LlamaUnavailable"),
                      ("harness.synth", "SynthError"), ("harness.ours.inject", "FaultError"),
                      ("harness.budget", "BudgetError"),
                      ("harness.runs.store", "RunError"), ("harness.check", "CheckError")):
        try:
            errs.append(getattr(__import__(mod, fromlist=[name]), name))
        except Exception:
            pass
    return tuple(errs)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:        # argparse already printed its usage line
        return EXIT_USAGE if e.code else EXIT_OK
    try:
        return args.fn(args)
    except _known_errors() as e:
        print(f"llamadiff: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("llamadiff: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _out_of_memory(e):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"llamadiff: error: out of memory ({type(e).__name__}: {first}); try fewer --sites, fewer "
              "--steps or a shorter prompt", file=sys.stderr)
        return EXIT_USAGE


def _out_of_memory(e: BaseException) -> bool:
    """An allocation that failed despite the budget check (host MemoryError, CUDA OOM)."""
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or \
        (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


if __name__ == "__main__":
    sys.exit(main())
