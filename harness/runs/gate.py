"""The CI gate: re-run a candidate against a recorded reference run and say pass or fail.

``run_gate`` takes a reference run (see :mod:`harness.runs.store`) and a candidate: ``"torch"`` (our
PyTorch model on the recorded tokens, built from the GGUF the run was recorded on, found next to
the recorded path or given explicitly, and checked by sha256) or the path of another trace. For
the torch candidate it also measures local errors by anchoring every op on the recorded
reference's inputs, exactly as ``llamadiff report`` does against a live llama.cpp, so the verdict
names the op at fault (:func:`replay`, which the notebook's ``drilldown(ref=RUN)`` runs too).
Outputs for CI systems: :func:`junit_xml` (one test case per layer, plus the global sites, each
failure carrying its first failing row) and :func:`markdown_summary`.
"""
from __future__ import annotations

import datetime
import os
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from harness.compare.comparator import Comparison, decisive_column, layer_group, step_label
from harness.provenance import machine_provenance, numerics_differences, summary_line
from harness.runs.store import RecordedRun, RunError, check_compatible, compare_runs, load_run, sha256_file

_SYNTH_RE = re.compile(r"^synthetic-(.+)-(f32|f16|q8_0|q4_k_m)-s(\d+)(-tied)?$")   # harness.synth's general.name


@dataclass
class Group:
    name: str                       # "embd", "blk.0", ..., "output_norm", "logits"
    n: int
    failed: int
    first_failure: dict | None      # the group's first failing table row
    worst_rel: float
    worst_local_rel: float | None


@dataclass
class GateResult:
    run: RecordedRun
    comparison: Comparison
    candidate: str                  # "torch float32 (faults: ...)" or the candidate trace's path
    gguf: str | None
    faults: list[str] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)   # provenance differences; never change the verdict

    @property
    def passed(self) -> bool:
        return not self.comparison.diverged

    @property
    def decisive(self) -> str:
        """The table column that decides: local errors when measured, else end to end."""
        return decisive_column(self.comparison.table)

    def groups(self) -> list[Group]:
        t, col = self.comparison.table, self.decisive
        if t.empty:
            return []
        out = []
        for name, part in t.groupby(layer_group(t), sort=False):
            bad = part[part[col] == False]  # noqa: E712  (NA rows are not failures)
            local = part["local_rel_l2"].astype(float) if "local_rel_l2" in part else None
            out.append(Group(str(name), len(part), len(bad), bad.iloc[0].to_dict() if len(bad) else None,
                             float(part["rel_l2"].max()),
                             float(local.max()) if local is not None and local.notna().any() else None))
        return out


# -- finding the model -------------------------------------------------------------------------
def regenerate_hint(run: RecordedRun) -> str:
    g = run.manifest.get("gguf") or {}
    m = _SYNTH_RE.match(str(g.get("general_name", "")))
    if not m:
        return ""
    preset, wtype, seed, tied = m.groups()
    target = g.get("path") or g.get("file")
    return (f"; it is a synthetic fixture: regenerate it with 'llamadiff synth {target} --preset {preset} "
            f"--type {wtype} --seed {seed}{' --tied' if tied else ''}'")


