"""Tolerance policy: how far two engines may differ at a site before it counts as a divergence.

Two numbers per (regime, site family, kind): ``rel`` bounds the relative L2 error
``||ours - ref|| / ||ref||`` (catches broad drift) and ``max`` bounds the worst element's error
in units of the reference's RMS (catches a few wild elements, such as garbage in a padded
vocabulary tail). The families of :data:`UNIT_SCALE_FAMILIES` (attention weights: rows of
probabilities that sum to 1) bound the worst element's error in absolute units instead: their
RMS falls as the attended positions grow (about sqrt(ln P) / P), so an RMS-relative bound
calibrated on short prompts failed clean long ones (measured: a clean 4096-token prefill of the
tiny F32 model on the CPU, one float32 rounding step at a weight of 0.94 is 1.3e-4 x the RMS,
over the tolerance calibrated at up to 330 tokens, 1.1e-4). ``kind`` is ``local`` (the op
recomputed on the reference's inputs: this decides the verdict) or ``e2e`` (end to end, drift
included: reported, not decisive).

The attention output's bounds grow with the attended positions beyond the calibrated length
(:func:`at_positions`; the comparator applies it per step when it knows the prompt length).

A regime is ``backend/class/dtype``: llama.cpp's backend (``cpu``/``cuda``), a weight class and
the PyTorch dtype. Weight classes, finest first: ``f32``, ``f16`` (F16, BF16), ``q8`` (Q8_0),
``q6`` (Q6_K), ``q5`` (Q5_0, Q5_1, Q5_K), ``q4`` (Q4_0, Q4_1, Q4_K and every type of fewer bits).

Which class a site uses (:meth:`Policy.class_of`):

* the *local* error of an op that multiplies by a weight matrix (families in
  :data:`PER_WEIGHT_FAMILIES`: the ``matmul`` projections and ``logits``) depends on that matrix's
  type (the activation quantization and the kernel llama.cpp picks for it), so it is keyed by the
  ggml type of the site's *own* weight tensor, given to the policy as ``site_types`` (full site
  name -> type name; the policy does not know where tensors come from). A real Q4_K_M file mixes
  Q5_0, Q8_0, Q4_K and Q6_K matrices: each site gets its own type's tolerance;
* everything else keys on the *file's* class (``general.file_type``, e.g. Q4_K_M -> ``q4``): the
  local error of norms, biases, RoPE, attention, residuals and activations does not depend on a
  weight type, and end-to-end errors are drift accumulated through the whole file's weights. The
  token embedding is a row lookup and exact for every type.

Values come from ``tolerances.json``, written by ``harness.calibrate`` from clean fixtures (seeds
disjoint from the tests'): tolerance = SAFETY x the worst error observed, never below the floor
of the PyTorch dtype (FLOOR_UNITS unit roundoffs, so float16/bfloat16 runs get room for their
own rounding). In a quantized class, ``matmul`` and ``logits`` share the worst of their local
observations (see :func:`build_table`). A (class, family) never measured falls back to the
nearest coarser class measured with the same backend, then the nearest finer one, then the other
backend, and ``describe()`` says so (``logits`` first borrows its own class's ``matmul``); with
nothing at all the floor applies.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass

POLICY_VERSION = 2
SAFETY = 10.0
FLOOR_UNITS = 16.0
MAX_PER_REL = 10.0          # floor of the max-element bound relative to the rel bound
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
TABLE_PATH = os.path.join(os.path.dirname(__file__), "tolerances.json")
FAMILIES = ("embed", "norm", "matmul", "bias", "rope", "scores", "softmax", "attn", "residual", "act", "logits")
CLASSES = ("f32", "f16", "q8", "q6", "q5", "q4")        # finest first
PER_WEIGHT_FAMILIES = ("matmul", "logits")              # local error keyed by the site's own weight type
UNIT_SCALE_FAMILIES = ("softmax",)                      # max bound in absolute units (rows sum to 1)
FAMILY_FALLBACK = {"logits": "matmul"}                  # within one regime, before another class
ACCUMULATING_FAMILIES = ("attn",)                       # the op sums over the attended positions
CALIBRATED_POSITIONS = 336          # the calibration's longest run: 330 prompt tokens + 6 steps


def max_error(family: str, max_abs: float, max_norm: float) -> float:
    """The worst element's error in the units a ``max`` bound of ``family`` uses: absolute for
    :data:`UNIT_SCALE_FAMILIES`, else relative to the reference's RMS (``max_norm``)."""
    return max_abs if family in UNIT_SCALE_FAMILIES else max_norm


