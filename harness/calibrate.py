"""Calibrate the tolerance policy on clean fixtures: ``python -m harness.calibrate [--device cuda]``.

For every preset and weight type it writes synthetic fixtures with the calibration seeds
(disjoint from the seed the tests use), runs clean comparisons against llama.cpp on a few
prompts, and records the worst local and end-to-end error per regime and site family. Each row
is counted under the regime the policy itself looked up for it (the table's ``tol_regime`` and
``local_tol_regime`` columns): the local errors of weight matmuls (``matmul``, ``logits``) under
the class of their *own* weight's ggml type, everything else under the file's class (see
:mod:`harness.compare.tolerance`). So one Q4_K_M file calibrates q4 (its Q4_K matrices), q6
(Q6_K), and, for the real-shaped 0.5B mix (``--mixed``), q5 (Q5_0) and q8 (Q8_0) too.

The result is merged into ``harness/compare/tolerances.json``: a regime measured now takes the
worst of its stored and new observations when both were measured under the current policy
version; stored regimes of an older version (another grouping) are replaced; regimes not
measured now, and the other backend's, are kept as they are. ``--fresh`` drops this backend's
stored regimes first (after a change that makes errors smaller).

    python -m harness.calibrate --preset tiny,tiny-qwen3 --mixed             # CPU
    python -m harness.calibrate --device cuda --preset tiny,tiny-qwen3,qwen2.5-0.5b,qwen3-0.6b --mixed
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from harness.compare.tolerance import POLICY_VERSION, TABLE_PATH, Policy, build_table
from harness.diff import DiffRequest, capture_reference, diff_gguf, model_for
from harness.synth import PRESETS, default_fixture

SEEDS = (1, 2, 3)
PROMPTS = ([1, 2, 3, 4, 5, 6, 7], [900, 17, 4, 250, 33, 1000, 7, 61, 5, 88, 123, 9, 77, 2, 640, 31, 8, 11, 300],
           list(range(40, 72)), list(range(5, 995, 3)))  # 7, 19, 32, 330 tokens
STEPS = 6
TINY = ("tiny", "tiny-qwen3")          # presets calibrated with every seed and prompt
# The mixed-type file: Qwen2.5-0.5B shapes, Q4_K_M, tied, as published (Q5_0 132, F32 121, Q8_0 13,
# Q4_K 12, Q6_K 12 tensors). On the CPU (2 cores) only short prompts and few steps.
MIXED = ("qwen2.5-0.5b", "q4_k_m", True)
CPU_BIG_PROMPTS, CPU_BIG_STEPS = PROMPTS[:3], 3


def _worst(observed: dict, counts: dict, table, regime_col: str, kind: str, rel_col: str,
           max_col: str) -> set[str]:
    """Fold a divergence table's worst errors into ``observed[regime][kind][family]`` (and the
    number of (step, site) samples into ``counts[regime][kind][family]``); returns the regimes
    it touched."""
    if regime_col not in table:
        raise RuntimeError(f"the comparison table has no {regime_col} column (policy older than calibrate.py)")
    part_all = table[table[rel_col].notna()]
    for (regime, fam), part in part_all.groupby([regime_col, "family"]):
        r, m = float(part[rel_col].astype(float).max()), float(part[max_col].astype(float).max())
        fams = observed.setdefault(regime, {}).setdefault(kind, {})
        old = fams.get(fam, (0.0, 0.0))
        fams[fam] = (max(old[0], r), max(old[1], m))
        n = counts.setdefault(regime, {}).setdefault(kind, {})
        n[fam] = n.get(fam, 0) + len(part)
    return set(part_all[regime_col])


def measure_file(path: str, device: str, prompts, steps: int, observed: dict, sources: dict, label: str,
                 counts: dict | None = None, dump: list | None = None) -> float:
    """Clean comparisons of one GGUF on ``prompts`` (one model load), folded into ``observed``;
    ``sources[regime]`` collects ``label``; ``dump`` (a list) gets every row's local error.
    Returns the seconds it took."""
    counts = {} if counts is None else counts
    t0, model = time.time(), None
    for prompt in prompts:
        req = DiffRequest(path, tokens=prompt, steps=steps, device=device)
        ref = capture_reference(req)
        model = model if model is not None else model_for(req, ref)
        res = diff_gguf(req, model=model, ref=ref)
        if res.comparison.diverged:
            print(f"warning: {label} prompt of {len(prompt)} tokens diverges under the current table: "
                  f"{res.comparison.first.explanation}", file=sys.stderr)
        t = res.comparison.table
        touched = _worst(observed, counts, t, "tol_regime", "e2e", "rel_l2", "max_norm")
        touched |= _worst(observed, counts, t, "local_tol_regime", "local", "local_rel_l2", "local_max_norm")
        if dump is not None:
            cols = ["step", "site", "family", "local_tol_regime", "local_rel_l2", "local_max_norm", "rel_l2"]
            dump += [dict(fixture=label, prompt=len(prompt), **r) for r in t[cols].to_dict("records")]
        for regime in touched:
            sources.setdefault(regime, set()).add(label)
    del model
    return time.time() - t0


def fixtures(presets, types, big_types, mixed: bool, cache_dir: str | None):
    """(label, path, seeds-used) of every fixture a run measures, written if missing."""
    out = []
    for preset in presets:
        tiny = preset in TINY
        for wtype in (types if tiny else big_types):
            for seed in (SEEDS if tiny else SEEDS[:1]):
                out.append((f"{preset} {wtype} s{seed}", tiny,
                            lambda p=preset, w=wtype, s=seed: default_fixture(w, preset=p, seed=s, cache_dir=cache_dir)))
    if mixed:
        preset, wtype, tied = MIXED
        out.append((f"{preset} {wtype} tied s{SEEDS[0]}", False,
                    lambda: default_fixture(wtype, preset=preset, seed=SEEDS[0], cache_dir=cache_dir, tied=tied)))
    return out


def merge(previous: dict, observed: dict, sources: dict, device: str, fresh: bool, run: dict,
          counts: dict | None = None) -> tuple[dict, dict]:
    """(observations, per-regime provenance) after folding this run's into the stored table."""
    old = {r: v for r, v in previous.get("observed", {}).items() if not (fresh and r.startswith(device + "/"))}
    by_regime = dict((previous.get("provenance") or {}).get("regimes") or {})
    for regime, kinds in observed.items():
        stored = by_regime.get(regime) or {}
        samples = ((counts or {}).get(regime) or {}).get("local", {})
        if regime in old and stored.get("version") == POLICY_VERSION:
            for kind, fams in kinds.items():
                mine = old[regime].setdefault(kind, {})
                for fam, (r, m) in fams.items():
                    o = mine.get(fam, (0.0, 0.0))
                    mine[fam] = (max(o[0], r), max(o[1], m))
            runs = stored.get("runs", []) + [run]
            fixt = sorted(set(stored.get("fixtures", [])) | sources.get(regime, set()))
            prev = stored.get("local_samples", {})
            samples = {f: samples.get(f, 0) + prev.get(f, 0) for f in set(samples) | set(prev)}
        else:
            old[regime] = kinds
            runs, fixt = [run], sorted(sources.get(regime, set()))
        by_regime[regime] = dict(version=POLICY_VERSION, runs=runs, fixtures=fixt, local_samples=samples)
    for r in list(by_regime):
        if r not in old:
            del by_regime[r]
    return old, by_regime


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="tiny", help=f"comma-separated presets (of {', '.join(PRESETS)}); "
                   f"{', '.join(TINY)}: every seed and prompt, others: seed {SEEDS[0]}")
    p.add_argument("--types", default="f32,f16,q8_0,q4_k_m", help="weight types of the tiny presets")
    p.add_argument("--big-types", default="f16,q4_k_m", help="weight types of the other presets")
    p.add_argument("--mixed", action="store_true", help="also the mixed-type file: qwen2.5-0.5b q4_k_m "
                   "tied (Q5_0, Q8_0, Q4_K, Q6_K matrices as in the published Q4_K_M)")
    p.add_argument("--fresh", action="store_true", help="drop this backend's stored regimes instead of merging")
    p.add_argument("--cache-dir", default=None, help="where fixtures are written (default build/fixtures)")
    p.add_argument("--out", default=TABLE_PATH)
    p.add_argument("--dump", default=None, help="also write every compared row's errors to this CSV")
    args = p.parse_args(argv)
    presets = [x for x in args.preset.split(",") if x]
    for x in presets:
        if x not in PRESETS:
            p.error(f"unknown preset {x!r} (choose from {', '.join(PRESETS)})")
    t_start = time.time()
    observed: dict = {}
    sources: dict = {}
    counts: dict = {}
    dump: list | None = [] if args.dump else None
    timings = {}
    for label, tiny, make in fixtures(presets, args.types.split(","), args.big_types.split(","), args.mixed,
                                      args.cache_dir):
        t0 = time.time()
        path = make()
        t_synth = time.time() - t0
        small = tiny or args.device == "cuda"
        prompts, steps = (PROMPTS, STEPS) if small else (CPU_BIG_PROMPTS, CPU_BIG_STEPS)
        t_run = measure_file(path, args.device, prompts, steps, observed, sources, label, counts, dump)
        timings[label] = dict(synth_s=round(t_synth, 1), compare_s=round(t_run, 1),
                              prompts=[len(x) for x in prompts], steps=steps)
        print(f"{label}: {len(prompts)} prompts x {steps} steps in {t_run:.1f} s (fixture {t_synth:.1f} s)",
              flush=True)
    run = dict(command="python -m harness.calibrate " + " ".join(sys.argv[1:] if argv is None else argv),
               device=args.device, date=datetime.date.today().isoformat(),
               seconds=round(time.time() - t_start, 1), fixtures=timings)
    previous = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)
    obs, by_regime = merge(previous, observed, sources, args.device, args.fresh, run, counts)
    if dump is not None:
        import pandas as pd
        pd.DataFrame(dump).to_csv(args.dump, index=False)
    prov = {k: v for k, v in (previous.get("provenance") or {}).items() if k in ("cpu", "cuda")}
    prov[args.device] = {k: v for k, v in run.items() if k != "fixtures"}
    prov["regimes"] = by_regime
    prov["seeds"], prov["steps"], prov["prompts"] = list(SEEDS), STEPS, [len(x) for x in PROMPTS]
    prov["cpu_big"] = dict(prompts=[len(x) for x in CPU_BIG_PROMPTS], steps=CPU_BIG_STEPS)
    table = build_table(obs, prov)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} in {time.time() - t_start:.0f} s; local tolerances (rel, max) per regime:")
    for regime in sorted(observed):
        backend, wc, _ = regime.split("/")
        pol = Policy(backend, "F32", table=table)
        fams = table["observed"][regime].get("local", {})
        print(" ", regime, {fam: (f"{t.rel:.2g}", f"{t.max:.2g}") for fam in sorted(fams)
                            for t in [pol.tolerance(fam, "local", wclass=wc)]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