def locate_gguf(run: RecordedRun, model: str | None = None) -> str:
    """The GGUF the run was recorded on: ``model`` if given, else the recorded path (relative to
    the working directory or to the folder holding the runs' folder), else next to the run;
    its sha256 must match the manifest's."""
    g = run.manifest.get("gguf") if isinstance(run.manifest.get("gguf"), dict) else {}
    want = g.get("sha256")
    if model is not None:
        if not os.path.isfile(model):
            raise RunError(f"--model {model}: no such file")
        candidates = [model]
    else:
        if not g.get("path") and not g.get("file"):
            raise RunError(f"{run.path}: the manifest names no GGUF; pass --model PATH")
        run_dir = os.path.abspath(run.path)
        root = os.path.dirname(os.path.dirname(run_dir))
        candidates = []
        if g.get("path"):
            p = g["path"]
            candidates += [p] if os.path.isabs(p) else [p, os.path.join(root, p)]
        if g.get("file"):
            candidates += [os.path.join(run_dir, g["file"]), os.path.join(os.path.dirname(run_dir), g["file"])]
        seen, existing = set(), []
        for c in candidates:
            r = os.path.realpath(c)
            if r not in seen and os.path.isfile(r):
                seen.add(r)
                existing.append(c)
        if not existing:
            looked = ", ".join(dict.fromkeys(os.path.relpath(c) for c in candidates))
            raise RunError(f"{run.path}: GGUF {g.get('file') or g.get('path')} not found (looked at {looked}); "
                           f"pass --model PATH{regenerate_hint(run)}")
        candidates = existing
    if not want:
        return candidates[0]
    got = [sha256_file(c) for c in candidates]
    for c, h in zip(candidates, got):
        if h == want:
            return c
    raise RunError(f"{candidates[0]}: sha256 {got[0][:16]}... does not match the run's GGUF ({want[:16]}...): "
                   f"the run was recorded on a different file{regenerate_hint(run)}")


# -- the gate ----------------------------------------------------------------------------------
def run_gate(run_path, candidate: str = "torch", model: str | None = None, faults=(), device: str = "cpu",
             dtype: str = "float32") -> GateResult:
    """Compare ``candidate`` with the reference run at ``run_path``; RunError on input problems."""
    t0 = time.time()
    run = load_run(run_path)
    faults = list(faults)
    if candidate != "torch":
        if faults:
            raise RunError("--inject works on the torch candidate only")
        cand = load_run(candidate)
        cmp, gguf, note = _gate_trace(run, cand, model)
        warnings = _provenance_warnings(run, cand.provenance, cmp) + ([note] if note else [])
        return GateResult(run, cmp, cand.path, gguf, [], time.time() - t0, warnings)

    gguf = locate_gguf(run, model)
    cmp = replay(run, gguf, faults, device, dtype)[0].comparison
    desc = f"torch {dtype} on {device}" + (f" with faults {', '.join(cmp.meta['faults'])}" if faults else "")
    warnings = _provenance_warnings(run, torch_provenance(run, device), cmp)
    return GateResult(run, cmp, desc, gguf, cmp.meta["faults"], time.time() - t0, warnings)


def _gate_trace(run: RecordedRun, cand: RecordedRun, model: str | None):
    """Another engine's trace against the run: decided by each op's local error (our op on the
    trace's own inputs, :func:`harness.check.check`) when the run's GGUF is found, else end to end
    with a warning. Returns (comparison, GGUF or None, warning or None)."""
    from harness.check import CheckError, CheckRequest, check
    try:
        gguf = locate_gguf(run, model)
    except RunError:
        if model is not None:
            raise
        return compare_runs(run, cand), None, ("the run's GGUF was not found: end-to-end verdict only, drift "
                                               "included (pass --model GGUF for each op's local error)")
    try:                    # check() reads the run, checking tokens and shapes against the trace
        res = check(CheckRequest(engine=cand.path, gguf=gguf, reference=run.path))
    except CheckError as e:
        raise RunError(str(e)) from None
    return res.comparison, gguf, None


