"""Check another engine's trace against llama.cpp on the same GGUF, op by op.

In: an engine's trace (the trace format of docs/trace-format.md) and the GGUF it ran, or a recorded
llama.cpp run of the same tokens plus that GGUF. Out: a :class:`CheckResult` (plain data).

* llama.cpp runs live on exactly the trace's tokens (prefill, then the same decode inputs,
  teacher-forced), capturing the sites the trace has; or a recorded run is read instead.
* Each op of the engine is recomputed with our PyTorch op on *the engine's own inputs* from the
  same trace (``Model.run_with_cache(anchor=engine)``) and compared with the engine's own output:
  its local error, free of the drift that builds up end to end. It decides the first divergence.
  Where the trace lacks an op's input, the recomputation starts from the nearest upstream sites
  it has (the local error then spans the missing ops, and says so).
* End to end, every tensor of the engine is compared with llama.cpp's, which tells which inputs
  of the failing op the engine and llama.cpp agree on.
* Sites llama.cpp has and the trace lacks are listed as not checkable, never as passing.

Tolerances: the regime of llama.cpp's backend and the GGUF's weight types; a site the engine
stored in float16/bfloat16 (or whose recomputation reads one) gets room for that rounding only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from harness.compare.comparator import Comparator, Comparison, step_label, systematic_words
from harness.compare.tolerance import FLOOR_UNITS, UNIT_ROUNDOFF, Tol, max_floor
from harness.runs.store import LAST_ROW_SITES
from harness.sites import SiteFilter, all_sites, input_sites, parse_site, shape_of
from harness.trace import Trace


@dataclass
class CheckRequest:
    engine: str | None = None          # the engine's trace directory (None: ``candidate`` is given)
    gguf: str | None = None            # the GGUF the engine ran: our weights, and llama.cpp's live run
    reference: str | None = None       # a recorded llama.cpp run of the same tokens, instead of a live run
    device: str = "cpu"                # where llama.cpp and our recomputation run
    kv_type: str = "f16"               # llama.cpp's KV cache type in the live run (its default)
    extra_bufts: bool = False
    isolate: bool = True
    engine_kv: str | None = None       # the engine's KV cache type, "f16" or "f32" (our recomputation of
                                       # kq/kqv reads its cache so rounded); None: the trace's engine.kv_type, else f32


@dataclass
class CheckResult:
    comparison: Comparison
    engine: Trace
    ref: Trace
    local: Trace
    not_checkable: list[str] = field(default_factory=list)   # "blk.{0-3}.kq at every step", ...


class CheckError(Exception):
    """An engine trace, GGUF or reference that cannot be checked; ``str()`` is one line."""


# -- inputs --------------------------------------------------------------------------------------
def load_engine(path: str):
    """The engine's trace as a RecordedRun (every tensor validated; RunError -> CheckError)."""
    from harness.runs.store import RunError, load_run
    try:
        return load_run(path)
    except RunError as e:
        raise CheckError(str(e)) from None


def engine_filter(engine: Trace) -> SiteFilter:
    """The sites (and steps) the engine's trace has: what llama.cpp needs to capture."""
    return SiteFilter(",".join(engine.sites()), steps=frozenset(engine.steps()))


def live_reference(req: CheckRequest, engine: Trace) -> Trace:
    """llama.cpp on exactly the engine's tokens: its prompt, then its decode inputs teacher-forced."""
    from harness.llama.runner import LlamaOptions
    from harness.llama.worker import open_runner
    opts = LlamaOptions(device=req.device, kv_type=req.kv_type, extra_bufts=req.extra_bufts, isolate=req.isolate)
    prompt, forced = engine.tokens[:engine.n_prompt], engine.tokens[engine.n_prompt:]
    with open_runner(req.gguf, opts, n_ctx_needed=len(engine.tokens) + 1) as runner:
        return runner.run(prompt, len(forced), forced, filt=engine_filter(engine))


def recorded_reference(path: str, engine: Trace) -> Trace:
    from harness.runs.store import RunError, check_compatible, load_run
    try:
        ref = load_run(path, filt=engine_filter(engine))
        check_compatible(ref.trace, _rows_as(engine, ref.trace), path, "the engine's trace")
    except RunError as e:
        raise CheckError(str(e)) from None
    if len(ref.trace.tokens) < len(engine.tokens):
        raise CheckError(f"{path} has {ref.trace.n_steps} decode steps, the engine's trace {engine.n_steps}: "
                         "record the reference with at least as many (llamadiff record --steps)")
    return ref.trace


