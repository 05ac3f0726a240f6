"""Named faults: each corrupts the PyTorch model at one site through the hook API.

A fault is a :class:`Fault` record: a name, the hooks ``[(site pattern, fn)]`` it installs, and
where a correct differential debugger must localize it (``expected(cfg) -> (step, layer, site)``
with ``layer`` None for global sites). The docstring of each hook function says which
real-world engine mistake it models.

Your own fault, without editing this package: write a module with a function
``fn(x, ctx) -> Tensor | None`` (see harness.hooks.HookContext) and pass
``--inject my_module:my_function@blk.*.q`` on the command line (the part after ``@`` is the site
pattern), or ``Fault("mine", [("blk.*.q", fn)])`` to the API.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from harness.hooks import Hook


@dataclass(frozen=True)
class Fault:
    name: str
    hooks: list[tuple[str, Hook]]
    expected: Callable | None = None       # cfg -> (step, layer | None, site)
    doc: str = ""
    min_steps: int = 0                     # decode steps needed before it can show

    def where(self, cfg) -> tuple[int, int | None, str] | None:
        return self.expected(cfg) if self.expected else None


class FaultError(ValueError):
    """Unknown fault name or unloadable user fault; one-line message."""


REGISTRY: dict[str, Fault] = {}


def fault(name: str, pattern: str, expected: Callable, min_steps: int = 0):
    """Register ``fn`` as fault ``name`` installed at ``pattern``."""
    def deco(fn: Hook) -> Hook:
        REGISTRY[name] = Fault(name, [(pattern, fn)], expected, (fn.__doc__ or "").strip(), min_steps)
        return fn
    return deco


def _kv_heads(k: torch.Tensor, n_head: int) -> torch.Tensor:          # (P, Hkv, Dh) -> (P, H, Dh)
    return k.repeat_interleave(n_head // k.shape[1], dim=1)


@fault("drop_qkv_bias", "blk.*.q,blk.*.k,blk.*.v", lambda cfg: (0, 0, "blk.0.q"))
def drop_qkv_bias(x, ctx):
    """QKV biases switched off ("Qwen2.5 has no QKV biases"): q, k, v are the bare projections,
    so the -14..-34 bias outliers vanish. First wrong op: the bias add of q in layer 0."""
    return ctx.inputs["x"]


@fault("lm_head_transpose", "logits", lambda cfg: (0, None, "logits"))
def lm_head_transpose(x, ctx):
    """LM-head GEMM with the wrong transpose / leading dimension: the (V, D) row-major output
    matrix is read as if it were (D, V), so every logit is a dot product with scattered
    weights: garbage logits, some of them spikes that argmax picks."""
    w = ctx.inputs["weight"]                                              # (V, D)
    return ctx.inputs["x"] @ w.reshape(-1).view(w.shape[1], w.shape[0])   # (T, V)


@fault("kv_pos_stuck", "blk.*.attn_weights", lambda cfg: (1, 0, "blk.0.attn_weights"), min_steps=1)
def kv_pos_stuck(x, ctx):
    """KV cache write position stuck at 0: each decode step overwrites cell 0 and attends over
    that one cell, so attention sees only the current token. Shows at the first decode step."""
    if ctx.step == 0:
        return None
    out = torch.zeros_like(x)
    out[..., -1] = 1.0
    return out


@fault("q_register", "blk.*.kq", lambda cfg: (0, 0, "blk.0.kq"))
def q_register(x, ctx):
    """Q vector loaded into per-thread registers in the attention kernel: only q[0] is valid,
    every thread uses its own register's copy of element 0, so the scores are q[0] * sum(k)."""
    q, k = ctx.inputs["q"], ctx.inputs["k"]                               # (T, H, Dh), (P, Hkv, Dh)
    bad = q[..., :1].expand_as(q)
    return torch.einsum("thd,phd->htp", bad, _kv_heads(k, q.shape[1]))


def load_user_fault(spec: str) -> Fault:
    """``module:function@pattern`` -> a Fault (expected location unknown)."""
    target, _, pattern = spec.partition("@")
    mod_name, _, fn_name = target.partition(":")
    if not (mod_name and fn_name and pattern):
        raise FaultError(f"bad fault {spec!r}: use a registered name or module:function@site-pattern")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise FaultError(f"cannot load fault {target!r}: {e}") from None
    if not callable(fn):
        raise FaultError(f"fault {target!r} is not callable")
    return Fault(target, [(pattern, fn)], None, (fn.__doc__ or "").strip())


def get_fault(spec: str) -> Fault:
    if spec in REGISTRY:
        return REGISTRY[spec]
    if ":" in spec:
        return load_user_fault(spec)
    raise FaultError(f"unknown fault {spec!r}; known: {', '.join(sorted(REGISTRY))} "
                     "(or module:function@site-pattern)")
