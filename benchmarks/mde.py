"""Minimum detectable effect of llamadiff, and the systematic-error null behind it.

    python benchmarks/mde.py null  --device cpu [--presets tiny,tiny-qwen3] [--mixed]
        calibrate the systematic statistics' null (harness/compare/systematic.json) on clean
        runs of the calibration fixtures (harness.calibrate's seeds and prompts)
    python benchmarks/mde.py mde   --device cpu --regimes tiny/f32,tiny/q4_k_m,mixed --out DIR/mde-cpu
        the MDE table (markdown + json), before (element-wise tolerance) and after (also the
        systematic statistics), from one run of the code; see harness/mde.py
    python benchmarks/mde.py clean --device cpu --regimes ... --runs 20
        false alarms of both verdicts on clean runs with fresh seeds and prompts

Regimes: ``PRESET/TYPE`` (e.g. tiny/q8_0, qwen2.5-0.5b/f16) or ``mixed`` (qwen2.5-0.5b, Q4_K_M, tied:
Q5_0/Q8_0/Q4_K/Q6_K matrices as in the published file).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import mde  # noqa: E402
from harness.compare import systematic  # noqa: E402
from harness.compare.comparator import compare_traces  # noqa: E402
from harness.diff import DiffRequest, capture_reference, model_for, model_policy, run_ours  # noqa: E402
from harness.synth import default_fixture  # noqa: E402

CACHE = os.path.join("build", "fixtures")
MDE_SEEDS = (11, 12, 13)        # disjoint from the tests' (0) and the calibration's (1, 2, 3)


def fixture(regime: str, seed: int) -> str:
    if regime == "mixed":
        return default_fixture("q4_k_m", preset="qwen2.5-0.5b", seed=seed, cache_dir=CACHE, tied=True)
    preset, wtype = regime.split("/")
    return default_fixture(wtype, preset=preset, seed=seed, cache_dir=CACHE)


def prompt_for(seed: int, n: int) -> list[int]:
    rng = random.Random(seed * 7919 + n)
    return [rng.randrange(3, 1000) for _ in range(n)]


def captured(path: str, device: str, tokens: list[int], steps: int, model=None):
    req = DiffRequest(path, tokens=tokens, steps=steps, device=device)
    ref = capture_reference(req)
    return (model if model is not None else model_for(req, ref)), ref


def cmd_null(args) -> int:
    from harness.calibrate import PROMPTS, SEEDS, STEPS
    observed: dict = {}
    t0, runs = time.time(), 0
    previous = systematic.Null().table if os.path.exists(systematic.NULL_PATH) else None
    if previous is not None and args.fresh:
        previous = dict(previous, observed={r: v for r, v in previous.get("observed", {}).items()
                                            if not r.startswith(args.device + "/")})
    empty = systematic.Null.collecting()          # compute every statistic, judge nothing
    tiny = ("tiny", "tiny-qwen3")
    seeds = SEEDS[:1] if args.census else SEEDS
    targets = [(f"{p}/{t}", s) for p in args.presets.split(",")
               for t in (args.types if p in tiny else args.big_types).split(",") for s in (seeds if p in tiny else SEEDS[:1])]
    if args.mixed:
        targets.append(("mixed", SEEDS[0]))
    for regime, seed in targets:
        path = fixture(regime, seed)
        big = regime == "mixed" or regime.split("/")[0] not in ("tiny", "tiny-qwen3")
        prompts = PROMPTS[:3] if big and args.device == "cpu" else PROMPTS
        prompts = [max(prompts, key=len)] if args.census else prompts
        steps = 3 if big and args.device == "cpu" else STEPS
        model = None
        for tokens in prompts:
            model, ref = captured(path, args.device, tokens, steps, model)
            ours = run_ours(model, ref)
            local = run_ours(model, ref, anchor=ref)
            table = compare_traces(ours, ref, model_policy(model, ref.meta.get("backend", "cpu")), local,
                                       systematic=empty).table
            systematic.observe(observed, table)
            runs += 1
        print(f"{regime} s{seed}: {len(prompts)} prompts x {steps} steps ({time.time() - t0:.0f} s)", flush=True)
        _write_null(args, observed, previous, runs, t0, f"{regime} s{seed}")   # a time limit keeps what is done
    for regime in sorted(observed):
        print(" ", regime, {f: {s: round(v[0], 2) for s, v in st.items() if s in systematic.STATS}
                            for f, st in sorted(observed[regime].items())})
    return 0


def cmd_sizes(args) -> int:
    """Copy the largest calibrated tensor sizes (``n_max``) of a null computed here (the same
    fixtures, prompts and steps give the same shapes on every device) into another device's
    regimes of the shipped null: for a null whose GPU run predates ``n_max``."""
    with open(args.source) as f:
        src = json.load(f)
    table = systematic.Null().table
    n_max = table.setdefault("n_max", {})
    for regime, fams in src.get("n_max", {}).items():
        if regime.startswith(args.to + "/"):
            continue
        target = args.to + "/" + regime.split("/", 1)[1]
        if target in table.get("thresholds", {}):
            n_max[target] = dict(fams)
            table["observed"][target] = {f: dict(st, n=fams.get(f, 0)) for f, st in table["observed"][target].items()}
    table.setdefault("provenance", {}).setdefault(args.to, {})["n_max_from"] = src.get("provenance", {})
    systematic.write_null(table)
    print({r: v for r, v in n_max.items() if r.startswith(args.to + "/")})
    return 0


def _write_null(args, observed, previous, runs, t0, last) -> None:
    prov = {args.device: dict(command="python benchmarks/mde.py " + " ".join(sys.argv[1:]), runs=runs, last=last,
                              seconds=round(time.time() - t0, 1), date=time.strftime("%Y-%m-%d"))}
    systematic.write_null(systematic.build_null(observed, prov, previous), args.out or systematic.NULL_PATH)


def cmd_mde(args) -> int:
    families = args.families.split(",")
    kinds = args.kinds.split(",")
    null = systematic.Null()
    rows, t0 = [], time.time()
    for regime in args.regimes.split(","):
        seeds = [int(s) for s in args.seeds.split(",")][: (args.big_seeds if _big(regime) else None)]
        for seed in seeds:
            model, ref = captured(fixture(regime, seed), args.device, prompt_for(seed, args.prompt_len), args.steps)
            clean = mde.clean_verdicts(model, ref, null)
            for r in mde.measure_run(model, ref, families, kinds, args.step, null, args.iters):
                rows.append(dict(regime=regime, seed=seed, clean_before=clean.before, clean_after=clean.after, **r))
            print(f"{regime} seed {seed}: {time.time() - t0:.0f} s (clean run: {clean.after or 'no divergence'})",
                  flush=True)
            del model
            text = _write_mde(args, rows, t0)        # after every run: a time limit keeps what is done
    print(text)
    return 0


def _write_mde(args, rows, t0) -> str:
    summary = mde.summarize(rows)
    meta = dict(command="python benchmarks/mde.py " + " ".join(sys.argv[1:]), device=args.device,
                card=_card(args.device), seconds=round(time.time() - t0, 1), step=args.step,
                prompt_len=args.prompt_len, steps=args.steps, iters=args.iters, range=[mde.E_LO, mde.E_HI])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for ext, text in ((".json", json.dumps(dict(meta=meta, summary=summary, runs=rows), indent=1, default=str)),
                      (".md", render(summary, meta))):
        with open(args.out + ext + ".tmp", "w") as f:
            f.write(text)
        os.replace(args.out + ext + ".tmp", args.out + ext)
    return render(summary, meta)


def _big(regime: str) -> bool:
    return regime == "mixed" or not regime.startswith("tiny")


def _card(device: str) -> str:
    import torch
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform
    return platform.processor() or platform.machine()


def render(summary: list[dict], meta: dict) -> str:
    """Markdown: per regime, families x kinds, each cell ``before -> after``."""
    kinds = list(dict.fromkeys(r["kind"] for r in summary))
    out = [f"MDE (smallest e localized at its exact (step {meta['step']}, site) on every seed; "
           f"before = element-wise tolerance, after = + systematic statistics) on {meta['device']} "
           f"({meta['card']}), `{meta['command']}`, {meta['seconds']:.0f} s", ""]
    for regime in dict.fromkeys(r["regime"] for r in summary):
        out += [f"**{regime}**", "", "| family (site) | " + " | ".join(f"{k} before -> after" for k in kinds) + " |",
                "|---|" + "---|" * len(kinds)]
        by = {(r["family"], r["kind"]): r for r in summary if r["regime"] == regime}
        for fam in dict.fromkeys(r["family"] for r in summary if r["regime"] == regime):
            cells = [f"{mde.fmt(by[(fam, k)]['before'])} -> {mde.fmt(by[(fam, k)]['after'])}" if (fam, k) in by
                     else "n/a" for k in kinds]
            site = by[(fam, kinds[0])]["site"] if (fam, kinds[0]) in by else ""
            out.append(f"| {fam} ({site}) | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def cmd_clean(args) -> int:
    null = systematic.Null()
    report, t0 = {}, time.time()
    for regime in args.regimes.split(","):
        alarms = dict(runs=0, before=0, after=0, examples=[])
        n_runs = args.big_runs if _big(regime) else args.runs
        model, path = None, None
        for i in range(n_runs):
            seed = args.big_seed if _big(regime) else 100 + i % args.fixtures
            if fixture(regime, seed) != path:
                path, model = fixture(regime, seed), None
            model, ref = captured(path, args.device, prompt_for(1000 + i, 5 + (7 * i) % 40), 1 + i % 4, model)
            v = mde.clean_verdicts(model, ref, null)
            alarms["runs"] += 1
            alarms["before"] += v.before is not None
            alarms["after"] += v.after is not None
            if v.after is not None:
                alarms["examples"].append(dict(seed=seed, run=i, first=v.after))
        report[regime] = alarms
        print(regime, alarms, f"({time.time() - t0:.0f} s)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(command="python benchmarks/mde.py " + " ".join(sys.argv[1:]), device=args.device,
                           card=_card(args.device), regimes=report), f, indent=1, default=str)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("null")
    n.add_argument("--presets", default="tiny,tiny-qwen3")
    n.add_argument("--types", default="f32,f16,q8_0,q4_k_m")
    n.add_argument("--big-types", default="f16,q4_k_m", help="weight types of the other presets (seed 1 only)")
    n.add_argument("--mixed", action="store_true")
    n.add_argument("--fresh", action="store_true", help="drop this device's stored null first")
    n.add_argument("--census", action="store_true", help="only the sizes: the first seed and longest prompt "
                   "(the largest tensors of a full run); see `sizes`")
    n.add_argument("--out", default=None)
    m = sub.add_parser("mde")
    m.add_argument("--regimes", default="tiny/f32,tiny/f16,tiny/q8_0,tiny/q4_k_m,mixed")
    m.add_argument("--families", default=",".join(mde.FAMILY_SITES))
    m.add_argument("--kinds", default=",".join(mde.KINDS))
    m.add_argument("--seeds", default=",".join(map(str, MDE_SEEDS)))
    m.add_argument("--big-seeds", type=int, default=1, help="seeds of the 0.5B-shaped regimes")
    m.add_argument("--prompt-len", type=int, default=12)
    m.add_argument("--steps", type=int, default=2)
    m.add_argument("--step", type=int, default=0, help="the step perturbed (0 = prefill)")
    m.add_argument("--iters", type=int, default=mde.ITERS)
    m.add_argument("--out", default="build/mde")
    z = sub.add_parser("sizes")
    z.add_argument("source", help="a null json computed on this machine over the same fixtures")
    z.add_argument("--to", default="cuda", help="the device whose regimes get the sizes")
    c = sub.add_parser("clean")
    c.add_argument("--regimes", default="tiny/f32,tiny/f16,tiny/q8_0,tiny/q4_k_m")
    c.add_argument("--runs", type=int, default=20)
    c.add_argument("--big-runs", type=int, default=3)
    c.add_argument("--fixtures", type=int, default=4, help="fresh fixture seeds cycled over (100, 101, ...)")
    c.add_argument("--big-seed", type=int, default=100, help="the one fixture seed of the 0.5B-shaped regimes")
    c.add_argument("--out", default=None)
    for s in (n, m, c, z):
        s.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny models: 1 is fastest)")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    return {"null": cmd_null, "mde": cmd_mde, "clean": cmd_clean, "sizes": cmd_sizes}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
