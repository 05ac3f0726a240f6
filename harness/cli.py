"""``llamadiff`` command line: small cmd_* functions that parse, call the library, render, exit.

Exit codes: 0 success / no divergence, 1 divergence found (or a failed check), 2 usage or input error.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

EXIT_OK, EXIT_DIVERGED, EXIT_USAGE = 0, 1, 2


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
    from probes.faults import get_fault
    return [get_fault(s) for s in specs or []]


def cmd_synth(args) -> int:
    from .synth import write_synthetic
    path = write_synthetic(args.out, preset=args.preset, wtype=args.type, seed=args.seed,
                           tied=True if args.tied else None)
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB, preset {args.preset}, {args.type}, seed {args.seed})")
    return EXIT_OK


def _check_report_args(args) -> None:
    if (args.prompt is None) == (args.tokens is None):
        raise UsageError("give exactly one of --prompt TEXT or --tokens 1,2,3")
    if args.steps < 0:
        raise UsageError("--steps must be >= 0")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is visible to PyTorch")


def cmd_report(args) -> int:
    from .gguf_io import read_config, _open_reader
    from .pipeline import DiffRequest, diff_gguf
    from .render import render
    from .sites import validate_pattern
    _check_report_args(args)
    cfg = read_config(_open_reader(args.model), args.model)
    if args.sites:
        validate_pattern(args.sites, cfg.n_layer)
    req = DiffRequest(args.model, prompt=args.prompt, tokens=parse_tokens(args.tokens) if args.tokens else None,
                      steps=args.steps, device=args.device, dtype=args.dtype, sites=args.sites,
                      faults=_faults(args.inject), kv_type=args.kv_type)
    res = diff_gguf(req)
    fmt = args.format
    if fmt == "html":
        from .html_report import render_html
        text = render_html(res)
    else:
        text = render(res.comparison, fmt, color=args.out is None and sys.stdout.isatty())
    emit(text, args.out)
    if args.out:
        from .render import verdict_line
        print(verdict_line(res.comparison))
    return EXIT_DIVERGED if res.comparison.diverged else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamadiff", description="Diff a Qwen2 GGUF, op by op, against llama.cpp")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic qwen2 GGUF with random weights")
    s.add_argument("out")
    s.add_argument("--preset", default="tiny", choices=["tiny", "qwen2.5-0.5b"])
    s.add_argument("--type", default="f32", choices=["f32", "f16", "q8_0", "q4_k_m"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tied", action="store_true", help="no output.weight: logits use token_embd.weight")
    s.set_defaults(fn=cmd_synth)

    r = sub.add_parser("report", help="divergence report of our PyTorch Qwen2 against llama.cpp")
    r.add_argument("model", help="qwen2 GGUF file")
    r.add_argument("--prompt", help="prompt text (tokenized by llama.cpp with the GGUF's tokenizer)")
    r.add_argument("--tokens", help="prompt as comma-separated token ids")
    r.add_argument("--steps", type=int, default=4, help="decode steps after the prefill (default 4)")
    r.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    r.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    r.add_argument("--sites", help="site glob(s), comma-separated, e.g. 'blk.*.q,logits'")
    r.add_argument("--format", default="table", choices=["table", "markdown", "json", "html"])
    r.add_argument("--out", help="write the report here instead of stdout")
    r.add_argument("--inject", action="append", metavar="FAULT",
                   help="inject a fault into our side (name from 'llamadiff faults', or module:function@sites)")
    r.add_argument("--kv-type", default="f16", choices=["f16", "f32"], help="llama.cpp KV cache type")
    r.set_defaults(fn=cmd_report)
    return p


def _known_errors() -> tuple[type, ...]:
    from .gguf_io import GGUFError
    from .sites import SiteError
    errs: list[type] = [UsageError, GGUFError, SiteError, FileNotFoundError]
    for mod, name in (("harness.llama_backend", "LlamaError"), ("harness.llama_lib", "LlamaUnavailable"),
                      ("harness.synth", "SynthError"), ("probes.faults", "FaultError")):
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


if __name__ == "__main__":
    sys.exit(main())
