"""Read a qwen2 GGUF into a config record and dequantized torch weights (gguf-py does the parsing).

Every failure is a :class:`GGUFError` whose message is one line naming the file and the problem.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"


class GGUFError(Exception):
    """A GGUF file that cannot be used; ``str()`` is a one-line user-facing message."""


@dataclass(frozen=True)
class Qwen2Config:
    n_layer: int
    d_model: int
    d_ff: int
    n_head: int
    n_head_kv: int
    rope_base: float
    rms_eps: float
    n_ctx: int
    n_vocab: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def dims(self, T: int = 0, P: int = 0) -> dict[str, int]:
        """Symbolic layout dims of :mod:`harness.sites` resolved for one step."""
        return dict(T=T, P=P, D=self.d_model, F=self.d_ff, H=self.n_head, Hkv=self.n_head_kv,
                    Dh=self.head_dim, V=self.n_vocab)


@dataclass
class GGUFModel:
    path: str
    config: Qwen2Config
    weights: dict[str, torch.Tensor]          # GGUF tensor name -> float tensor, numpy/torch layout
    types: dict[str, str] = field(default_factory=dict)  # GGUF tensor name -> "Q4_K", "F32", ...
    tied: bool = False                        # no output.weight: logits use token_embd.weight

    @property
    def weight_type(self) -> str:
        """The type of the attention/FFN matrices (what the tolerance policy keys on)."""
        return self.types.get("blk.0.ffn_down.weight") or self.types.get("token_embd.weight", "F32")


_META = {  # config field -> (metadata key suffix, python type)
    "n_layer": ("block_count", int), "d_model": ("embedding_length", int),
    "d_ff": ("feed_forward_length", int), "n_head": ("attention.head_count", int),
    "n_head_kv": ("attention.head_count_kv", int), "rope_base": ("rope.freq_base", float),
    "rms_eps": ("attention.layer_norm_rms_epsilon", float), "n_ctx": ("context_length", int),
}
_LAYER_TENSORS = {  # suffix -> shape in torch order, symbolic
    "attn_norm.weight": ("D",), "attn_q.weight": ("QD", "D"), "attn_q.bias": ("QD",),
    "attn_k.weight": ("KD", "D"), "attn_k.bias": ("KD",), "attn_v.weight": ("KD", "D"),
    "attn_v.bias": ("KD",), "attn_output.weight": ("D", "QD"), "ffn_norm.weight": ("D",),
    "ffn_gate.weight": ("F", "D"), "ffn_up.weight": ("F", "D"), "ffn_down.weight": ("D", "F"),
}


def _open_reader(path: str):
    from gguf import GGUFReader
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # gguf-py raises assorted errors on damaged headers
        raise GGUFError(f"{path}: corrupt or truncated GGUF header ({type(e).__name__}: {e})") from None
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFError(f"{path}: truncated file: tensor {t.name} ends at byte "
                            f"{t.data_offset + t.n_bytes} but the file has {size} bytes")
    return reader


def _field(reader, key: str, path: str, kind=None):
    f = reader.fields.get(key)
    if f is None:
        raise GGUFError(f"{path}: missing metadata key {key}")
    try:
        value = f.contents()
    except Exception as e:
        raise GGUFError(f"{path}: unreadable metadata key {key} ({e})") from None
    return kind(value) if kind else value


def read_config(reader, path: str) -> Qwen2Config:
    arch = _field(reader, "general.architecture", path, str)
    if arch != "qwen2":
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (llamadiff models qwen2)")
    values = {name: _field(reader, f"qwen2.{suffix}", path, kind) for name, (suffix, kind) in _META.items()}
    tok = reader.fields.get("tokenizer.ggml.tokens")
    if tok is None:
        raise GGUFError(f"{path}: missing metadata key tokenizer.ggml.tokens")
    cfg = Qwen2Config(n_vocab=len(tok.data), **values)
    if cfg.d_model % cfg.n_head or cfg.n_head % cfg.n_head_kv:
        raise GGUFError(f"{path}: inconsistent heads: embedding_length {cfg.d_model}, "
                        f"head_count {cfg.n_head}, head_count_kv {cfg.n_head_kv}")
    return cfg


def expected_shapes(cfg: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a qwen2 GGUF must hold, in torch (row, col) order."""
    sym = dict(D=cfg.d_model, F=cfg.d_ff, QD=cfg.n_head * cfg.head_dim, KD=cfg.n_head_kv * cfg.head_dim)
    shapes = {"token_embd.weight": (cfg.n_vocab, cfg.d_model), "output_norm.weight": (cfg.d_model,)}
    for i in range(cfg.n_layer):
        for suffix, dims in _LAYER_TENSORS.items():
            shapes[f"blk.{i}.{suffix}"] = tuple(sym[d] for d in dims)
    return shapes


