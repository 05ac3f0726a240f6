"""Read a GGUF of a supported architecture (:mod:`harness.gguf.arch`) into a config record and
dequantized torch weights. The header is read by :mod:`harness.gguf.header`; tensors are
dequantized by gguf-py, or on the device by :mod:`harness.gguf.dequant`.

Every failure is a :class:`GGUFError` whose message is one line naming the file and the problem.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from harness.gguf.arch import ARCHS, ArchSpec, supported

GGUF_MAGIC = b"GGUF"


class GGUFError(Exception):
    """A GGUF file that cannot be used; ``str()`` is a one-line user-facing message."""


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int
    d_model: int
    d_ff: int
    n_head: int
    n_head_kv: int
    rope_base: float
    rms_eps: float
    n_ctx: int
    n_vocab: int
    key_length: int | None = None     # attention.key_length when the file states it
    architecture: str = "qwen2"       # general.architecture: which ArchSpec (harness.gguf.arch)

    @property
    def head_dim(self) -> int:
        """``attention.key_length`` when present (not always d_model / n_head), else d_model / n_head."""
        return self.key_length or self.d_model // self.n_head

    @property
    def spec(self) -> ArchSpec:
        return ARCHS[self.architecture]

    def dims(self, T: int = 0, P: int = 0) -> dict[str, int]:
        """Symbolic layout dims of :mod:`harness.sites` resolved for one step."""
        return dict(T=T, P=P, D=self.d_model, F=self.d_ff, H=self.n_head, Hkv=self.n_head_kv,
                    Dh=self.head_dim, V=self.n_vocab)


class LazyWeight:
    """A matrix kept as its raw GGUF bytes on the device and dequantized when used (layer by
    layer), for models whose float weights do not fit beside llama.cpp's copy. The last matrix
    expanded is kept (one slot, shared by all), so a weight read twice in a row -- by the matmul,
    then as a hook input -- is expanded once. Values equal the eager load's bit for bit."""
    _last: tuple["LazyWeight | None", "torch.Tensor | None"] = (None, None)

    def __init__(self, raw: torch.Tensor, qtype, shape: tuple[int, ...], dtype: torch.dtype):
        self.raw, self.qtype, self.shape, self.dtype = raw, qtype, tuple(shape), dtype
        self.device = raw.device

    def dim(self) -> int:
        return len(self.shape)

    def expand(self) -> torch.Tensor:
        """The float matrix (shape ``self.shape``, ``self.dtype``)."""
        owner, w = LazyWeight._last
        if owner is not self:
            LazyWeight._last = (None, None)          # free the previous one first
            from harness.gguf.dequant import dequantize
            w = dequantize(self.raw, self.qtype, self.shape).to(self.dtype)
            LazyWeight._last = (self, w)
        return w


@dataclass
class GGUFModel:
    path: str
    config: ModelConfig
    weights: dict[str, torch.Tensor]          # GGUF tensor name -> float tensor (or LazyWeight), torch layout
    types: dict[str, str] = field(default_factory=dict)  # GGUF tensor name -> "Q4_K", "F32", ...
    tied: bool = False                        # no output.weight: logits use token_embd.weight

    file_type: str | None = None              # general.file_type as llama.cpp names it ("Q4_K_M")
    records: dict = field(default_factory=dict, repr=False)  # GGUF tensor name -> header TensorRecord

    def raw(self, name: str) -> torch.Tensor:
        """Tensor ``name``'s GGUF bytes (uint8) on its weight's device, read again from the file
        (a lazy weight's are at hand)."""
        w = self.weights[name]
        if isinstance(w, LazyWeight):
            return w.raw
        rec = self.records.get(name) or {t.name: t for t in open_gguf(self.path).tensors}[name]
        return torch.from_numpy(_raw(rec, self.path)).to(w.device)

    @property
    def weight_type(self) -> str:
        """The type of blk.0's FFN down matrix: a file-level label. The tolerance policy keys on
        :attr:`file_type` and, for weight matmuls, on each site's own tensor type (``types``)."""
        return self.types.get("blk.0.ffn_down.weight") or self.types.get("token_embd.weight", "F32")

    def type_mix(self) -> dict[str, int]:
        """Tensor type -> how many tensors have it, most common first."""
        return dict(Counter(self.types.values()).most_common())


_META = {  # config field -> (metadata key suffix, python type)
    "n_layer": ("block_count", int), "d_model": ("embedding_length", int),
    "d_ff": ("feed_forward_length", int), "n_head": ("attention.head_count", int),
    "n_head_kv": ("attention.head_count_kv", int), "rope_base": ("rope.freq_base", float),
    "rms_eps": ("attention.layer_norm_rms_epsilon", float), "n_ctx": ("context_length", int),
}


