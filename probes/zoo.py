"""The fault zoo: inject every named fault, diff against llama.cpp, check where it was found.

``run_zoo`` captures llama.cpp's reference trace once, loads our model once, then runs one
clean comparison and one comparison per fault (``diff_gguf(req, model=model, ref=ref)``: two
PyTorch runs each, the ordinary one and the local one anchored on the reference). It returns
plain data (:class:`ZooResult`: one record per fault); ``probes.render`` turns it into
text. A fault is a *hit* when the first divergence is exactly its expected (step, layer, site),
or when it cannot show in this run (expected None) and nothing diverges; the clean run must
find nothing (else: *false alarm*). User faults without an expected location are *unscored*.
A fault that does not exist in the GGUF's architecture (:meth:`Fault.applies_to`: the QKV-bias
fault on qwen3, the Q/K-norm faults on qwen2) is *skipped*, with the reason, and not scored.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import pandas as pd

from harness.compare.comparator import step_label
from harness.gguf.load import read_config_file
from harness.diff import DiffRequest, capture_reference, diff_gguf, model_for
from harness.sites import validate_pattern

from probes.context import DEFAULT_PROMPT
from harness.ours.inject import REGISTRY, Fault, RunInfo, get_fault, is_registered

CLEAN_NAME = "(clean)"
OK_STATUSES = ("hit", "clean", "unscored", "skipped")


def format_location(loc) -> str:
    """``(0, 0, "blk.0.q")`` -> ``"prefill blk.0.q"``; None -> ``"none"``."""
    if loc is None:
        return "none"
    step, _, site = loc
    return f"{step_label(step)} {site}"


@dataclass
class ZooResult:
    rows: list[dict]                         # one per fault, the clean run first
    meta: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No miss and no false alarm."""
        return all(r["status"] in OK_STATUSES for r in self.rows)

    @property
    def failures(self) -> list[dict]:
        return [r for r in self.rows if r["status"] not in OK_STATUSES]

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def _found(cmp):
    f = cmp.first
    return None if f is None else (f.step, f.layer, f.site)


def _status(expected, found, known: bool) -> str:
    if not known:
        return "unscored"
    return "hit" if expected == found else "miss"


def _record(name: str, fault: Fault | None, expected, known: bool, res, seconds: float) -> dict:
    cmp = res.comparison
    found = _found(cmp)
    if fault is None:
        status = "clean" if found is None else "false alarm"
    else:
        status = _status(expected, found, known)
    row = cmp.first.row if cmp.first is not None else {}
    return dict(
        fault=name, expected=format_location(expected) if known else "?", found=format_location(found),
        status=status, expected_loc=expected if known else None, found_loc=found,
        local_rel_l2=row.get("local_rel_l2"), tol_rel=row.get("local_tol_rel"),
        explanation=cmp.first.explanation if cmp.first is not None else "no divergence",
        where_doc=fault.where_doc if fault is not None else "", seconds=round(seconds, 3))


def _skipped(fault: Fault, reason: str) -> dict:
    return dict(fault=fault.name, expected="-", found="-", status="skipped", expected_loc=None, found_loc=None,
                local_rel_l2=None, tol_rel=None, explanation=reason, where_doc=fault.where_doc, seconds=0.0,
                architectures=list(fault.architectures or ()), arch_note=fault.arch_note)


def resolve_faults(faults=None) -> list[Fault]:
    """Fault records from names, ``module:function@pattern`` specs or Fault objects (all
    registered faults when None)."""
    if faults is None:
        return list(REGISTRY.values())
    return [get_fault(f) for f in faults]


def run_zoo(gguf: str, tokens: list[int] | None = None, prompt: str | None = None, steps: int = 3,
            faults=None, device: str = "cpu", dtype: str = "float32", kv_type: str = "f16",
            ref=None, model=None, progress=None, extra_bufts: bool = False) -> ZooResult:
    """Clean run + every fault in ``faults`` (default: the whole registry) on one GGUF.

    ``ref``/``model`` may be passed in to reuse a capture and a loaded model (they must belong
    to the same GGUF and tokens). Neither ``tokens`` nor ``prompt``: DEFAULT_PROMPT, tokenized by
    llama.cpp. ``progress(name)`` is called before each run."""
    todo = resolve_faults(faults)
    if tokens is None and prompt is None:
        prompt = DEFAULT_PROMPT
    req = DiffRequest(gguf, prompt=prompt, tokens=tokens, steps=steps, device=device, dtype=dtype,
                      kv_type=kv_type, extra_bufts=extra_bufts)
    cfg = read_config_file(str(gguf))
    skip = {f.name: f.skip_reason(cfg.architecture) for f in todo}
    for f in todo:
        if skip[f.name] is None and not is_registered(f):   # a user fault's typo: SiteError, before any work
            validate_pattern(f.patterns, cfg.n_layer, cfg.spec.sites)
    t0 = time.perf_counter()
    ref = ref if ref is not None else capture_reference(req)
    t_ref = time.perf_counter() - t0
    model = model if model is not None else model_for(req, ref)
    run = RunInfo(model.config, n_prompt=ref.n_prompt, n_steps=ref.n_steps, ref=ref, gguf=str(gguf))
    rows = []
    for fault in [None] + todo:
        name = CLEAN_NAME if fault is None else fault.name
        if fault is not None and skip[name] is not None:
            rows.append(_skipped(fault, skip[name]))
            continue
        if progress is not None:
            progress(name)
        expected, known = None, True
        if fault is not None:
            known = fault.known
            expected = fault.where(run) if known else None
        t = time.perf_counter()
        res = diff_gguf(DiffRequest(gguf, prompt=prompt, tokens=tokens, steps=steps, device=device, dtype=dtype,
                                    kv_type=kv_type, extra_bufts=extra_bufts,
                                    faults=[] if fault is None else [fault]),
                        model=model, ref=ref)
        rows.append(_record(name, fault, expected, known, res, time.perf_counter() - t))
        if fault is None:
            clean_policy = res.comparison.meta.get("policy", {})
    meta = dict(gguf=str(gguf), architecture=cfg.architecture, weight_type=model.gguf.weight_type, tokens=list(ref.tokens),
                n_prompt=ref.n_prompt, steps=ref.n_steps, policy=clean_policy,
                reference_seconds=round(t_ref, 3), total_seconds=round(time.perf_counter() - t0, 3))
    return ZooResult(rows, meta)
