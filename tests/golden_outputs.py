"""Golden CLI outputs: capture every ``llamadiff`` command's output on the tiny fixtures, and diff two captures.

Proof of "no change of behaviour" for a refactor: capture before, capture after, diff.

    .venv/bin/python tests/golden_outputs.py write OUT_DIR [--quick]
    .venv/bin/python tests/golden_outputs.py diff DIR_A DIR_B        # exit 0 identical, 1 otherwise

``write`` runs ``python -m harness.cli ...`` in subprocesses (cwd = repo root, so it survives module moves)
and writes one JSON file per command into OUT_DIR (argv, exit code, stdout parsed as JSON or as a list of
lines, the last line of stderr, and the text of files the command wrote), plus ``index.json``. Commands:
``synth`` (stdout + sha256 of the GGUF) and, per weight type f32/f16/q8_0/q4_k_m: ``report`` clean and with
every fault that ``faults --format json`` lists, ``zoo``, ``probe`` (torch, llama, torch + 4 faults),
``gate`` on ``reference_runs/tiny-W`` clean and with drop_qkv_bias (with --junit/--summary); then
``compare`` tiny-f32 with itself and ``faults`` as json and markdown. Fixtures live in build/fixtures
(the reference runs' manifests point there); missing ones are written by ``synth``.
``--quick``: f32 only, the first 3 faults. A full write (115 commands)
takes about 6 minutes on 2 cores (measured 347 s and 394 s); --quick (17) about 70 s.

Normalization (everything else is kept exactly, floats included; leaves compare by their JSON text):
- JSON keys matching seconds|elapsed|created|time|_s$ (``seconds``, ``total_seconds``, ``reference_seconds``)
  get the value "<t>": wall-clock timings. The key stays, so a dropped or renamed key shows. ("_s" only as
  a suffix: as a substring it would blank logit_spikes and llama_cpp_system_info.)
- ``time="..."`` and ``timestamp="..."`` in the JUnit XML (gate run time, wall-clock date): "<t>".
- The OUT_DIR, repo-root and temp-dir prefixes in any string become <OUT>, <REPO>, <TMP>.
Two consecutive full writes on the same machine were identical with only these.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = ["--tokens", "3,14,15,92,65,35,89,79", "--steps", "3"]
WTYPES = ["f32", "f16", "q8_0", "q4_k_m"]
PROBE_FAULTS = ["drop_qkv_bias", "rope_interleaved", "kv_pos_stuck", "lm_head_transpose"]
TIMING_KEY = re.compile(r"seconds|elapsed|created|time|_s$")
TIMING_ATTR = re.compile(r'\b(time|timestamp)="[^"]*"')


def cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900)


def normalize(x, subs: list[tuple[str, str]]):
    if isinstance(x, dict):
        return {k: "<t>" if TIMING_KEY.search(k) else normalize(v, subs) for k, v in x.items()}
    if isinstance(x, list):
        return [normalize(v, subs) for v in x]
    if isinstance(x, str):
        for prefix, placeholder in subs:
            x = x.replace(prefix, placeholder)
        return TIMING_ATTR.sub(r'\1="<t>"', x)
    return x


def fault_names(parsed) -> list[str]:
    """Names from whatever ``faults --format json`` prints: a list of dicts/strings, or a dict."""
    if isinstance(parsed, dict):
        parsed = parsed.get("faults", parsed)
        if isinstance(parsed, dict):
            return list(parsed)
    return [f if isinstance(f, str) else f["name"] for f in parsed]


def commands(quick: bool, faults: list[str], tmp: str) -> list[tuple[str, list[str], list[str]]]:
    """(name, argv, files the command writes) for every capture."""
    out = []
    for w in WTYPES[:1] if quick else WTYPES:
        model = f"build/fixtures/tiny-{w}-s0.gguf"
        out.append((f"report-{w}-clean", ["report", model, *TOKENS, "--format", "json"], []))
        out += [(f"report-{w}-{f}", ["report", model, *TOKENS, "--format", "json", "--inject", f], [])
                for f in faults]
        out.append((f"zoo-{w}", ["zoo", model, *TOKENS, "--format", "json"], []))
        for src in ("torch", "llama"):
            out.append((f"probe-{w}-{src}", ["probe", model, *TOKENS, "--format", "json", "--source", src], []))
        out += [(f"probe-{w}-torch-{f}", ["probe", model, *TOKENS, "--format", "json", "--source", "torch",
                                          "--inject", f], []) for f in PROBE_FAULTS]
        for tag, extra in (("clean", []), ("drop_qkv_bias", ["--inject", "drop_qkv_bias"])):
            files = [os.path.join(tmp, f"gate-{w}-{tag}.xml"), os.path.join(tmp, f"gate-{w}-{tag}.md")]
            out.append((f"gate-{w}-{tag}", ["gate", f"reference_runs/tiny-{w}", "--format", "json", *extra,
                                            "--junit", files[0], "--summary", files[1]], files))
    out.append(("compare-f32-f32", ["compare", "reference_runs/tiny-f32", "reference_runs/tiny-f32",
                                    "--format", "json"], []))
    out += [(f"faults-{fmt}", ["faults", "--format", fmt], []) for fmt in ("json", "markdown")]
    return out


def capture(argv: list[str], files: list[str], subs) -> dict:
    for f in files:
        if os.path.exists(f):
            os.unlink(f)
    p = cli(argv)
    try:
        stdout = json.loads(p.stdout)
    except ValueError:
        stdout = p.stdout.splitlines()
    err = p.stderr.strip().splitlines()
    texts = {}
    for f in files:
        texts[os.path.basename(f)] = open(f).read().splitlines() if os.path.exists(f) else None
    return normalize({"argv": argv, "rc": p.returncode, "stdout": stdout,
                      "stderr_last": err[-1] if err else "", "files": texts}, subs)


def write(out_dir: str, quick: bool) -> int:
    t_start = time.time()
    out_dir = os.path.abspath(out_dir)
    tmp = os.path.join(out_dir, ".tmp")
    os.makedirs(tmp, exist_ok=True)
    subs = [(tmp, "<TMP>"), (out_dir, "<OUT>"), (REPO, "<REPO>")]
    dump = lambda name, obj: json.dump(obj, open(os.path.join(out_dir, name + ".json"), "w"), indent=1)
    index = []
    for w in WTYPES[:1] if quick else WTYPES:        # synth: its output, and the fixtures the rest use
        gguf = os.path.join(tmp, f"tiny-{w}-s0.gguf")
        argv = ["synth", gguf, "--preset", "tiny", "--type", w, "--seed", "0"]
        rec = capture(argv, [], subs)
        rec["sha256"] = hashlib.sha256(open(gguf, "rb").read()).hexdigest() if rec["rc"] == 0 else None
        fixture = os.path.join(REPO, "build", "fixtures", f"tiny-{w}-s0.gguf")
        if not os.path.exists(fixture) and rec["rc"] == 0:
            os.makedirs(os.path.dirname(fixture), exist_ok=True)
            shutil.copyfile(gguf, fixture + ".part")
            os.replace(fixture + ".part", fixture)
        rec["fixture_sha256"] = (hashlib.sha256(open(fixture, "rb").read()).hexdigest()
                                 if os.path.exists(fixture) else None)
        dump(f"synth-{w}", rec)
        index.append({"name": f"synth-{w}", "argv": rec["argv"], "rc": rec["rc"]})
    p = cli(["faults", "--format", "json"])
    faults = fault_names(json.loads(p.stdout))
    for name, argv, files in commands(quick, faults[:3] if quick else faults, tmp):
        t0 = time.time()
        rec = capture(argv, files, subs)
        dump(name, rec)
        index.append({"name": name, "argv": rec["argv"], "rc": rec["rc"]})
        print(f"{name}: rc {rec['rc']} ({time.time() - t0:.1f} s)", file=sys.stderr, flush=True)
    dump("index", index)
    shutil.rmtree(tmp)
    print(f"wrote {len(index)} captures to {out_dir} in {time.time() - t_start:.0f} s")
    return 0


def first_diff(a, b, path="$"):
    """(path, value_a, value_b) of the first difference, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            if k not in b:
                return f"{path}.{k}", a[k], "<missing>"
            d = first_diff(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        extra = [k for k in b if k not in a]
        if extra:
            return f"{path}.{extra[0]}", "<missing>", b[extra[0]]
        return None if list(a) == list(b) else (f"{path} (key order)", list(a), list(b))
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_diff(x, y, f"{path}[{i}]")
            if d:
                return d
        return None if len(a) == len(b) else (f"{path} (length)", len(a), len(b))
    return None if json.dumps(a) == json.dumps(b) else (path, a, b)


def diff(dir_a: str, dir_b: str) -> int:
    names = lambda d: {f for f in os.listdir(d) if f.endswith(".json")}
    na, nb = names(dir_a), names(dir_b)
    bad = 0
    for f in sorted(na ^ nb):
        print(f"{f}: only in {dir_a if f in na else dir_b}")
        bad += 1
    for f in sorted(na & nb):
        d = first_diff(json.load(open(os.path.join(dir_a, f))), json.load(open(os.path.join(dir_b, f))))
        if d:
            short = lambda v: (s if len(s := json.dumps(v)) < 300 else s[:300] + "...")
            print(f"{f}: first difference at {d[0]}\n  A: {short(d[1])}\n  B: {short(d[2])}")
            bad += 1
    print(f"{len(na | nb)} files, {bad} differ" if bad else f"identical ({len(na)} files)")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("out_dir")
    w.add_argument("--quick", action="store_true", help="f32 only, the first 3 faults")
    d = sub.add_parser("diff")
    d.add_argument("dir_a")
    d.add_argument("dir_b")
    args = ap.parse_args()
    return write(args.out_dir, args.quick) if args.cmd == "write" else diff(args.dir_a, args.dir_b)


if __name__ == "__main__":
    sys.exit(main())