def max_floor(family: str, floor: float) -> float:
    """The least ``max`` bound of ``family`` given the dtype's ``floor`` of ``rel``: MAX_PER_REL x
    the floor for RMS-relative bounds; the floor itself for absolute ones (a value of at most 1
    rounds by at most one unit roundoff)."""
    return floor if family in UNIT_SCALE_FAMILIES else floor * MAX_PER_REL


def at_positions(tol: "Tol", family: str, positions: int | None) -> "Tol":
    """``tol`` of ``family`` at a step that attends ``positions`` positions: the families of
    :data:`ACCUMULATING_FAMILIES` (attention output, softmax(scores) @ V: a float32 sum over the
    positions) get sqrt(positions / CALIBRATED_POSITIONS) x their bounds beyond the calibrated
    length, the growth of rounding noise summed over P terms (measured on the CPU, tiny F32
    model: 8x the positions, 4k -> 32k, gave 2.7x the clean local error; unscaled, a clean run
    would cross its bound near 60k positions)."""
    if positions is None or family not in ACCUMULATING_FAMILIES or positions <= CALIBRATED_POSITIONS:
        return tol
    k = math.sqrt(positions / CALIBRATED_POSITIONS)
    return Tol(tol.rel * k, tol.max * k)


@dataclass(frozen=True)
class Tol:
    rel: float
    max: float

    def passes(self, rel_l2: float, max_norm: float) -> bool:
        return rel_l2 <= self.rel and max_norm <= self.max


def weight_class(weight_type: str | None) -> str:
    """A ggml tensor type ("Q5_0") or a llama.cpp file type ("Q4_K_M", "MOSTLY_Q8_0") -> its class."""
    t = (weight_type or "F32").upper().removeprefix("MOSTLY_").removeprefix("ALL_")
    if t in ("F32", "F64"):
        return "f32"
    if t in ("F16", "BF16"):
        return "f16"
    for prefix, cls in (("Q8", "q8"), ("Q6", "q6"), ("Q5", "q5")):
        if t.startswith(prefix):
            return cls
    return "q4"           # Q4_*, IQ4_*, Q3_K, Q2_K, IQ2/IQ3, TQ*, unknown: the coarsest class


def _load_table() -> dict:
    try:
        with open(TABLE_PATH) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"version": POLICY_VERSION, "regimes": {}}