def replay(run: RecordedRun, gguf: str, faults=(), device: str = "cpu", dtype: str = "float32",
           sites: str | None = None, local: bool = True, model=None):
    """Our model against a recorded reference run: built from ``gguf`` (or ``model``, already
    loaded) to mirror the recorded backend and KV type, run on the run's tokens with ``faults``
    over the recorded sites (or those matching ``sites``), end to end and, with ``local``, anchored
    on the recorded tensors, then compared (:func:`~harness.runs.store.compare_runs`). What the torch
    candidate of ``llamadiff gate`` and the notebook's ``drilldown(ref=RUN)`` run. Returns
    ``(DiffResult, DiffRequest)``; RunError when the model does not fit the run."""
    from harness.diff import DiffRequest, DiffResult, model_for, run_ours, site_weight_types
    from harness.sites import SiteFilter, all_sites
    faults, ref = list(faults), run.trace
    req = DiffRequest(gguf, tokens=list(ref.tokens[:ref.n_prompt]), steps=ref.n_steps, device=device, dtype=dtype,
                      sites=sites, faults=faults, kv_type=run.engine.get("kv_type", "f16"), local=local)
    net = model if model is not None else model_for(req, ref)
    cfg = net.config
    if cfg.n_layer != ref.n_layer:
        raise RunError(f"{gguf} has {cfg.n_layer} layers, the run {ref.n_layer}")
    if max(ref.tokens) >= cfg.n_vocab:
        raise RunError(f"the run's token {max(ref.tokens)} is outside {gguf}'s vocabulary ({cfg.n_vocab})")
    if sites:
        filt = SiteFilter(sites)
    else:
        recorded = ref.sites()
        filt = None if len(recorded) == len(all_sites(ref.n_layer, cfg.spec.sites)) else SiteFilter(",".join(recorded))
    ours = run_ours(net, ref, faults, filt)
    check_compatible(ref, ours, run.path, "our model")
    loc = run_ours(net, ref, faults, filt, anchor=ref) if local else None
    cmp = compare_runs(run, ours, loc, dtype=dtype, site_types=site_weight_types(net.gguf))
    cmp.meta["faults"] = [f.name for f in faults]
    return DiffResult(cmp, ref, ours, loc), req


def torch_provenance(run: RecordedRun, device: str = "cpu") -> dict:
    """What the torch candidate stands for: this machine, the recorded backend's numerics as our
    model mirrors them (the recorded KV type), and what the tolerances were calibrated on (plain
    ggml kernels: no extra buffer types, no flash attention). llama.cpp is not needed."""
    return {**machine_provenance(device), "backend": run.backend, "kv_type": run.engine.get("kv_type", "f16"),
            "extra_bufts": False, "flash_attn": False}


def _provenance_warnings(run: RecordedRun, current: dict, cmp: Comparison) -> list[str]:
    warnings = numerics_differences(run.provenance, current)
    if warnings:
        cmp.meta["provenance_warnings"] = warnings
    cmp.meta["candidate_provenance"] = current
    return warnings


# -- CI outputs --------------------------------------------------------------------------------
def _num(x) -> str:
    try:
        return f"{float(x):.3g}"
    except (TypeError, ValueError):
        return "-"


def failure_line(row: dict, decisive: str) -> str:
    """One line for a failing row: where, which error, against which tolerance."""
    where = f"{row['site']} at {step_label(int(row['step']))}"
    if decisive == "local_passed":
        return (f"{where}: local rel_l2 {_num(row.get('local_rel_l2'))} (tolerance {_num(row.get('local_tol_rel'))}), "
                f"max {_num(row.get('local_max_norm'))} (tolerance {_num(row.get('local_tol_max'))}), worst "
                f"{row.get('local_worst')}: ours {_num(row.get('local_ours'))}, reference {_num(row.get('local_ref'))}")
    return (f"{where}: rel_l2 {_num(row['rel_l2'])} (tolerance {_num(row['tol_rel'])}), max {_num(row['max_norm'])} "
            f"(tolerance {_num(row['tol_max'])}), worst {row['worst']}: ours {_num(row['ours'])}, "
            f"reference {_num(row['ref'])}")


