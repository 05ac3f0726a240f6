"""How far llama.cpp's own CPU results move between CPU models, and whether the gate still holds.

For each committed reference run (reference_runs/tiny-*, recorded on one CPU), on this machine:
1. regenerate its GGUF (same bytes, sha256-checked by the gate), capture llama.cpp live on the
   recorded tokens (CPU backend, extra buffer types off, as recorded) and measure the end-to-end
   relative L2 error between the live tensors and the recorded ones, per site family;
2. gate our PyTorch model against the recorded run (as CI does) and report the worst local error
   as a fraction of its tolerance.

    python benchmarks/cross_cpu.py [--out results.md]

Prints a markdown table; the CPU it ran on is in the header (compare it with the runs' manifests).
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from harness.runs.gate import run_gate  # noqa: E402
from harness.llama.runner import LlamaOptions  # noqa: E402
from harness.llama.worker import capture  # noqa: E402
from harness.provenance import machine_provenance  # noqa: E402
from harness.runs.store import load_run  # noqa: E402
from harness.sites import parse_site  # noqa: E402
from harness.synth import default_fixture  # noqa: E402

TYPES = ("f32", "f16", "q8_0", "q4_k_m")


def rel_l2(a, b) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    den = float(b.norm())
    return float((a - b).norm()) / den if den else float((a - b).norm())


def measure(wtype: str) -> dict:
    run = load_run(os.path.join(ROOT, "reference_runs", f"tiny-{wtype}"))
    gguf = default_fixture(wtype, preset="tiny", seed=0, cache_dir=os.path.join(ROOT, "build", "fixtures"))
    ref = run.trace
    live = capture(gguf, ref.tokens[:ref.n_prompt], ref.n_steps, decode_tokens=ref.tokens[ref.n_prompt:],
                   options=LlamaOptions(device="cpu", kv_type=run.engine.get("kv_type", "f16")))
    fam: dict[str, float] = {}
    for key, r in ref.items():
        e = rel_l2(live[key], r)
        f = parse_site(key[1])[1].family
        fam[f] = max(fam.get(f, 0.0), e)
    gate = run_gate(run.path, model=gguf)
    t = gate.comparison.table
    ratio = (t["local_rel_l2"].astype(float) / t["local_tol_rel"].astype(float)).max()
    recorded_on = (run.engine.get("device_name") or "?")
    return dict(wtype=wtype, recorded_on=recorded_on, families=fam, worst=max(fam.values()),
                gate=gate.passed, local_ratio=float(ratio))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the markdown here")
    a = ap.parse_args()
    prov = machine_provenance("cpu")
    rows = [measure(w) for w in TYPES]
    fams = sorted({f for r in rows for f in r["families"]})
    lines = [f"llama.cpp CPU, live on `{prov.get('cpu_model', '?')}` "
             f"(ISA: {', '.join(prov.get('cpu_flags', [])) or '?'}) vs the committed runs", "",
             "| run | recorded on | worst e2e rel L2 | " + " | ".join(fams) + " | gate | worst local / tol |",
             "|---|---|---|" + "---|" * len(fams) + "---|---|"]
    for r in rows:
        lines.append(f"| tiny-{r['wtype']} | {r['recorded_on']} | {r['worst']:.2e} | "
                     + " | ".join(f"{r['families'].get(f, 0):.1e}" for f in fams)
                     + f" | {'pass' if r['gate'] else 'FAIL'} | {r['local_ratio']:.3f} |")
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0 if all(r["gate"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
