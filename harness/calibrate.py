"""Calibrate the tolerance policy on clean fixtures: ``python -m harness.calibrate [--device cuda]``.

For every weight type it writes synthetic tiny fixtures with the calibration seeds (disjoint from
the seed the tests use), runs clean comparisons against llama.cpp on a few prompts, records the
worst local and end-to-end error per site family, and merges the result into
``harness/compare/tolerances.json`` (see :mod:`harness.compare.tolerance` for how errors become tolerances).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from harness.diff import DiffRequest, diff_gguf
from harness.synth import default_fixture
from harness.compare.tolerance import TABLE_PATH, Policy, build_table, weight_class

SEEDS = (1, 2, 3)
PROMPTS = ([1, 2, 3, 4, 5, 6, 7], [900, 17, 4, 250, 33, 1000, 7, 61, 5, 88, 123, 9, 77, 2, 640, 31, 8, 11, 300],
           list(range(40, 72)), list(range(5, 995, 3)))  # 7, 19, 32, 330 tokens
STEPS = 6


def _worst(observed: dict, regime: str, kind: str, table, rel_col: str, max_col: str) -> None:
    fams = observed.setdefault(regime, {}).setdefault(kind, {})
    for fam, part in table.groupby("family"):
        r, m = float(part[rel_col].astype(float).max()), float(part[max_col].astype(float).max())
        old = fams.get(fam, (0.0, 0.0))
        fams[fam] = (max(old[0], r), max(old[1], m))


def measure(device: str, wtypes, preset: str = "tiny", cache_dir: str | None = None,
            observed: dict | None = None) -> dict:
    """Worst clean errors per regime/kind/family. Presets other than tiny use the first seed only."""
    observed = {} if observed is None else observed
    for wtype in wtypes:
        for seed in SEEDS if preset == "tiny" else SEEDS[:1]:
            path = default_fixture(wtype, preset=preset, seed=seed, cache_dir=cache_dir)
            for prompt in PROMPTS:
                res = diff_gguf(DiffRequest(path, tokens=prompt, steps=STEPS, device=device))

                # the regime the policy will look up for this file (harness.compare.tolerance.weight_class)
                regime = f"{res.ref.meta.get('backend', device)}/{weight_class(res.ref.meta['weight_type'])}/float32"
                t = res.comparison.table
                _worst(observed, regime, "e2e", t, "rel_l2", "max_norm")
                _worst(observed, regime, "local", t, "local_rel_l2", "local_max_norm")
    return observed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.calibrate")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--types", default="f32,f16,q8_0,q4_k_m")
    p.add_argument("--preset", default="tiny", help="comma-separated presets, e.g. tiny,qwen2.5-0.5b")
    p.add_argument("--big-types", default="f16,q4_k_m", help="weight types for presets other than tiny")
    p.add_argument("--out", default=TABLE_PATH)
    args = p.parse_args(argv)
    observed: dict = {}
    for preset in args.preset.split(","):
        types = args.types if preset == "tiny" else args.big_types
        measure(args.device, types.split(","), preset, observed=observed)
    old, old_prov = {}, {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)
        old, old_prov = previous.get("observed", {}), previous.get("provenance", {})
    old.update(observed)
    prov = dict(command="python -m harness.calibrate " + " ".join(argv or sys.argv[1:]), seeds=SEEDS,
                prompts=[len(x) for x in PROMPTS], steps=STEPS, preset=args.preset,
                date=datetime.date.today().isoformat())
    old_prov = {k: v for k, v in old_prov.items() if k in ("cpu", "cuda")}
    old_prov[args.device] = prov
    table = build_table(old, old_prov)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, args.out)
    for regime in observed:
        pol = Policy(*regime.split("/")[:2], table=table)
        print(regime, {fam: (f"{t.rel:.2g}", f"{t.max:.2g}") for fam in observed[regime]["local"]
                       for t in [pol.tolerance(fam, "local")]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