def _dequantize(t, path: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    qtype = GGMLQuantizationType(t.tensor_type)
    try:
        arr = dequantize(t.data, qtype)
    except NotImplementedError:
        raise GGUFError(f"{path}: tensor {t.name} has type {qtype.name}, which gguf cannot dequantize") from None
    except Exception as e:
        raise GGUFError(f"{path}: tensor {t.name} ({qtype.name}) is corrupt ({type(e).__name__}: {e})") from None
    return arr.reshape(tuple(int(n) for n in reversed(t.shape)))


# --- opt-in torch dequantization (harness.dequant_torch), bit-exact with the numpy path ---
def _dequantize_torch(t, path: str, shape: tuple[int, ...], device) -> torch.Tensor | None:
    """``t`` dequantized on ``device`` from its raw bytes; None where torch lacks the type."""
    import warnings
    from gguf import GGMLQuantizationType
    from .dequant_torch import dequantize
    qtype = GGMLQuantizationType(t.tensor_type)
    raw_np = np.asarray(t.data).view(np.uint8)  # typed (F32/F16) or uint8 rows, on the memmap
    with warnings.catch_warnings():  # read-only memmap: only read, never written
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(raw_np).to(device)
    try:
        return dequantize(raw, qtype, shape)  # always a fresh tensor, never a view of the memmap
    except NotImplementedError:
        return None
    except ValueError as e:
        raise GGUFError(f"{path}: tensor {t.name} ({qtype.name}) is corrupt ({type(e).__name__}: {e})") from None
# --- end torch dequantization ---


def load_gguf(path: str | os.PathLike, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, torch_dequant: bool = False) -> GGUFModel:
    """Config and every weight of a qwen2 GGUF, dequantized to ``dtype`` on ``device``.

    ``torch_dequant``: move each tensor's raw bytes to ``device`` and dequantize there
    (:mod:`harness.dequant_torch`, bit-exact with gguf's numpy); numpy for types it lacks.
    """
    path = os.fspath(path)
    reader = _open_reader(path)
    cfg = read_config(reader, path)
    by_name = {t.name: t for t in reader.tensors}
    shapes = expected_shapes(cfg)
    tied = "output.weight" not in by_name
    if not tied:
        shapes["output.weight"] = (cfg.n_vocab, cfg.d_model)
    weights, types = {}, {}
    for name, want in shapes.items():
        t = by_name.get(name)
        if t is None:
            raise GGUFError(f"{path}: missing tensor {name}")
        found = tuple(int(n) for n in reversed(t.shape))
        if found != want:
            raise GGUFError(f"{path}: tensor {name} has shape {list(found)}, expected {list(want)} "
                            "(rows, cols)")
        w = _dequantize_torch(t, path, found, device) if torch_dequant else None
        if w is None:
            arr = np.array(_dequantize(t, path), dtype=np.float32, order="C", copy=True)  # off the memmap
            w = torch.from_numpy(arr)
        weights[name] = w.to(device=device, dtype=dtype)
        types[name] = t.tensor_type.name
    return GGUFModel(path=path, config=cfg, weights=weights, types=types, tied=tied)


def read_tokens(path: str | os.PathLike) -> list[str]:
    """The tokenizer's token strings (index = token id), for labelling reports."""
    path = os.fspath(path)
    f = _open_reader(path).fields.get("tokenizer.ggml.tokens")
    if f is None:
        raise GGUFError(f"{path}: missing metadata key tokenizer.ggml.tokens")
    return [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
