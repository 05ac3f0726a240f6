"""Hook points: identity modules at every site that let callers read or replace activations.

A hook is ``fn(x, ctx) -> Tensor | None``: return a tensor to replace the activation, None to
leave it. ``ctx`` (a :class:`HookContext`) names the site, layer, step and position and carries
the op's *inputs* (``ctx.inputs["x"]``, ``ctx.inputs["weight"]``, ...) so a hook can recompute
the op differently: that is how faults are written. Hooks are only ever installed through the
``Model.hooks(...)`` context manager, so none outlives the block that added it.

Per site the pipeline is: user hooks in the order given -> recorder (``run_with_cache``) ->
anchor (replace our value with a reference's, for local-error runs).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from harness.sites import split_patterns


@dataclass
class HookContext:
    site: str                      # "blk.3.q_rope"
    layer: int | None
    step: int                      # 0 = prefill, k = k-th decode step
    pos: int                       # position of the first token of this step
    inputs: dict[str, object] = field(default_factory=dict)
    model: object | None = None


Hook = Callable[[torch.Tensor, HookContext], "torch.Tensor | None"]


def site_matcher(pattern: str | Callable[[str], bool]) -> Callable[[str], bool]:
    """Globs over site names (``blk.*.q``), comma-separated alternatives, or a predicate."""
    if callable(pattern):
        return pattern
    pats = split_patterns(pattern)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in pats)


class HookManager:
    """Per-model dispatch state. Plain object (not a Module), shared by all hook points. Set only
    through :meth:`install` (which ``Model.hooks`` calls), so ``active`` and the per-site match
    cache always agree with what is installed."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.hooks: list[tuple[Callable[[str], bool], Hook]] = []
        self.recorder: Callable[[int, str, torch.Tensor], None] | None = None
        self.anchor: Callable[[int, str], "torch.Tensor | None"] | None = None
        self.step = 0
        self.pos = 0
        self.active = False                          # anything installed: hook points call fire()
        self._matched: dict[str, list[Hook]] = {}    # site -> the installed hooks that match it

    def install(self, hooks: list, recorder, anchor) -> None:
        self.hooks, self.recorder, self.anchor = hooks, recorder, anchor
        self.active = bool(hooks) or recorder is not None or anchor is not None
        self._matched = {}

    def _hooks_for(self, name: str) -> list[Hook]:
        fns = self._matched.get(name)
        if fns is None:
            fns = self._matched[name] = [fn for match, fn in self.hooks if match(name)]
        return fns

    def fire(self, name: str, layer: int | None, x: torch.Tensor, inputs: dict) -> torch.Tensor:
        fns = self._hooks_for(name) if self.hooks else ()
        if fns:
            ctx = HookContext(name, layer, self.step, self.pos, inputs, self.model)
            for fn in fns:
                out = fn(x, ctx)
                if out is not None:
                    if out.shape != x.shape:
                        raise ValueError(f"hook on {name} returned shape {tuple(out.shape)}, "
                                         f"expected {tuple(x.shape)}")
                    x = out.to(x.dtype)
        if self.recorder is not None:
            self.recorder(self.step, name, x)
        if self.anchor is not None:
            ref = self.anchor(self.step, name)
            if ref is not None:
                x = _anchored(x, ref)
        return x


def _anchored(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The reference's value in place of ours (same device and dtype as ours)."""
    if ref.device != x.device or ref.dtype != x.dtype:
        ref = ref.to(device=x.device, dtype=x.dtype)
    if ref.dim() == x.dim() and ref.shape[0] < x.shape[0]:   # reference kept only its last rows
        return torch.cat([x[:x.shape[0] - ref.shape[0]], ref])
    return ref if ref.shape == x.shape else ref.reshape(x.shape)


class HookPoint(nn.Module):
    """Identity at one site; ``hp(x, **inputs)`` runs the manager's hooks for that site.

    A module (so it shows in the model tree), but called without ``nn.Module.__call__``: a
    hook point never has module hooks, and with nothing installed it returns ``x`` at once."""

    def __init__(self, name: str, layer: int | None, manager: HookManager):
        super().__init__()
        self.name = name
        self.layer = layer
        object.__setattr__(self, "_manager", manager)   # not a submodule: avoids a reference cycle

    def __call__(self, value: torch.Tensor, **inputs) -> torch.Tensor:
        m = self._manager
        return m.fire(self.name, self.layer, value, inputs) if m.active else value

    forward = __call__