def open_gguf(path: str):
    """The header (metadata and tensor records) of a GGUF file, checked against the file size."""
    from harness.gguf.header import HeaderError, scan
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        hdr = scan(path)
    except (HeaderError, ValueError, OverflowError, MemoryError) as e:
        raise GGUFError(f"{path}: corrupt or truncated GGUF header ({type(e).__name__}: {e})") from None
    size = os.path.getsize(path)
    for t in hdr.tensors:
        if t.offset + t.nbytes > size:
            raise GGUFError(f"{path}: truncated file: tensor {t.name} ends at byte "
                            f"{t.offset + t.nbytes} but the file has {size} bytes")
    return hdr


def read_config_file(path: str) -> "ModelConfig":
    """The model config of the GGUF at ``path`` (header only; GGUFError when unusable)."""
    return read_config(open_gguf(path), path)


def tensor_types(hdr) -> dict[str, str]:
    """GGUF tensor name -> type name ("Q4_K", "F32", ...)."""
    from gguf import GGMLQuantizationType
    return {t.name: GGMLQuantizationType(t.type).name for t in hdr.tensors}


def _field(hdr, key: str, path: str, kind=None):
    if key not in hdr.fields:
        raise GGUFError(f"{path}: missing metadata key {key}")
    value = hdr.fields[key]
    try:
        return kind(value) if kind else value
    except (TypeError, ValueError) as e:
        raise GGUFError(f"{path}: unreadable metadata key {key} ({e})") from None


def read_config(hdr, path: str) -> ModelConfig:
    arch = _field(hdr, "general.architecture", path, str)
    if arch not in ARCHS:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (llamadiff models {supported()})")
    spec = ARCHS[arch]
    values = {name: _field(hdr, f"{spec.prefix}.{suffix}", path, kind) for name, (suffix, kind) in _META.items()}
    key_length = f"{spec.prefix}.attention.key_length"
    if key_length in hdr.fields:
        values["key_length"] = _field(hdr, key_length, path, int)
    tok = _field(hdr, "tokenizer.ggml.tokens", path)
    cfg = ModelConfig(n_vocab=len(tok), architecture=arch, **values)
    if (cfg.key_length is None and cfg.d_model % cfg.n_head) or cfg.n_head % cfg.n_head_kv:
        raise GGUFError(f"{path}: inconsistent heads: embedding_length {cfg.d_model}, "
                        f"head_count {cfg.n_head}, head_count_kv {cfg.n_head_kv}")
    return cfg