def _rows_as(engine: Trace, ref: Trace) -> Trace:
    """The engine's trace with the reference's tensor where the engine kept last rows only (for
    :func:`~harness.runs.store.check_compatible`, which checks shapes)."""
    out = Trace(engine.n_layer, engine.tokens, engine.n_prompt, engine.meta, dict(engine.tensors))
    for key, t in engine.tensors.items():
        r = ref.tensors.get(key)
        if r is not None and t.dim() == r.dim() and t.shape[0] < r.shape[0]:
            out.tensors[key] = r
    return out


def check_model_fits(config, engine: Trace, name: str) -> None:
    """CheckError unless every tensor of the trace has the shape the GGUF's model gives its site."""
    if config.n_layer != engine.n_layer:
        raise CheckError(f"{name} has {engine.n_layer} layers, the GGUF {config.n_layer}: not the same model")
    bad = next((t for t in engine.tokens if not 0 <= int(t) < config.n_vocab), None)
    if bad is not None:
        raise CheckError(f"{name}: token id {bad} out of range (the GGUF's vocabulary has {config.n_vocab} tokens)")
    for (step, site), t in engine.tensors.items():
        key = parse_site(site)[1].key
        if key not in config.spec.sites:
            raise CheckError(f"{name} has {site}, which {config.architecture} models do not have")
        T = engine.n_prompt if step == 0 else 1
        want = shape_of(site, config.dims(T, (0 if step == 0 else engine.n_prompt + step - 1) + T))
        got = tuple(t.shape)
        if got != want and not (key in LAST_ROW_SITES and got == (1, *want[1:])):
            raise CheckError(f"{name}: {step}/{site} is {list(got)}, the GGUF's model gives {list(want)}: "
                             "not the same model")


# -- the recomputation and the comparison ---------------------------------------------------------
def engine_local(model, engine: Trace) -> Trace:
    """Each op of ours run on the engine's own inputs (every site the trace has is replaced by the
    engine's value once recorded): the recorded value at a site is what that op should give."""
    prompt, forced = engine.tokens[:engine.n_prompt], engine.tokens[engine.n_prompt:]
    return model.run_with_cache(prompt, len(forced), forced, anchor=engine)


def anchors_of(site: str, present: set[str], op_inputs: dict | None = None) -> list[str]:
    """The sites of the trace an op's recomputation starts from: its input sites, or for an input
    the trace lacks, that input's own (recursively). The layer input of layer 0 is ``embd``."""
    out, todo, seen = [], list(input_sites(site, op_inputs)), set()
    while todo:
        s = todo.pop(0)
        if s in seen:
            continue
        seen.add(s)
        if s in present:
            out.append(s)
        else:
            todo += input_sites(s, op_inputs)
    return out


def span_of(site: str, present: set[str], op_inputs: dict | None = None) -> list[str]:
    """The ops a local error at ``site`` covers: the site, and the missing sites between it and
    its anchors (``[site]`` when the trace has every input)."""
    out, todo = [site], [s for s in input_sites(site, op_inputs) if s not in present]
    while todo:
        s = todo.pop(0)
        if s not in out:
            out.append(s)
            todo += [x for x in input_sites(s, op_inputs) if x not in present]
    return out[::-1]


class SiteStoragePolicy:
    """A tolerance policy widened per site for half-precision storage: end to end where either
    trace stored the site in float16/bfloat16; locally where the engine stored the site or an
    anchor of its recomputation so. Everything else is the wrapped policy's."""

    def __init__(self, policy, storage: dict[tuple[str, str], str]):
        # (site, kind) -> "float16" / "bfloat16"; not named ``storage``, which on a policy means the
        # whole reference's storage dtype (StoragePolicy; a Comparator turns the statistics off for it).
        # A widened site's regime label names its storage, which the systematic null never calibrated,
        # so the statistics do not judge it.
        self.policy, self.site_storage = policy, storage

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def class_of(self, site, family, kind="local"):
        c, s = self.policy.class_of(site, family, kind), self.site_storage.get((site, kind))
        return c if s is None else f"{c}+{s}"

    def lookup(self, site, family, kind="local"):
        tol, label = self.policy.lookup(site, family, kind)
        s = self.site_storage.get((site, kind))
        if s is None:
            return tol, label
        floor = FLOOR_UNITS * UNIT_ROUNDOFF[s]
        return Tol(max(tol.rel, floor), max(tol.max, max_floor(family, floor))), f"{label}+{s} storage"

    def describe(self) -> dict:
        d = self.policy.describe()
        widened = sorted({site for (site, _), s in self.site_storage.items()})
        if widened:
            d["storage_widened"] = widened
        return d