class Policy:
    """Tolerances of one comparison. ``weight_type``: the file's type (``general.file_type`` as
    llama.cpp names it, e.g. "Q4_K_M", or a tensor type); ``site_types``: full site name ->
    ggml type of that site's weight matrix (``{"blk.0.v_proj": "Q8_0", "logits": "Q6_K", ...}``),
    used for the local tolerance of :data:`PER_WEIGHT_FAMILIES` sites; sites it does not name use
    the file's class."""

    def __init__(self, backend: str, weight_type: str, dtype: str = "float32", table: dict | None = None,
                 site_types: dict[str, str] | None = None):
        self.backend, self.wclass, self.dtype = backend, weight_class(weight_type), dtype
        self.weight_type = weight_type
        self.site_types = dict(site_types or {})
        self.table = table if table is not None else _load_table()
        self.regime = f"{backend}/{self.wclass}/float32"
        self.source = self.source_of(self.wclass)

    # -- which regime ------------------------------------------------------------------------
    def class_of(self, site: str | None, family: str, kind: str = "local") -> str:
        """The weight class whose tolerance applies at ``site`` (see the module docstring)."""
        if kind == "local" and family in PER_WEIGHT_FAMILIES and site in self.site_types:
            return weight_class(self.site_types[site])
        return self.wclass

    def label(self, wclass: str) -> str:
        """The regime name of a class in this comparison (``cpu/q5/float32``)."""
        return f"{self.backend}/{wclass}/{self.dtype}"

    def _candidates(self, wclass: str) -> list[str]:
        """Table regimes to look in, best first: this class, the nearest coarser (looser) ones,
        the nearest finer ones; this backend first, then the other."""
        rank = CLASSES.index(wclass)
        order = [wclass] + list(CLASSES[rank + 1:]) + list(CLASSES[:rank][::-1])
        other = "cuda" if self.backend == "cpu" else "cpu"
        return [f"{b}/{wc}/float32" for b in (self.backend, other) for wc in order]

    def source_of(self, wclass: str, family: str | None = None, kind: str = "local") -> str | None:
        """The table regime a class's tolerances come from (for one family and kind: the first
        candidate that measured it, see :meth:`measured_by`; without a family: the first candidate
        measured at all)."""
        if family is not None:
            hit = self.measured_by(wclass, family, kind)
            return hit[0] if hit else None
        regs = self.table.get("regimes", {})
        return next((r for r in self._candidates(wclass) if r in regs), None)

    def measured_by(self, wclass: str, family: str, kind: str = "local") -> tuple[str, str] | None:
        """(table regime, family) whose measurement ``family`` of ``wclass`` uses: the first
        candidate regime that measured the family; within one regime, ``logits`` falls back to
        ``matmul`` (the same kernels on the same weight type) before another class is tried."""
        regs = self.table.get("regimes", {})
        for r in self._candidates(wclass):
            fams = regs.get(r, {}).get(kind, {})
            for fam in (family, FAMILY_FALLBACK.get(family)):
                if fam and fams.get(fam):
                    return r, fam
        return None

    # -- the numbers -------------------------------------------------------------------------
    def tolerance(self, family: str, kind: str = "local", wclass: str | None = None) -> Tol:
        """The tolerance of ``family`` in ``wclass`` (default: the file's class)."""
        floor = FLOOR_UNITS * UNIT_ROUNDOFF.get(self.dtype, UNIT_ROUNDOFF["float32"])
        rel, mx = floor, max_floor(family, floor)
        src = self.measured_by(wclass or self.wclass, family, kind)
        if src is not None:
            measured = self.table["regimes"][src[0]][kind][src[1]]
            rel, mx = max(rel, measured[0]), max(mx, measured[1])
        return Tol(rel, mx)

    def lookup(self, site: str | None, family: str, kind: str = "local") -> tuple[Tol, str]:
        """(tolerance, regime name) at ``site``. Goes through :meth:`tolerance` (a subclass that
        widens tolerances overrides that one; it gets ``wclass`` only for a per-weight class other
        than the file's)."""
        wc = self.class_of(site, family, kind)
        tol = self.tolerance(family, kind) if wc == self.wclass else self.tolerance(family, kind, wclass=wc)
        return tol, self.label(wc)

    # -- what the report says ----------------------------------------------------------------
    def site_classes(self) -> dict[str, dict[str, int]]:
        """Class -> {ggml type: number of sites} over ``site_types``, most sites first."""
        out: dict[str, Counter] = {}
        for t in self.site_types.values():
            out.setdefault(weight_class(t), Counter())[t] += 1
        return {wc: dict(c.most_common()) for wc, c in sorted(out.items(), key=lambda kv: -sum(kv[1].values()))}

    def describe(self) -> dict:
        """The regimes this policy uses: ``regime`` / ``calibrated_from`` for the file's class;
        ``weight_regimes``: per class of the sites' own weights, its types and site counts and
        where its local tolerances come from; ``fallbacks``: one sentence per regime or family
        not calibrated as itself; ``exact``: every one in use was, and the dtype is float32."""
        fallbacks = []
        src = self.source_of(self.wclass, "norm", "local") or self.source_of(self.wclass)
        if src != f"{self.backend}/{self.wclass}/float32":
            fallbacks.append(self._fallback_note(self.wclass, "the file's class", src))
        weight_regimes = {}
        for wc, types in self.site_classes().items():
            fams = sorted({"logits" if site == "logits" else "matmul" for site, t in self.site_types.items()
                           if weight_class(t) == wc}, reverse=True)
            used = {}
            for fam in fams:
                hit = self.measured_by(wc, fam, "local")
                used[fam] = None if not hit else hit[0] if hit[1] == fam else f"{hit[0]} ({hit[1]})"
                if hit != (f"{self.backend}/{wc}/float32", fam):
                    fallbacks.append(self._fallback_note(wc, f"local {fam}", hit[0] if hit else None,
                                                         hit[1] if hit else None, fam))
            weight_regimes[self.label(wc)] = dict(types=types, sites=sum(types.values()),
                                                  calibrated_from=used.get("matmul") or used.get("logits"),
                                                  families=used)
        return dict(version=self.table.get("version", POLICY_VERSION), regime=self.label(self.wclass),
                    calibrated_from=src, file_type=self.weight_type, file_class=self.wclass,
                    per_weight_families=list(PER_WEIGHT_FAMILIES), weight_regimes=weight_regimes,
                    fallbacks=fallbacks, exact=not fallbacks and self.dtype == "float32")

    def _fallback_note(self, wclass: str, what: str, src: str | None, src_family: str | None = None,
                       family: str | None = None) -> str:
        own = f"{self.backend}/{wclass}/float32"
        if src is None:
            return f"{own} ({what}) was never calibrated, nor any class it may fall back to: dtype floor only"
        if src == own:
            return f"{own} ({what}): {family} never calibrated, using its {src_family} tolerance"
        b, wc, _ = src.split("/")
        how = ("the nearest coarser class" if CLASSES.index(wc) > CLASSES.index(wclass) else
               "the nearest finer class (no coarser one was calibrated)")
        if b != self.backend:
            how += " of the other backend"
        of = f" ({src_family})" if family and src_family != family else ""
        return f"{own} ({what}) was never calibrated: using {src}{of}, {how}"