def file_type_name(hdr) -> str | None:
    """``general.file_type`` as llama.cpp names it (``MOSTLY_Q4_K_M`` -> ``Q4_K_M``), or None."""
    value = hdr.fields.get("general.file_type")
    if value is None:
        return None
    from gguf import LlamaFileType
    try:
        return LlamaFileType(int(value)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (ValueError, TypeError):
        return f"file type {value}"


def check_forward_metadata(hdr, cfg: ModelConfig, path: str) -> None:
    """Refuse, in one line naming the key, metadata that makes llama.cpp compute a forward pass our
    model does not: RoPE scaling (linear factor, YaRN, LongRoPE), RoPE over part of the head, a
    value head size other than the key's. Keys that only concern tokenization or chat (template,
    BOS/EOS flags) are llama.cpp's side: both engines run on the tokens llama.cpp makes."""
    p, f = cfg.spec.prefix, hdr.fields
    why = "our model implements plain RoPE over the whole head and equal K/V head sizes"
    checks = [(f"{p}.rope.scaling.type", lambda v: str(v) in ("none", "linear")),
              (f"{p}.rope.scaling.factor", lambda v: float(v) in (0.0, 1.0)),
              (f"{p}.rope.scale_linear", lambda v: float(v) in (0.0, 1.0)),
              (f"{p}.rope.dimension_count", lambda v: int(v) == cfg.head_dim),
              (f"{p}.attention.value_length", lambda v: int(v) == cfg.head_dim)]
    for key, ok in checks:
        if key in f and not ok(f[key]):
            raise GGUFError(f"{path}: {key} = {f[key]!r} is not supported ({why}); llamadiff refuses "
                            "rather than compare a different model than llama.cpp runs")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a GGUF of ``cfg``'s architecture must hold (its optional ones left out), in
    torch (row, col) order."""
    spec = cfg.spec
    sym = dict(D=cfg.d_model, F=cfg.d_ff, QD=cfg.n_head * cfg.head_dim, KD=cfg.n_head_kv * cfg.head_dim,
               Dh=cfg.head_dim, V=cfg.n_vocab)
    shapes = {n: tuple(sym[d] for d in dims) for n, dims in spec.global_tensors.items() if n not in spec.optional}
    for i in range(cfg.n_layer):
        for suffix, dims in spec.layer_tensors.items():
            if suffix not in spec.optional:
                shapes[f"blk.{i}.{suffix}"] = tuple(sym[d] for d in dims)
    return shapes


def optional_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors a file of ``cfg``'s architecture may hold or omit (``output.weight``: tied)."""
    sym = dict(D=cfg.d_model, V=cfg.n_vocab)
    return {n: tuple(sym[d] for d in dims) for n, dims in cfg.spec.global_tensors.items() if n in cfg.spec.optional}


def _raw(t, path: str) -> np.ndarray:
    from harness.gguf.header import HeaderError, read_tensor_bytes
    try:
        return read_tensor_bytes(path, t)
    except HeaderError as e:
        raise GGUFError(f"{path}: {e}") from None


def _dequantize(t, raw: np.ndarray, path: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    qtype = GGMLQuantizationType(t.type)
    try:
        arr = dequantize(raw, qtype)
    except NotImplementedError:
        raise GGUFError(f"{path}: tensor {t.name} has type {qtype.name}, which gguf cannot dequantize") from None
    except Exception as e:
        raise GGUFError(f"{path}: tensor {t.name} ({qtype.name}) is corrupt ({type(e).__name__}: {e})") from None
    return arr.reshape(t.shape)


def _dequantize_torch(t, raw: np.ndarray, path: str, device) -> torch.Tensor | None:
    """``t`` dequantized on ``device`` from its raw bytes (harness.gguf.dequant, bit-exact with
    the numpy path); None where torch lacks the type."""
    from gguf import GGMLQuantizationType
    from harness.gguf.dequant import dequantize
    qtype = GGMLQuantizationType(t.type)
    try:
        return dequantize(torch.from_numpy(raw).to(device), qtype, t.shape)
    except NotImplementedError:
        return None
    except ValueError as e:
        raise GGUFError(f"{path}: tensor {t.name} ({qtype.name}) is corrupt ({type(e).__name__}: {e})") from None


def _torch_decodable(qtype) -> bool:
    from gguf import GGMLQuantizationType
    from harness.gguf.dequant import SUPPORTED
    return GGMLQuantizationType(qtype) in SUPPORTED


def load_gguf(path: str | os.PathLike, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, torch_dequant: bool = False,
              lazy: bool = False) -> GGUFModel:
    """Config and every weight of a GGUF, dequantized to ``dtype`` on ``device``.

    Tensors are read one at a time with plain reads (no memory map), so host memory holds at most
    one raw tensor. ``torch_dequant``: move each tensor's raw bytes to ``device`` and dequantize
    there (:mod:`harness.gguf.dequant`); numpy (gguf-py) for types it lacks. ``lazy``: keep
    each matrix of a torch-decodable type as a :class:`LazyWeight` (raw bytes on ``device``).
    """
    path = os.fspath(path)
    hdr = open_gguf(path)
    cfg = read_config(hdr, path)
    check_forward_metadata(hdr, cfg, path)
    by_name = {t.name: t for t in hdr.tensors}
    shapes = expected_shapes(cfg)
    shapes.update({n: want for n, want in optional_shapes(cfg).items() if n in by_name})
    tied = "output.weight" not in by_name
    types = tensor_types(hdr)
    weights = {}
    for name, want in shapes.items():
        t = by_name.get(name)
        if t is None:
            raise GGUFError(f"{path}: missing tensor {name}")
        if t.shape != want:
            raise GGUFError(f"{path}: tensor {name} has shape {list(t.shape)}, expected {list(want)} "
                            "(rows, cols)")
        raw = _raw(t, path)
        if lazy and len(want) == 2 and _torch_decodable(t.type):
            weights[name] = LazyWeight(torch.from_numpy(raw).to(device), t.type, want, dtype)
            continue
        w = _dequantize_torch(t, raw, path, device) if torch_dequant else None
        if w is None:
            w = torch.from_numpy(np.ascontiguousarray(_dequantize(t, raw, path), dtype=np.float32))
        weights[name] = w.to(device=device, dtype=dtype)
    return GGUFModel(path=path, config=cfg, weights=weights, types={n: types[n] for n in shapes}, tied=tied,
                     file_type=file_type_name(hdr), records={n: by_name[n] for n in shapes})


def float_bytes(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> int:
    """Bytes every tensor of the GGUF takes once dequantized to ``dtype`` (an eager load)."""
    hdr = open_gguf(os.fspath(path))
    return sum(math.prod(t.shape) for t in hdr.tensors) * dtype.itemsize


def read_tokens(path: str | os.PathLike) -> list[str]:
    """The tokenizer's token strings (index = token id), for labelling reports."""
    from harness.gguf.header import HeaderError, scan
    path = os.fspath(path)
    open_gguf(path)
    try:
        tokens = scan(path, keep_strings=("tokenizer.ggml.tokens",)).fields.get("tokenizer.ggml.tokens")
    except HeaderError as e:
        raise GGUFError(f"{path}: corrupt GGUF header ({e})") from None
    if tokens is None:
        raise GGUFError(f"{path}: missing metadata key tokenizer.ggml.tokens")
    return list(tokens)