def storage_widening(dtypes: dict[tuple[int, str], str], sites: list[str], op_inputs=None) -> dict:
    """(site, kind) -> the least precise storage that tolerance must allow for (see
    :class:`SiteStoragePolicy`); ``dtypes``: (step, site) -> storage dtype of the engine's tensors."""
    low: dict[str, str] = {}
    for (_, site), s in dtypes.items():
        if s != "float32" and UNIT_ROUNDOFF[s] > UNIT_ROUNDOFF.get(low.get(site, "float32"), 0):
            low[site] = s
    present, out = set(sites), {}
    for site in sites:
        worst = [low[x] for x in [site] + anchors_of(site, present, op_inputs) if x in low]
        if worst:
            out[(site, "local")] = max(worst, key=UNIT_ROUNDOFF.get)
        if site in low:
            out[(site, "e2e")] = low[site]
    return out


def compare_engine(engine: Trace, ref: Trace, local: Trace, policy) -> Comparison:
    """Divergence table of the engine against llama.cpp (end to end) with each op's local error
    (our op on the engine's inputs against the engine's output), which decides."""
    c = Comparator(policy, batched=False, n_prompt=engine.n_prompt if engine.tokens else None)
    for key, r in ref.items():
        e = engine.tensors.get(key)
        if e is None:
            continue
        if e.dim() == r.dim() and e.shape[0] < r.shape[0]:    # the engine kept its last rows only
            r = r[-e.shape[0]:]
        c.add(*key, e, r)
        if key in local:
            c.add_local(*key, local[key], e)
    return c.result(engine.meta, ref)


# -- the whole job -------------------------------------------------------------------------------
def not_checkable(sites: list[str], steps: list[int], engine: Trace) -> list[str]:
    """The (step, site) pairs of ``sites`` x ``steps`` (every site of the architecture, in execution
    order) that the engine's trace lacks, one line per site key: ``"blk.{0,1}.kq at every step"``,
    ``"logits at decode step 2"``."""
    missing: dict[str, tuple[set, set]] = {}
    for site in sites:
        for step in steps:
            if (step, site) not in engine:
                layer, spec = parse_site(site)
                layers, at = missing.setdefault(spec.key, (set(), set()))
                at.add(step)
                if layer is not None:
                    layers.add(layer)
    out = []
    for key, (layers, at) in missing.items():
        name = key if not layers else (f"blk.{min(layers)}.{key}" if len(layers) == 1
                                       else f"blk.{{{','.join(map(str, sorted(layers)))}}}.{key}")
        when = "every step" if at == set(steps) else ", ".join(step_label(s) for s in sorted(at))
        out.append(f"{name} at {when}")
    return out


