"""What the probes read and return: the trace to probe (:func:`probe_trace`: llama.cpp's, or our
model's with faults injected), what the GGUF says (:class:`ProbeContext`: its config, and its
weights when a check asks) and the record every check returns (:func:`check_record`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from harness.gguf.load import GGUFModel


class CheckError(ValueError):
    """A probe input that cannot be used (unknown probe or source, bad steps or tokens); one-line message."""


def check_record(name, site, step, value, threshold, detail, passed=None) -> dict:
    """One check's finding at (step, site): ``passed`` is ``value <= threshold`` unless given."""
    value = float(value)
    if passed is None:
        passed = bool(value <= threshold)          # NaN fails
    return dict(name=name, site=site, step=int(step), passed=bool(passed), value=value,
                threshold=float(threshold), detail=detail)


@dataclass
class ProbeContext:
    """What the checks may know besides the trace: the GGUF's config, and (lazily) its weights."""
    cfg: object
    gguf_path: str | None = None
    _weights: GGUFModel | None = field(default=None, repr=False)

    @classmethod
    def of(cls, model_or_path) -> "ProbeContext":
        if isinstance(model_or_path, ProbeContext):
            return model_or_path
        if isinstance(model_or_path, GGUFModel):
            return cls(model_or_path.config, model_or_path.path, model_or_path)
        if hasattr(model_or_path, "gguf") and isinstance(model_or_path.gguf, GGUFModel):   # a Model
            return cls.of(model_or_path.gguf)
        from harness.gguf.load import read_config_file
        path = str(model_or_path)
        return cls(read_config_file(path), path)

    @property
    def weights(self) -> GGUFModel:
        if self._weights is None:
            from harness.gguf.load import load_gguf
            self._weights = load_gguf(self.gguf_path)
        return self._weights


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b`` in float64 (inf when not finite)."""
    d = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
    return d if math.isfinite(d) else math.inf


def layer_sites(trace, key: str):
    """(step, layer, site, tensor) of one per-layer site, in execution order."""
    for (step, site), t in trace.items():
        if site.startswith("blk.") and site.endswith("." + key):
            yield step, int(site.split(".")[1]), site, t


def step_positions(trace, step: int, T: int) -> torch.Tensor:
    """The positions of the ``T`` tokens processed at ``step``."""
    return torch.arange(trace.start_pos(step), trace.start_pos(step) + T)


# -- making a trace to probe ------------------------------------------------------------------
DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog"


def probe_trace(gguf: str, source: str = "torch", tokens: list[int] | None = None, prompt: str | None = None,
                steps: int = 3, faults=(), device: str = "cpu", extra_bufts: bool = False):
    """``(trace, model_or_path)`` to probe: llama.cpp's trace (``source="llama"``) or our PyTorch
    model's with ``faults`` injected (``"torch"``: greedy decoding, an F16 KV cache like
    llama.cpp's default). A text prompt is tokenized by llama.cpp; neither: DEFAULT_PROMPT."""
    from harness.llama.runner import LlamaOptions
    from harness.llama.worker import n_ctx_needed, open_runner
    opts = LlamaOptions(device=device, extra_bufts=extra_bufts)
    if source not in ("torch", "llama"):
        raise CheckError(f"unknown source {source!r} (torch or llama)")
    if steps < 0:
        raise CheckError(f"steps must be >= 0, got {steps}")
    if tokens is None and prompt is None:
        prompt = DEFAULT_PROMPT
    if source == "llama":
        if faults:
            raise CheckError("faults can only be injected into the PyTorch model (source torch)")
        with open_runner(gguf, opts, n_ctx_needed(tokens if tokens else prompt, steps) + 1) as r:
            toks = list(tokens) if tokens else r.tokenize(prompt)
            return r.run(toks, steps), gguf      # its meta names the architecture
    from harness.ours.inject import check_faults
    from harness.ours.model import load_model
    model = load_model(gguf, device=device, kv_dtype=torch.float16)
    check_faults(faults, model.config)
    if tokens is None:
        with open_runner(gguf, LlamaOptions(device="cpu", extra_bufts=extra_bufts),
                         n_ctx_needed(prompt, 0)) as r:
            tokens = r.tokenize(prompt)
    tokens = [int(t) for t in tokens]
    if not tokens:
        raise CheckError("empty prompt: give at least one token")
    bad = [t for t in tokens if not 0 <= t < model.config.n_vocab]
    if bad:
        raise CheckError(f"token id {bad[0]} out of range (vocabulary has {model.config.n_vocab} tokens)")
    with model.hooks([h for f in faults for h in f.hooks]):
        trace = model.run_with_cache(tokens, steps)
    return trace, model
