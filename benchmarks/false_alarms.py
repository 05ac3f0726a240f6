"""False alarms on clean runs (issue 17, item 4): no clean comparison may diverge.

For every regime (a synth preset x weight type, on the chosen llama.cpp backend) it writes
synthetic GGUFs with fresh seeds (from --first-seed on: never the tests' seed 0 nor the
calibration's seeds, ``harness.calibrate.SEEDS``), draws random prompts (random lengths and
tokens from a seeded generator; never one of the calibration's prompts) and runs a clean
comparison of each, decode steps included. It counts the runs whose verdict is a divergence (and
of those, the runs an element-wise tolerance failed in and the runs a systematic statistic of
:mod:`harness.compare.systematic` flagged, where that is active) and reports, per site family,
the clean runs' worst local error as a fraction of its element-wise tolerance (the headroom: 0.1
means the worst clean op used a tenth of its tolerance).

    python benchmarks/false_alarms.py                                   # CPU: tiny, tiny-qwen3 x 4 types, 20 runs each
    python benchmarks/false_alarms.py --mixed-runs 20                  # + the mixed-type 0.5B Q4_K_M file
    python benchmarks/false_alarms.py --device cuda --mixed-runs 20 --out false_alarms_cuda.json

Prints one markdown row per regime. Exit 0: no clean run diverged; 1: at least one did (each is
listed with its first divergence); 2: bad input or a llama.cpp failure (one line on stderr;
--out is written only when every regime ran).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from harness import calibrate  # noqa: E402
from harness.diff import DiffRequest, capture_reference, diff_gguf, model_for  # noqa: E402
from harness.synth import PRESETS, WEIGHT_TYPES, default_fixture  # noqa: E402

FIRST_SEED = 100
LONG = (257, 400)                # lengths of the long prompts (--long)
RESERVED_SEEDS = frozenset({0, *calibrate.SEEDS})      # the tests' and the calibration's


class BadInput(Exception):
    """One-line message, exit 2."""


def random_prompts(rng: np.random.Generator, n: int, n_regular: int, max_len: int,
                   min_len: int = 2) -> list[list[int]]:
    """``n`` prompts of min_len..max_len regular tokens (lengths and tokens uniform), none of
    them a calibration prompt."""
    out = []
    while len(out) < n:
        p = [int(t) for t in rng.integers(0, n_regular, size=int(rng.integers(min_len, max_len + 1)))]
        if p not in calibrate.PROMPTS:
            out.append(p)
    return out


def clean_run(path: str, device: str, tokens: list[int], steps: int, model=None):
    """One clean comparison -> (summary dict, the loaded model for reuse)."""
    req = DiffRequest(path, tokens=tokens, steps=steps, device=device)
    ref = capture_reference(req)
    model = model if model is not None else model_for(req, ref)
    cmp = diff_gguf(req, model=model, ref=ref).comparison
    t = cmp.table
    ratio = np.maximum(t["local_rel_l2"].astype(float) / t["local_tol_rel"].astype(float),
                       t["local_max_norm"].astype(float) / t["local_tol_max"].astype(float))
    headroom = {fam: float(r.max()) for fam, r in ratio.groupby(t["family"])}
    elem = ~t["local_elem_passed"].astype(bool) if "local_elem_passed" in t else ~t["local_passed"].astype(bool)
    flagged = t[t["sys_passed"].eq(False)] if "sys_passed" in t else t.iloc[:0]
    first = cmp.first
    return dict(prompt_len=len(tokens), tokens=tokens, diverged=cmp.diverged, elem_diverged=bool(elem.any()),
                sys_flags=[dict(step=int(r["step"]), site=r["site"], stat=r.get("sys_stat"))
                           for r in flagged.to_dict("records")],
                first=None if first is None else dict(step=first.step, layer=first.layer, site=first.site,
                                                      explanation=first.explanation),
                first_e2e=list(cmp.first_e2e) if cmp.first_e2e else None, headroom=headroom), model


@dataclass(frozen=True)
class Regime:
    """What one regime's clean runs are: ``seeds`` fresh weight seeds x ``per_seed`` prompts of
    2..max_prompt tokens (the first prompt of the first ``long`` seeds: LONG), ``steps`` decode steps."""
    preset: str
    wtype: str
    seeds: int
    per_seed: int
    long: int
    max_prompt: int
    steps: int
    tied: bool | None = None

    def label(self, device: str) -> str:
        return f"{device}/{self.preset}/{self.wtype}" + (" tied (mixed)" if self.tied else "")


def run_regime(reg: Regime, args, cache_dir: str) -> dict:
    """Every clean run of one regime, summarized."""
    t0, runs = time.time(), []
    rng = np.random.default_rng([args.first_seed, WEIGHT_TYPES.index(reg.wtype), list(PRESETS).index(reg.preset),
                                 int(bool(reg.tied))])
    n_regular = PRESETS[reg.preset].n_regular
    for seed in range(args.first_seed, args.first_seed + reg.seeds):
        path = default_fixture(reg.wtype, preset=reg.preset, seed=seed, cache_dir=cache_dir, tied=reg.tied)
        model = None
        prompts = random_prompts(rng, reg.per_seed, n_regular, reg.max_prompt)
        if seed - args.first_seed < reg.long:          # past the KV cache's 256-cell padding
            prompts[0] = random_prompts(rng, 1, n_regular, LONG[1], LONG[0])[0]
        for tokens in prompts:
            run, model = clean_run(path, args.device, tokens, reg.steps, model)
            runs.append(dict(seed=seed, **run))
            print(f"  {reg.label(args.device)} run {len(runs)}: seed {seed}, {run['prompt_len']} tokens, "   # a killed
                  f"{'DIVERGED' if run['diverged'] else 'clean'} ({time.time() - t0:.0f} s)",   # job keeps its count
                  file=sys.stderr, flush=True)
        del model
        if not args.keep_fixtures:
            os.remove(path)
    headroom: dict[str, float] = {}
    for r in runs:
        for fam, v in r["headroom"].items():
            headroom[fam] = max(headroom.get(fam, 0.0), v)
    return dict(regime=reg.label(args.device), runs=len(runs), steps=reg.steps, seeds=reg.seeds,
                divergences=sum(r["diverged"] for r in runs), e2e_failures=sum(r["first_e2e"] is not None for r in runs),
                elem_divergences=sum(r["elem_diverged"] for r in runs),
                sys_divergences=sum(bool(r["sys_flags"]) for r in runs),
                prompt_lens=[r["prompt_len"] for r in runs], headroom=headroom,
                diverged=[r for r in runs if r["diverged"]], seconds=round(time.time() - t0, 1))


def regimes(args) -> list[Regime]:
    out = [Regime(p, t, args.seeds, args.prompts_per_seed, args.long, args.max_prompt, args.steps)
           for p in args.presets for t in args.types]
    if args.mixed_runs:
        preset, wtype, tied = calibrate.MIXED
        per_seed = -(-args.mixed_runs // args.mixed_seeds)
        small = args.device == "cpu"           # 2 CPU cores: short prompts and few steps, as the calibration
        out.append(Regime(preset, wtype, args.mixed_seeds, per_seed, 0, 32 if small else args.max_prompt,
                          calibrate.CPU_BIG_STEPS if small else args.steps, tied))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/false_alarms.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--presets", default="tiny,tiny-qwen3", help=f"comma-separated, of {', '.join(PRESETS)}")
    p.add_argument("--types", default=",".join(WEIGHT_TYPES), help="comma-separated weight types")
    p.add_argument("--seeds", type=int, default=10, help="fresh weight seeds per regime")
    p.add_argument("--prompts-per-seed", type=int, default=2, help="random prompts per seed (runs = seeds x this)")
    p.add_argument("--first-seed", type=int, default=FIRST_SEED)
    p.add_argument("--steps", type=int, default=4, help="decode steps of every run")
    p.add_argument("--max-prompt", type=int, default=64, help="longest random prompt (tokens)")
    p.add_argument("--long", type=int, default=1, help=f"seeds whose first prompt is long instead "
                   f"({LONG[0]}-{LONG[1]} tokens, past the 256-cell KV padding)")
    p.add_argument("--mixed-runs", type=int, default=0, help="also this many runs of the mixed-type file "
                   "(qwen2.5-0.5b Q4_K_M tied, as published: Q5_0, Q8_0, Q4_K, Q6_K matrices; on the CPU prompts "
                   "of up to 32 tokens and 3 decode steps)")
    p.add_argument("--mixed-seeds", type=int, default=2, help="fresh weight seeds the mixed runs are spread over")
    p.add_argument("--cache-dir", default=None, help="where fixtures are written (default: a temporary folder)")
    p.add_argument("--keep-fixtures", action="store_true", help="keep each GGUF after its runs")
    p.add_argument("--out", default=None, help="also write every run's result to this JSON file")
    args = p.parse_args(argv)
    args.presets, args.types = [x for x in args.presets.split(",") if x], [x for x in args.types.split(",") if x]
    for x in args.presets:
        if x not in PRESETS:
            raise BadInput(f"unknown preset {x!r} (choose from {', '.join(PRESETS)})")
    for x in args.types:
        if x not in WEIGHT_TYPES:
            raise BadInput(f"unknown weight type {x!r} (choose from {', '.join(WEIGHT_TYPES)})")
    used = set(range(args.first_seed, args.first_seed + args.seeds)) & RESERVED_SEEDS
    if used:
        raise BadInput(f"seeds {sorted(used)} are the tests' or the calibration's: use --first-seed above "
                       f"{max(RESERVED_SEEDS)}")
    used = set(range(args.first_seed, args.first_seed + args.mixed_seeds)) & RESERVED_SEEDS if args.mixed_runs else ()
    if used:
        raise BadInput(f"seeds {sorted(used)} are the tests' or the calibration's: use --first-seed above "
                       f"{max(RESERVED_SEEDS)}")
    if min(args.seeds, args.prompts_per_seed, args.mixed_seeds) < 1 \
            or min(args.steps, args.long, args.first_seed, args.mixed_runs) < 0 \
            or args.max_prompt < 2:
        raise BadInput("--seeds, --prompts-per-seed and --mixed-seeds must be >= 1, --max-prompt >= 2, --steps, "
                       "--long, --mixed-runs and --first-seed >= 0")
    return args


def write_json(path: str, data) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def report(results: list[dict], args) -> None:
    print(f"clean runs: {args.seeds} seeds from {args.first_seed} x {args.prompts_per_seed} random prompts of "
          f"2-{args.max_prompt} tokens (the first prompt of {args.long} seed(s): {LONG[0]}-{LONG[1]}), "
          f"{args.steps} decode steps, device {args.device}\n")
    fams = sorted({f for r in results for f in r["headroom"]})
    print("| regime | seeds | runs | decode steps | divergences | element-wise | systematic | e2e failures | "
          "worst local / tolerance | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        worst = max(r["headroom"], key=r["headroom"].get)
        print(f"| {r['regime']} | {r['seeds']} | {r['runs']} | {r['steps']} | {r['divergences']} | "
              f"{r['elem_divergences']} | {r['sys_divergences']} | {r['e2e_failures']} | "
              f"{r['headroom'][worst]:.2f} ({worst}) | {r['seconds']} |")
    print("\nworst clean local error / tolerance per family, over all regimes: " + ", ".join(
        f"{f} {max(r['headroom'].get(f, 0.0) for r in results):.2g}" for f in fams))
    for r in results:
        for d in r["diverged"]:
            print(f"FALSE ALARM {r['regime']} seed {d['seed']} prompt {d['tokens']}: {d['first']['explanation']}")


def _errors() -> tuple[type, ...]:
    from harness.gguf.load import GGUFError
    from harness.llama.lib import LlamaUnavailable
    from harness.llama.runner import LlamaError
    from harness.synth import SynthError
    return BadInput, GGUFError, LlamaUnavailable, LlamaError, SynthError, OSError


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        import torch
        if args.device == "cuda" and not torch.cuda.is_available():
            raise BadInput("--device cuda but torch sees no CUDA device")
        if args.device == "cpu":
            torch.set_num_threads(1)       # tiny models: more intra-op threads only contend
        with tempfile.TemporaryDirectory(prefix="false_alarms-") as tmp:
            cache = args.cache_dir or tmp
            results = []
            for reg in regimes(args):
                results.append(run_regime(reg, args, cache))
                r = results[-1]
                print(f"{r['regime']}: {r['runs']} runs, {r['divergences']} divergences ({r['seconds']} s)",
                      file=sys.stderr, flush=True)
        report(results, args)
        if args.out:
            write_json(args.out, dict(command="python benchmarks/false_alarms.py " + " ".join(
                sys.argv[1:] if argv is None else argv), regimes=results))
    except _errors() as e:
        print(f"false_alarms: error: {e}", file=sys.stderr)
        return 2
    return 1 if any(r["divergences"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