def junit_xml(res: GateResult) -> str:
    """JUnit XML: one suite per gate, one test case per site group (layer or global site)."""
    groups, col = res.groups(), res.decisive
    failures = sum(1 for g in groups if g.failed)
    cls = f"llamadiff.gate.{res.run.name}"
    suites = ET.Element("testsuites", name="llamadiff gate", tests=str(len(groups)), failures=str(failures),
                        errors="0", time=f"{res.seconds:.3f}")
    suite = ET.SubElement(suites, "testsuite", name=cls, tests=str(len(groups)), failures=str(failures),
                          errors="0", skipped="0", time=f"{res.seconds:.3f}",
                          timestamp=datetime.datetime.now().isoformat(timespec="seconds"))
    props = ET.SubElement(suite, "properties")
    pol = res.comparison.meta.get("policy", {})
    for k, v in (("reference", res.run.path), ("candidate", res.candidate), ("gguf", res.gguf or ""),
                 ("policy", f"{pol.get('regime')} (calibrated from {pol.get('calibrated_from')})"),
                 ("storage_dtype", res.run.storage), ("decided_by", col.replace("_passed", "") or "e2e")):
        ET.SubElement(props, "property", name=k, value=str(v))
    ET.SubElement(props, "property", name="reference_provenance", value=summary_line(res.run.trace.meta))
    for w in res.warnings:
        ET.SubElement(props, "property", name="provenance_warning", value=w)
    t = res.comparison.table
    key = layer_group(t) if groups else None
    for g in groups:
        case = ET.SubElement(suite, "testcase", classname=cls, name=g.name, time="0")
        if g.first_failure is None:
            continue
        bad = t[(key == g.name) & (t[col] == False)]  # noqa: E712
        lines = [failure_line(r, col) for r in bad.head(20).to_dict("records")]
        if len(bad) > 20:
            lines.append(f"... {len(bad) - 20} more")
        f = ET.SubElement(case, "failure", type="divergence",
                          message=f"{g.failed} of {g.n} site tensors out of tolerance; first: "
                                  f"{failure_line(g.first_failure, col)}")
        f.text = "\n".join(lines)
    if res.warnings:   # after the test cases, as the JUnit schema orders it
        ET.SubElement(suite, "system-out").text = "\n".join(f"warning: {w}" for w in res.warnings)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def markdown_summary(res: GateResult) -> str:
    """A short markdown page (e.g. for $GITHUB_STEP_SUMMARY)."""
    from harness.report.text import render_markdown, verdict_line
    cmp, run, col = res.comparison, res.run, res.decisive
    m, ref = run.manifest, run.trace
    pol = cmp.meta.get("policy", {})
    eng = run.engine
    status = "PASS" if res.passed else "FAIL"
    lines = [f"## llamadiff gate `{run.name}`: **{status}**", "",
             "| | |", "|---|---|",
             f"| reference | `{run.path}`: {eng.get('name', '?')} {eng.get('backend', '')} "
             f"(KV {eng.get('kv_type', '?')}, "
             f"flash attention {'on' if eng.get('flash_attn') else 'off'}), weights {run.weight_type or '?'}, "
             f"{ref.n_prompt}-token prompt + {ref.n_steps} decode steps, stored {run.storage} |",
             f"| candidate | {res.candidate} |"]
    if res.gguf:
        lines.append(f"| model | `{res.gguf}` (sha256 {str((m.get('gguf') or {}).get('sha256', '?'))[:16]}...) |")
    lines += [f"| compared | {cmp.meta.get('compared')} site tensors; verdict from "
              f"{'local' if col == 'local_passed' else 'end-to-end'} errors |",
              f"| provenance | {summary_line(ref.meta).replace('reference provenance: ', '', 1)} |",
              f"| tolerance | regime {pol.get('regime')} (calibrated from {pol.get('calibrated_from')}), policy "
              f"version {pol.get('version')}, storage {pol.get('storage_dtype', 'float32')} |", "",
              f"**{verdict_line(cmp)}**", ""]
    if res.warnings:
        lines += ["Provenance warnings (they do not change the verdict):", ""]
        lines += [f"- warning: {w}" for w in res.warnings] + [""]
    groups = res.groups()
    if groups:
        lines += ["| group | site tensors | failed | worst rel (e2e) | worst rel (local) | first failure |",
                  "|---|---:|---:|---:|---:|---|"]
        for g in groups:
            first = failure_line(g.first_failure, col) if g.first_failure else ""
            lines.append(f"| {g.name} | {g.n} | {g.failed} | {_num(g.worst_rel)} | {_num(g.worst_local_rel)} | "
                         f"{first} |")
        lines.append("")
    report = render_markdown(cmp).replace("# llamadiff report", "### full report", 1)
    lines += ["<details><summary>full report</summary>", "", report, "</details>", ""]
    return "\n".join(lines)
