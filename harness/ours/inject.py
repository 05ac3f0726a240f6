"""Fault injection: what a fault is, and finding one by name or loading yours.

A fault is a :class:`Fault` record: a name, the hooks ``[(site pattern, fn)]`` it installs, and
where a correct differential debugger must localize it: ``fault.where(cfg_or_run)`` gives the
first divergent ``(step, layer, site)`` (``layer`` None for global sites), or None when the
fault cannot show in that run (a decode-only bug with ``--steps 0``, a causal-mask bug with a
one-token prompt). :data:`REGISTRY` holds the registered faults by name, each modelling a real
engine bug (their hook functions are in :mod:`harness.ours.faults`); :func:`get_fault` takes a
registered name, a ``Fault`` or a user fault ``module:function@sites``. A fault may exist only in
some architectures (``Fault.architectures``: the QKV-bias fault in qwen2, the Q/K-norm faults in
qwen3); :func:`check_faults` refuses one injected into a model that cannot have the bug.

Your own fault, without editing this package
--------------------------------------------
Write a module anywhere on ``sys.path`` (``PYTHONPATH=.`` for the current folder) with a hook
function ``fn(x, ctx) -> Tensor | None``. ``x`` is the activation at the site, ``ctx`` a
:class:`harness.ours.hooks.HookContext`: ``ctx.site`` ("blk.3.q"), ``ctx.layer``, ``ctx.step`` (0 =
prefill), ``ctx.pos`` (position of the step's first token), ``ctx.inputs`` (the op's inputs, e.g.
``ctx.inputs["x"]`` and ``ctx.inputs["weight"]`` for a matmul site; see harness/ours/model.py) and
``ctx.model``. Return a tensor of x's shape to replace the activation, or None to leave it::

    # mybugs.py
    def no_q_bias_in_layer_2(x, ctx):
        "Layer 2 forgets the q bias."
        if ctx.layer == 2:
            return ctx.inputs["x"]                # q_proj, before the bias add
    no_q_bias_in_layer_2.expected = (0, 2, "blk.2.q")   # optional: lets `zoo` score it

then ``llamadiff report MODEL.gguf --tokens 1,2,3 --inject mybugs:no_q_bias_in_layer_2@blk.*.q``
(the part after ``@`` is the site pattern: shell globs over site names, comma-separated) or
``llamadiff zoo MODEL.gguf --faults drop_qkv_bias,mybugs:no_q_bias_in_layer_2@blk.*.q``. A
module attribute that already is a :class:`Fault` is used as is (``--inject mybugs:MY_FAULT``).
``fn.expected`` may be a ``(step, layer, site)`` tuple, None (the fault must not be found), or a
callable taking a :class:`RunInfo` (see :class:`Fault`); ``fn.min_steps`` / ``fn.min_prompt``
say what the run needs; ``fn.architectures`` (e.g. ``"qwen3"`` or ``("qwen2",)``) the only
architectures the bug exists in: the zoo skips it elsewhere, report/probe/gate refuse it. Through the API: ``Fault("mine", [("blk.*.q", fn)], expected=...)``
in ``DiffRequest(faults=[...])`` or ``probes.zoo.run_zoo(..., faults=[...])``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from harness.ours import faults
from harness.ours.hooks import Hook

CLEAN = "clean"      # an ``expected`` value: the fault must not be found at all


@dataclass(frozen=True)
class RunInfo:
    """What a fault's expected location may depend on: the model config, the run's shape (prompt
    length, decode steps; None = assume long enough), the reference trace (for faults that only
    show on large values) and the GGUF path. Unknown attributes read through to ``cfg``, so an
    ``expected`` written as ``lambda cfg: ... cfg.n_layer ...`` also accepts a RunInfo."""
    cfg: Any
    n_prompt: int | None = None
    n_steps: int | None = None
    ref: Any = None
    gguf: str | None = None

    def __getattr__(self, name):
        if name.startswith("__") or name == "cfg":
            raise AttributeError(name)
        return getattr(self.cfg, name)

    @property
    def multi_token_prefill(self) -> bool:
        return self.n_prompt is None or self.n_prompt >= 2

    @property
    def has_decode(self) -> bool:
        return self.n_steps is None or self.n_steps >= 1

    @classmethod
    def of(cls, cfg_or_run, ref=None, gguf: str | None = None) -> "RunInfo":
        if isinstance(cfg_or_run, RunInfo):
            return cfg_or_run
        return cls(cfg_or_run, n_prompt=ref.n_prompt if ref is not None else None,
                   n_steps=ref.n_steps if ref is not None else None, ref=ref, gguf=gguf)


@dataclass(frozen=True)
class Fault:
    name: str
    hooks: list[tuple[str, Hook]]
    # where it must be found: a callable of a RunInfo (or of the config) returning
    # (step, layer | None, site), or None when it cannot show in that run; a fixed tuple;
    # CLEAN (never shows); None: unknown (user faults without an expectation)
    expected: Callable | tuple | str | None = None
    doc: str = ""
    min_steps: int = 0                     # decode steps needed before it can show
    min_prompt: int = 1                    # prompt tokens needed before it can show at prefill
    where_doc: str = ""                    # the expected location in words
    architectures: tuple[str, ...] | None = None   # the only architectures it exists in; None: all
    arch_note: str = ""                    # why it exists only there (e.g. "needs the QKV bias adds")

    def applies_to(self, architecture: str) -> bool:
        """Whether the bug can exist in a model of this architecture (``general.architecture``):
        a QKV-bias bug cannot in qwen3, which has no biases; a Q/K-norm bug cannot in qwen2."""
        return self.architectures is None or architecture in self.architectures

    def skip_reason(self, architecture: str) -> str | None:
        """None when the fault applies to ``architecture``, else one line saying why not."""
        if self.applies_to(architecture):
            return None
        only = ", ".join(self.architectures or ())
        return f"{self.name} is a {only} fault, not for {architecture}" + (f" ({self.arch_note})" if self.arch_note else "")

    @property
    def known(self) -> bool:
        """Whether the fault says where it must be found."""
        return self.expected is not None

    def where(self, cfg_or_run, ref=None, gguf: str | None = None):
        """Expected first divergence ``(step, layer, site)``, or None when the fault cannot show
        in this run (``ref``: the reference trace, which fixes the prompt length and steps).
        Raises ValueError for a fault without an expectation (see ``known``), or for one whose
        location depends on the data (fp16_softmax_overflow) when ``ref`` is missing."""
        if self.expected is None:
            raise ValueError(f"fault {self.name!r} has no expected location")
        if self.expected == CLEAN:
            return None
        if isinstance(self.expected, tuple):
            return self.expected
        return self.expected(RunInfo.of(cfg_or_run, ref, gguf))

    @property
    def patterns(self) -> str:
        return ",".join(p for p, _ in self.hooks)


class FaultError(ValueError):
    """Unknown fault name or unloadable user fault; one-line message."""


REGISTRY: dict[str, Fault] = {kw["name"]: Fault(**kw) for kw in faults.BUILTIN}


# -- lookup -----------------------------------------------------------------------------------
def _as_expected(value):
    if value is None:
        return CLEAN
    if callable(value):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 3:
        step, layer, site = value
        return (int(step), None if layer is None else int(layer), str(site))
    raise FaultError(f"bad 'expected' {value!r}: use (step, layer, site), None or a callable")


def load_user_fault(spec: str) -> Fault:
    """``module:function@pattern`` -> a Fault; ``module:attribute`` naming a Fault -> that Fault.

    The function's optional attributes ``expected`` ((step, layer, site), None, or a callable of
    a RunInfo), ``min_steps`` and ``min_prompt`` become the Fault's; without ``expected`` the
    fault has no expected location (zoo reports where it was found without scoring it)."""
    target, _, pattern = spec.partition("@")
    mod_name, _, fn_name = target.partition(":")
    if not (mod_name and fn_name):
        raise FaultError(f"bad fault {spec!r}: use a registered name or module:function@site-pattern")
    try:
        obj = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise FaultError(f"cannot load fault {target!r}: {e}") from None
    if isinstance(obj, Fault):
        return obj
    if not pattern:
        raise FaultError(f"bad fault {spec!r}: a hook function needs a site pattern (module:function@blk.*.q)")
    if not callable(obj):
        raise FaultError(f"fault {target!r} is not callable")
    expected = _as_expected(obj.expected) if hasattr(obj, "expected") else None
    archs = getattr(obj, "architectures", None)
    if isinstance(archs, str):
        archs = (archs,)
    return Fault(target, [(pattern, obj)], expected, (obj.__doc__ or "").strip(),
                 int(getattr(obj, "min_steps", 0)), int(getattr(obj, "min_prompt", 1)),
                 architectures=tuple(archs) if archs is not None else None,
                 arch_note=str(getattr(obj, "arch_note", "")))


def get_fault(spec) -> Fault:
    """A registered fault by name (:data:`REGISTRY`), a ``Fault`` as is, or a
    user fault ``module:function@sites`` (:func:`load_user_fault`)."""
    if isinstance(spec, Fault):
        return spec
    if spec in REGISTRY:
        return REGISTRY[spec]
    if ":" in spec:
        return load_user_fault(spec)
    raise FaultError(f"unknown fault {spec!r}; known: {', '.join(sorted(REGISTRY))} "
                     "(or module:function@site-pattern)")


def is_registered(fault: Fault) -> bool:
    return REGISTRY.get(fault.name) is fault


def check_faults(faults, cfg) -> None:
    """Raise FaultError unless every fault can be injected into a model of ``cfg`` (a
    ModelConfig): it exists in the config's architecture (:meth:`Fault.applies_to`; injecting
    drop_qkv_bias into qwen3 would silently change nothing), and a user fault's site pattern
    names sites the architecture has (a typo; registered faults may list sites of several
    architectures, e.g. the norm faults' q_norm). Raises harness.sites.SiteError for the typo."""
    from harness.sites import validate_pattern
    for f in faults:
        why = f.skip_reason(cfg.architecture)
        if why is not None:
            raise FaultError(f"{why}: it cannot be injected into this model")
        if not is_registered(f):
            validate_pattern(f.patterns, cfg.n_layer, cfg.spec.sites)


def split_specs(text: str) -> list[str]:
    """``"a,b,mod:fn@blk.*.q,blk.*.k"`` -> ``["a", "b", "mod:fn@blk.*.q,blk.*.k"]``: commas
    separate faults, except inside a user fault's site pattern (a piece that is neither a
    registered name nor ``module:function`` continues the previous pattern)."""
    out: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if out and "@" in out[-1] and piece not in REGISTRY and ":" not in piece:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out