QUANTIZED = ("q8", "q6", "q5", "q4")


def build_table(observed: dict, provenance: dict) -> dict:
    """``observed[regime][kind][family] = (worst rel_l2, worst max_norm)`` -> a tolerance table.

    In a quantized class measured under this policy version, the local tolerances of the weight
    matmul families (``matmul`` and ``logits``: the same kernels on the same weight type) are
    pooled: each gets the worst observation of either. Their local error is dominated by rare
    single-element rounding flips in the activation quantization (a few per thousand (step, site)
    samples), which the ~170 logits samples of a calibration run may miss while the thousands of
    matmul samples do not. Regimes of an older version are kept as they were calibrated."""
    regimes = {}
    current = {r for r, p in ((provenance or {}).get("regimes") or {}).items() if p.get("version") == POLICY_VERSION}
    for regime, kinds in observed.items():
        dtype = regime.rsplit("/", 1)[-1]
        floor = FLOOR_UNITS * UNIT_ROUNDOFF[dtype]
        regimes[regime] = {kind: {fam: [max(SAFETY * r, floor), max(SAFETY * m, max_floor(fam, floor))]
                                  for fam, (r, m) in fams.items()} for kind, fams in kinds.items()}
        local = regimes[regime].get("local", {})
        pooled = [local[f] for f in PER_WEIGHT_FAMILIES if f in local]
        if regime in current and regime.split("/")[1] in QUANTIZED and len(pooled) > 1:
            worst = [max(t[0] for t in pooled), max(t[1] for t in pooled)]
            for f in PER_WEIGHT_FAMILIES:
                if f in local:
                    local[f] = list(worst)
    return {"version": POLICY_VERSION, "safety": SAFETY, "floor_units": FLOOR_UNITS,
            "pooled_local_families": {"families": list(PER_WEIGHT_FAMILIES), "classes": list(QUANTIZED)},
            "observed": observed, "regimes": regimes, "provenance": provenance}