def check(req: CheckRequest, candidate: Trace | None = None, storage: dict | None = None) -> CheckResult:
    """llama.cpp (live, or a recorded run) against an engine's trace (``req.engine``, or an
    in-memory ``candidate`` trace with its per-tensor ``storage`` dtypes), with local errors."""
    from harness.diff import model_policy
    from harness.gguf.load import GGUFError
    from harness.ours.model import load_model
    if candidate is None:
        run = load_engine(req.engine)
        candidate, storage, name = run.trace, run.dtypes, req.engine
    else:
        name = candidate.meta.get("source", "the candidate")
    if not req.gguf:
        raise CheckError("the GGUF the engine ran is needed (our ops are recomputed with its weights)")
    kv = req.engine_kv or candidate.meta.get("kv_type") or "f32"
    if kv not in ("f16", "f32"):
        raise CheckError(f"{name}: KV cache type {kv!r} (supported: f16, f32)")
    try:
        model = load_model(req.gguf, device=req.device, kv_dtype=torch.float16 if kv == "f16" else None)
    except GGUFError as e:
        raise CheckError(str(e)) from None
    check_model_fits(model.config, candidate, name)
    ref = recorded_reference(req.reference, candidate) if req.reference else live_reference(req, candidate)
    local = engine_local(model, candidate)
    op_in = model.config.spec.inputs
    sites = candidate.sites()
    policy = SiteStoragePolicy(model_policy(model, ref.meta.get("backend", "cpu")),
                               storage_widening(storage or {}, sites, op_in))
    cmp = compare_engine(candidate, ref, local, policy)
    missing = not_checkable(all_sites(model.config.n_layer, model.config.spec.sites),
                            list(range(candidate.n_steps + 1)), candidate)
    present = set(sites)
    spans = {s: span_of(s, present, op_in) for s in sites}
    d = model.describe()
    cmp.meta["ours"] = {**{k: d[k] for k in ("gguf", "file_type", "type_mix", "weight_type", "architecture")},
                        **candidate.meta, "device": "", "dtype": ""}
    cmp.meta.update(candidate_path=req.engine, local_basis="candidate", not_checkable=missing, engine_kv=kv,
                    local_spans={s: sp for s, sp in spans.items() if len(sp) > 1})
    if cmp.first is not None:
        cmp.first.inputs = anchor_rows(cmp, anchors_of(cmp.first.site, present, op_in))
        who = "transformers'" if candidate.meta.get("source") == "transformers" else "your"
        cmp.first.explanation = explain(cmp, spans.get(cmp.first.site, [cmp.first.site]), who)
        if kv == "f32" and parse_site(cmp.first.site)[1].key in ("kq", "kqv") and cmp.first.row["local_rel_l2"] < 1e-2:
            cmp.first.explanation += ("; if the engine keeps its KV cache in float16, say so (--engine-kv f16, or "
                                      "engine.kv_type in the trace's manifest): a small error here is what that gives")
    return CheckResult(cmp, candidate, ref, local, missing)


def explain(cmp: Comparison, span: list[str], who: str = "your") -> str:
    """The first divergence in the engine's terms (``who``: "your", "transformers'"): what our op
    gives on its inputs, what it gave, and which of its inputs match llama.cpp."""
    f = cmp.first
    r = f.row
    what = f.site if len(span) == 1 else f"{f.site} (local error over {', '.join(span)}: the trace lacks the ops between)"
    parts = [f"the first op that diverges is {what} at {step_label(f.step)}"]
    ok = [i["site"] for i in f.inputs if i["passed"]]
    bad = [i["site"] for i in f.inputs if not i["passed"]]
    if ok:
        parts.append(f"{who} {' and '.join(ok)} match{'es' if len(ok) == 1 else ''} llama.cpp, {who} {f.site} does not")
    if bad:
        parts.append(f"{who} {' and '.join(bad)} already differ{'s' if len(bad) == 1 else ''} from llama.cpp "
                     "end to end (drift; they pass locally)")
    own, has = ("your own", "your engine has") if who == "your" else (f"{who} own", f"{who.rstrip(chr(39))} has")
    parts.append(f"recomputed on {own} inputs, {f.site} should be {r['local_ours']:.4g} at {r['local_worst']}, "
                 f"{has} {r['local_ref']:.4g} (relative error {r['local_rel_l2']:.3g}, "
                 f"tolerance {r['local_tol_rel']:.3g})")
    if r.get("sys_passed") is False and r.get("local_elem_passed", True):
        parts.append(systematic_words(r, ours="expected", ref="yours"))
    return "; ".join(parts)


def anchor_rows(cmp: Comparison, anchors: list[str]) -> list[dict]:
    """The first divergence's inputs (the trace's sites its recomputation read), end to end and locally."""
    f, t = cmp.first, cmp.table
    out = []
    for name in anchors:
        hit = t[(t["step"] == f.step) & (t["site"] == name)]
        if len(hit):
            r = hit.iloc[0]
            out.append(dict(site=name, passed=bool(r["passed"]), rel_l2=r["rel_l2"],
                            local_rel_l2=r.get("local_rel_l2"), local_passed=r.get("local_passed")))
    return out
