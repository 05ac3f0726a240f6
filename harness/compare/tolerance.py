"""Tolerance policy: how far two engines may differ at a site before it counts as a divergence.

Two numbers per (regime, site family, kind): ``rel`` bounds the relative L2 error
``||ours - ref|| / ||ref||`` (catches broad drift) and ``max`` bounds the worst element's error
in units of the reference's RMS (catches a few wild elements, such as garbage in a padded
vocabulary tail). ``kind`` is ``local`` (the op recomputed on the reference's inputs: this
decides the verdict) or ``e2e`` (end to end, drift included: reported, not decisive).

A regime is ``backend/weights/dtype``: llama.cpp's backend (``cpu``/``cuda``), the class of the
GGUF's matrix type (``f32``, ``f16``, ``q8`` = Q8_0, ``q4`` = any type of 6 bits or fewer), and
the PyTorch dtype. Values come from ``tolerances.json``, written by ``harness.calibrate`` from
clean fixtures (seeds disjoint from the tests'): tolerance = SAFETY x the worst error observed,
never below the floor of the PyTorch dtype (FLOOR_UNITS unit roundoffs, so float16/bfloat16
runs get room for their own rounding). A regime never measured falls back to the nearest one
measured with the same backend, else the other backend, and says so in ``describe()``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

POLICY_VERSION = 1
SAFETY = 10.0
FLOOR_UNITS = 16.0
MAX_PER_REL = 10.0          # floor of the max-element bound relative to the rel bound
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
TABLE_PATH = os.path.join(os.path.dirname(__file__), "tolerances.json")
FAMILIES = ("embed", "norm", "matmul", "bias", "rope", "scores", "softmax", "attn", "residual", "act", "logits")


@dataclass(frozen=True)
class Tol:
    rel: float
    max: float

    def passes(self, rel_l2: float, max_norm: float) -> bool:
        return rel_l2 <= self.rel and max_norm <= self.max


def weight_class(weight_type: str) -> str:
    t = (weight_type or "F32").upper()
    if t == "F32":
        return "f32"
    if t in ("F16", "BF16"):
        return "f16"
    if t.startswith("Q8"):
        return "q8"
    return "q4"


def _load_table() -> dict:
    try:
        with open(TABLE_PATH) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"version": POLICY_VERSION, "regimes": {}}


class Policy:
    def __init__(self, backend: str, weight_type: str, dtype: str = "float32", table: dict | None = None):
        self.backend, self.wclass, self.dtype = backend, weight_class(weight_type), dtype
        self.table = table if table is not None else _load_table()
        self.regime = f"{backend}/{self.wclass}/float32"
        self.source = self._pick()

    def _pick(self) -> str | None:
        regs = self.table.get("regimes", {})
        if self.regime in regs:
            return self.regime
        order = ["f32", "f16", "q8", "q4"]
        rank = order.index(self.wclass)
        for backend in (self.backend, "cuda" if self.backend == "cpu" else "cpu"):
            # prefer the nearest coarser weight class (looser), then finer ones
            for wc in order[rank:] + order[:rank][::-1]:
                if f"{backend}/{wc}/float32" in regs:
                    return f"{backend}/{wc}/float32"
        return None

    def tolerance(self, family: str, kind: str = "local") -> Tol:
        floor = FLOOR_UNITS * UNIT_ROUNDOFF.get(self.dtype, UNIT_ROUNDOFF["float32"])
        rel, mx = floor, floor * MAX_PER_REL
        if self.source is not None:
            measured = self.table["regimes"][self.source][kind].get(family)
            if measured:
                rel, mx = max(rel, measured[0]), max(mx, measured[1])
        return Tol(rel, mx)

    def describe(self) -> dict:
        return dict(version=self.table.get("version", POLICY_VERSION), regime=f"{self.backend}/{self.wclass}/{self.dtype}",
                    calibrated_from=self.source, exact=self.source == self.regime and self.dtype == "float32")


def build_table(observed: dict, provenance: dict) -> dict:
    """``observed[regime][kind][family] = (worst rel_l2, worst max_norm)`` -> a tolerance table."""
    regimes = {}
    for regime, kinds in observed.items():
        dtype = regime.rsplit("/", 1)[-1]
        floor = FLOOR_UNITS * UNIT_ROUNDOFF[dtype]
        regimes[regime] = {kind: {fam: [max(SAFETY * r, floor), max(SAFETY * m, floor * MAX_PER_REL)]
                                  for fam, (r, m) in fams.items()} for kind, fams in kinds.items()}
    return {"version": POLICY_VERSION, "safety": SAFETY, "floor_units": FLOOR_UNITS,
            "observed": observed, "regimes": regimes, "provenance": provenance}
