"""Architectures as data: one :class:`ArchSpec` per GGUF ``general.architecture``.

Modelled on gguf-py's ``MODEL_TENSORS[MODEL_ARCH.X]`` tables: what a file of the architecture
holds (metadata prefix, tensors per layer and which are optional) and where its forward pass
differs (RoPE pairing, per-head Q/K norms, QKV biases, the sites it has). The GGUF reader, our
model, the llama.cpp capture, the synthetic writer, recording and the probes read the spec
instead of assuming one architecture; adding one means a spec here, the model code that
differs, and a synth preset.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from harness.sites import SITES

# torch (row, col) shapes in symbols: D d_model, F d_ff, QD n_head * head_dim, KD n_head_kv * head_dim,
# Dh head_dim, V vocabulary
QWEN2_LAYER_TENSORS = {
    "attn_norm.weight": ("D",), "attn_q.weight": ("QD", "D"), "attn_q.bias": ("QD",),
    "attn_k.weight": ("KD", "D"), "attn_k.bias": ("KD",), "attn_v.weight": ("KD", "D"),
    "attn_v.bias": ("KD",), "attn_output.weight": ("D", "QD"), "ffn_norm.weight": ("D",),
    "ffn_gate.weight": ("F", "D"), "ffn_up.weight": ("F", "D"), "ffn_down.weight": ("D", "F"),
}
GLOBAL_TENSORS = {"token_embd.weight": ("V", "D"), "output_norm.weight": ("D",), "output.weight": ("V", "D")}


@dataclass(frozen=True)
class ArchSpec:
    name: str                                  # general.architecture
    layer_tensors: dict[str, tuple[str, ...]]  # blk.{i}.<suffix> -> symbolic torch shape
    sites: tuple[str, ...]                     # site keys of harness.sites this forward pass has, in order
    rope: str = "neox"                         # "neox": pairs (i, i + n/2); "norm": adjacent pairs
    qk_norm: bool = False                      # per-head RMSNorm of q and k before RoPE
    qkv_bias: bool = True                      # attn_q/k/v biases added after the projections
    optional: frozenset[str] = frozenset({"output.weight"})   # tensors a file may omit (tied embeddings)
    global_tensors: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(GLOBAL_TENSORS))
    inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)   # site key -> its inputs, where
                                                                       # they differ from the site table

    @property
    def prefix(self) -> str:
        """The metadata key prefix (``qwen2.block_count``)."""
        return self.name

    def graph_names(self) -> dict[str, tuple[str | None, str | None]]:
        """Site key -> (llama.cpp graph node name, op) for this architecture's sites."""
        by_key = {s.key: (s.llama_name, s.llama_op) for s in SITES}
        return {k: by_key[k] for k in self.sites}


QWEN2 = ArchSpec(name="qwen2", layer_tensors=QWEN2_LAYER_TENSORS,
                 sites=tuple(s.key for s in SITES if s.key not in ("q_norm", "k_norm")))

# Qwen3 (llama.cpp src/models/qwen3.cpp): no QKV biases; per-head RMSNorm of q and k (weights of
# size head_dim) before NEOX RoPE; head size from attention.key_length (128 on Qwen3-0.6B, where
# d_model / n_head = 64); output.weight optional (tied embeddings on the small models).
QWEN3 = ArchSpec(
    name="qwen3",
    layer_tensors={**{k: v for k, v in QWEN2_LAYER_TENSORS.items() if not k.endswith(".bias")},
                   "attn_q_norm.weight": ("Dh",), "attn_k_norm.weight": ("Dh",)},
    sites=tuple(s.key for s in SITES if s.key not in ("q", "k", "v")),
    qk_norm=True, qkv_bias=False,
    inputs={"q_rope": ("q_norm",), "k_rope": ("k_norm",), "kqv": ("attn_weights", "v_proj")})

ARCHS: dict[str, ArchSpec] = {QWEN2.name: QWEN2, QWEN3.name: QWEN3}


def supported() -> str:
    return ", ".join(ARCHS)
