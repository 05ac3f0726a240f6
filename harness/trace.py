"""A trace: the tensors one engine produced at the canonical sites, per step, as plain data.

Step 0 is the prefill of the prompt; step k >= 1 is the k-th decode step (one token). Tensors
are float32 on the CPU in the layouts documented in :mod:`harness.sites`, unless a producer
documents otherwise (the GPU path keeps them on the device).

Anything that produces tensors calls a *sink*, ``sink(step, site, tensor)``; a :class:`Trace`
is the sink that keeps everything. Streaming consumers pass their own sink and drop tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from harness.sites import order_key

Sink = Callable[[int, str, torch.Tensor], None]


@dataclass
class Trace:
    n_layer: int
    tokens: list[int] = field(default_factory=list)   # every token fed: prompt, then decode inputs
    n_prompt: int = 0
    meta: dict = field(default_factory=dict)          # source, backend, dtype, unavailable sites...
    tensors: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def __call__(self, step: int, site: str, tensor: torch.Tensor) -> None:   # a Sink
        self.tensors[(step, site)] = tensor

    def __getitem__(self, key: tuple[int, str]) -> torch.Tensor:
        return self.tensors[key]

    def __contains__(self, key: tuple[int, str]) -> bool:
        return key in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def n_steps(self) -> int:
        """Number of decode steps after the prefill."""
        return max(len(self.tokens) - self.n_prompt, 0)

    def steps(self) -> list[int]:
        return sorted({s for s, _ in self.tensors})

    def sites(self) -> list[str]:
        return sorted({n for _, n in self.tensors}, key=lambda n: order_key(n, self.n_layer))

    def keys(self) -> list[tuple[int, str]]:
        """Every (step, site) in execution order."""
        return sorted(self.tensors, key=lambda k: (k[0], *order_key(k[1], self.n_layer)))

    def items(self) -> Iterator[tuple[tuple[int, str], torch.Tensor]]:
        for k in self.keys():
            yield k, self.tensors[k]

    def step_tokens(self, step: int) -> list[int]:
        """The token ids fed at ``step``."""
        return self.tokens[:self.n_prompt] if step == 0 else [self.tokens[self.n_prompt + step - 1]]

    def start_pos(self, step: int) -> int:
        return 0 if step == 0 else self.n_prompt + step - 1
