"""Synthetic GGUF fixtures (qwen2 presets): random weights and a small but valid byte-level BPE tokenizer.

``write_synthetic`` writes a file that both :func:`harness.gguf.load.load_gguf` and llama.cpp load,
deterministic per seed: each tensor's values depend only on (seed, tensor name), drawn by numpy
Generators in fixed blocks (filled on all cores), so a tied and an untied file share every tensor
they both have. Matrices, norms and biases are random; the q/k biases carry the large
negative outliers real Qwen2.5 has (in the low-frequency RoPE dims, so attention stays sane).
Quantized types are made by llama.cpp's own quantizer from an F32 file, or, for the big presets,
from a Q8_0 base quantized tensor by tensor while it is generated (ggml's own ``ggml_quantize_chunk``
from llama-cpp-python's libggml-base): about a quarter of the F32 temp file. The 32B-shaped preset's
Q4_K_M blocks are drawn directly (:mod:`harness.synth_kquant`, no quantizer). Free disk space is
checked against an estimate before anything is written. Every failure is a :class:`SynthError`
with a one-line message.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from harness.synth_kquant import random_blocks
from harness.synth_tokenizer import SPECIAL_TOKENS, build_vocab, bytes_to_unicode  # noqa: F401 - re-exported

class SynthError(Exception):
    """A fixture that cannot be written; ``str()`` is a one-line user-facing message."""


@dataclass(frozen=True)
class Preset:
    n_layer: int
    d_model: int
    d_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int          # rows of token_embd / output (regular + special + [PAD] tail)
    n_ctx: int
    rope_base: float
    rms_eps: float
    tied: bool            # default for write_synthetic(tied=None)
    n_regular: int        # byte tokens + merged tokens
    n_special: int        # leading entries of SPECIAL_TOKENS that follow the regular vocab
    arch: str = "qwen2"   # general.architecture (harness.gguf.arch.ARCHS)
    key_length: int | None = None   # head size written as attention.key_length/value_length (qwen3)

    @property
    def head_dim(self) -> int:
        return self.key_length or self.d_model // self.n_head

    def config(self):
        """The :class:`harness.gguf.load.ModelConfig` a file written from this preset loads as
        (GGUF stores the floats as float32, so ``rms_eps`` reads back as 9.99999997e-07)."""
        from harness.gguf.load import ModelConfig
        f32 = lambda x: float(np.float32(x))  # noqa: E731
        return ModelConfig(n_layer=self.n_layer, d_model=self.d_model, d_ff=self.d_ff,
                           n_head=self.n_head, n_head_kv=self.n_head_kv, rope_base=f32(self.rope_base),
                           rms_eps=f32(self.rms_eps), n_ctx=self.n_ctx, n_vocab=self.n_vocab,
                           key_length=self.key_length, architecture=self.arch)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(n_layer=3, d_model=256, d_ff=512, n_head=4, n_head_kv=2, n_vocab=1024,
                   n_ctx=2048, rope_base=1e6, rms_eps=1e-6, tied=False, n_regular=1000, n_special=3),
    "qwen2.5-0.5b": Preset(n_layer=24, d_model=896, d_ff=4864, n_head=14, n_head_kv=2,
                           n_vocab=151936, n_ctx=32768, rope_base=1e6, rms_eps=1e-6, tied=False,
                           n_regular=151643, n_special=22),
    # Qwen2.5-7B shapes, for benchmarks (its quantized types are made from an 8.1 GB Q8_0 base)
    "qwen2.5-7b": Preset(n_layer=28, d_model=3584, d_ff=18944, n_head=28, n_head_kv=4,
                         n_vocab=152064, n_ctx=32768, rope_base=1e6, rms_eps=1e-6, tied=False,
                         n_regular=151643, n_special=22),
    # Qwen2.5-32B shapes, for memory benchmarks (issue 16): Q4_K_M needs a 34.8 GB Q8_0 base (not a
    # 65 GB F16 one) next to the 19.9 GB result while it is quantized
    "qwen2.5-32b": Preset(n_layer=64, d_model=5120, d_ff=27648, n_head=40, n_head_kv=8,
                          n_vocab=152064, n_ctx=32768, rope_base=1e6, rms_eps=1e-6, tied=False,
                          n_regular=151643, n_special=22),
    # Qwen3: no QKV biases, per-head Q/K norms, head size 128 from attention.key_length
    "tiny-qwen3": Preset(n_layer=3, d_model=256, d_ff=512, n_head=4, n_head_kv=2, n_vocab=1024,
                         n_ctx=2048, rope_base=1e6, rms_eps=1e-6, tied=True, n_regular=1000, n_special=3,
                         arch="qwen3", key_length=128),
    "qwen3-0.6b": Preset(n_layer=28, d_model=1024, d_ff=3072, n_head=16, n_head_kv=8,
                         n_vocab=151936, n_ctx=40960, rope_base=1e6, rms_eps=1e-6, tied=True,
                         n_regular=151643, n_special=22, arch="qwen3", key_length=128),
    "qwen3-8b": Preset(n_layer=36, d_model=4096, d_ff=12288, n_head=32, n_head_kv=8,
                       n_vocab=151936, n_ctx=40960, rope_base=1e6, rms_eps=1e-6, tied=False,
                       n_regular=151643, n_special=22, arch="qwen3", key_length=128),
}
# presets whose quantized types are made from a Q8_0 base written while generated (not from F32)
_Q8_BASE = {"qwen2.5-7b", "qwen2.5-32b", "qwen3-8b"}
# presets whose q4_k_m file is drawn as k-quant blocks directly (llama.cpp's quantizer: ~8 min on 16 cores)
_KQUANT = {"qwen2.5-32b"}
WEIGHT_TYPES = ("f32", "f16", "q8_0", "q4_k_m")

_MAT_STD = 0.02      # attention/FFN matrices, output.weight, biases
_EMBD_STD = 0.02     # token_embd: small like Qwen, so RMSNorm's epsilon matters
_OUTLIER_RANGE = (-34.0, -14.0)
_BLOCK = 1 << 21     # elements per independently seeded block of a large tensor
_QK8_0, _Q8_0_BYTES = 32, 34   # Q8_0: 32 weights in 34 bytes (an f16 scale and 32 int8)
_GGML_Q8_0 = 8                 # enum ggml_type: GGML_TYPE_Q8_0
_BYTES_PER_256 = {"F32": 1024, "F16": 512, "Q8_0": 272, "Q6_K": 210, "Q4_K": 144}
_DTYPES = {"F32": np.float32, "F16": np.float16, "Q8_0": "q8_0"}   # _normal's dtype for a base file's type
_HEADER_BYTES = 1 << 24        # metadata (a 152k-token vocab and its merges: ~5 MB) and padding, rounded up
_ggml_lib = None               # libggml-base (ctypes), False when it cannot be loaded


def build_tokenizer(preset: Preset) -> dict:
    """Tokens, token types, merges and special ids for a preset (Qwen2.5's layout)."""
    from gguf import TokenType
    if preset.n_special > len(SPECIAL_TOKENS):
        raise SynthError(f"n_special {preset.n_special} exceeds the {len(SPECIAL_TOKENS)} known specials")
    try:
        tokens, merges = build_vocab(preset.n_regular)
    except ValueError as e:
        raise SynthError(str(e)) from None
    types = [int(TokenType.NORMAL)] * len(tokens)
    for text in SPECIAL_TOKENS[:preset.n_special]:
        tokens.append(text)
        user = text in ("<tool_call>", "</tool_call>")  # special=False in Qwen2.5's tokenizer
        types.append(int(TokenType.USER_DEFINED if user else TokenType.CONTROL))
    if len(tokens) > preset.n_vocab:
        raise SynthError(f"{len(tokens)} regular+special tokens exceed n_vocab {preset.n_vocab}")
    for i in range(len(tokens), preset.n_vocab):
        tokens.append(f"[PAD{i}]")
        types.append(int(TokenType.UNUSED))
    first = preset.n_regular
    return dict(tokens=tokens, types=types, merges=merges,
                bos=first, eos=first + 2 if preset.n_special >= 3 else first, pad=first)


def _tensor_plan(preset: Preset, tied: bool) -> dict[str, tuple[int, ...]]:
    """Tensor name -> numpy shape (torch order), in file order."""
    from harness.gguf.load import expected_shapes, optional_shapes
    cfg = preset.config()
    shapes = expected_shapes(cfg)
    if not tied:
        shapes.update(optional_shapes(cfg))       # output.weight
    return shapes


def _rng(seed: int, name: str, block: int = 0) -> np.random.Generator:
    """The generator for one block of one tensor: a tensor's values depend only on (seed, name)."""
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence([seed, zlib.crc32(name.encode()), block])))


def _normal(seed: int, name: str, shape: tuple[int, ...], std: float, dtype) -> np.ndarray:
    """N(0, std^2) in ``dtype``, filled in fixed blocks (each its own generator) on all cores. With
    ``dtype="q8_0"``: the Q8_0 bytes of exactly the float32 values (shape ``(*shape[:-1], shape[-1]
    // 32 * 34)``), each block quantized as it is drawn, so the tensor never exists whole in F32."""
    n, q8 = int(np.prod(shape)), dtype == "q8_0"
    out = np.empty(n // _QK8_0 * _Q8_0_BYTES, np.uint8) if q8 else np.empty(n, dtype)

    def fill(block: int) -> None:
        lo, hi = block * _BLOCK, min(n, (block + 1) * _BLOCK)   # _BLOCK and n are multiples of 32
        dst = None if q8 else out[lo:hi]
        part = dst if dst is not None and dst.dtype == np.float32 else np.empty(hi - lo, np.float32)
        _rng(seed, name, block).standard_normal(out=part, dtype=np.float32)
        part *= std
        if q8:
            quantize_q8_0(part, out[lo // _QK8_0 * _Q8_0_BYTES:hi // _QK8_0 * _Q8_0_BYTES])
        elif part is not dst:  # float16: torch's cast is ~10x faster than numpy's
            import torch
            torch.from_numpy(dst).copy_(torch.from_numpy(part))

    n_blocks = -(-n // _BLOCK)   # numpy's generators and ctypes calls release the GIL
    if n_blocks == 1:
        fill(0)
    else:
        with ThreadPoolExecutor(max_workers=min(n_blocks, os.cpu_count() or 1)) as pool:
            list(pool.map(fill, range(n_blocks)))
    return out.reshape(*shape[:-1], -1)


def ggml_base():
    """llama-cpp-python's bundled libggml-base (for ``ggml_quantize_chunk``), loaded once without
    importing llama_cpp; None where it cannot be loaded. (Threads racing here both load it: harmless.)"""
    global _ggml_lib
    if _ggml_lib is None:
        found, spec = False, importlib.util.find_spec("llama_cpp")
        dirs = list(spec.submodule_search_locations or []) if spec else []
        for path in (os.path.join(d, "lib", f) for d in dirs for f in ("libggml-base.so", "libggml-base.dylib")):
            try:
                lib = ctypes.CDLL(path)
                fn, row_size = lib.ggml_quantize_chunk, lib.ggml_row_size
            except (OSError, AttributeError):
                continue
            fn.restype, row_size.restype = ctypes.c_size_t, ctypes.c_size_t
            fn.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                           ctypes.c_int64, ctypes.c_void_p)
            row_size.argtypes = (ctypes.c_int, ctypes.c_int64)
            if row_size(_GGML_Q8_0, _QK8_0) == _Q8_0_BYTES:   # the enum value means Q8_0 in this build
                found = lib
                break
        _ggml_lib = found
    return _ggml_lib or None


def quantize_q8_0(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Q8_0 bytes of float32 ``values`` (their size a multiple of 32) as llama.cpp makes them:
    ggml's ``ggml_quantize_chunk`` where libggml-base loads, else gguf-py's numpy port of it.
    Written into ``out`` (contiguous uint8 of the right size) when given."""
    src = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if src.size % _QK8_0:
        raise SynthError(f"cannot quantize {src.size} values to Q8_0: not a multiple of {_QK8_0}")
    nbytes = src.size // _QK8_0 * _Q8_0_BYTES
    out = np.empty(nbytes, np.uint8) if out is None else out
    if out.dtype != np.uint8 or out.size != nbytes or not out.flags.c_contiguous:
        raise SynthError(f"Q8_0 of {src.size} values needs {nbytes} contiguous bytes, got {out.dtype} {out.shape}")
    lib = ggml_base()
    if lib is not None:
        done = lib.ggml_quantize_chunk(_GGML_Q8_0, src.ctypes.data, out.ctypes.data, 0, 1, src.size, None)
        if done != nbytes:
            raise SynthError(f"ggml_quantize_chunk wrote {done} bytes of Q8_0, expected {nbytes}")
    else:
        from gguf.quants import quantize
        from gguf import GGMLQuantizationType
        out.reshape(-1)[:] = quantize(src, GGMLQuantizationType.Q8_0).reshape(-1)
    return out


def _outlier_bias(rng: np.random.Generator, n_heads: int, head_dim: int) -> np.ndarray:
    """N(0, 0.02) bias with 2-4 entries in [-34, -14] at low-frequency RoPE dims."""
    bias = rng.standard_normal(n_heads * head_dim, dtype=np.float32)
    bias *= _MAT_STD
    half = head_dim // 2
    dims = (half - 2, half - 1, head_dim - 2, head_dim - 1)
    slots = np.array([h * head_dim + d for h in range(n_heads) for d in dims])
    pick = rng.choice(slots, size=int(rng.integers(2, 5)), replace=False)
    bias[pick] = rng.uniform(*_OUTLIER_RANGE, size=pick.size).astype(np.float32)
    return bias


def _tensor_type(shape: tuple[int, ...], base: str) -> str:
    """The GGML type of a tensor of ``shape`` in a base file of type ``base`` (f32, f16, q8_0):
    1-D tensors (norms, biases) and rows that are not whole Q8_0 blocks stay F32."""
    if len(shape) == 1 or (base == "q8_0" and shape[-1] % _QK8_0):
        return "F32"
    return base.upper()


def _make_tensor(seed: int, name: str, shape: tuple[int, ...], preset: Preset, base: str) -> np.ndarray:
    if name.endswith("norm.weight"):
        a = _rng(seed, name).standard_normal(shape, dtype=np.float32)
        a *= 0.1
        a += 1.0
        return a
    if name.endswith(("attn_q.bias", "attn_k.bias")):
        n = preset.n_head if "attn_q" in name else preset.n_head_kv
        return _outlier_bias(_rng(seed, name), n, preset.head_dim)
    std = _EMBD_STD if name == "token_embd.weight" else _MAT_STD
    return _normal(seed, name, shape, std, _DTYPES[_tensor_type(shape, base)])


def _write_metadata(w, preset: Preset) -> None:
    """Hyperparameters and the tokenizer, as GGUF key/values."""
    import gguf
    tok = build_tokenizer(preset)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(preset.n_ctx)
    w.add_embedding_length(preset.d_model)
    w.add_block_count(preset.n_layer)
    w.add_feed_forward_length(preset.d_ff)
    w.add_head_count(preset.n_head)
    w.add_head_count_kv(preset.n_head_kv)
    if preset.key_length is not None:
        w.add_key_length(preset.key_length)
        w.add_value_length(preset.key_length)
    w.add_rope_freq_base(preset.rope_base)
    w.add_layer_norm_rms_eps(preset.rms_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    arr, K = gguf.GGUFValueType.ARRAY, gguf.Keys.Tokenizer  # sub_type given: skips per-item checks
    w.add_key_value(K.LIST, tok["tokens"], arr, gguf.GGUFValueType.STRING)
    w.add_key_value(K.TOKEN_TYPE, tok["types"], arr, gguf.GGUFValueType.INT32)
    w.add_key_value(K.MERGES, tok["merges"], arr, gguf.GGUFValueType.STRING)
    w.add_eos_token_id(tok["eos"])
    w.add_pad_token_id(tok["pad"])
    w.add_bos_token_id(tok["bos"])
    w.add_add_bos_token(False)


def _write_base(path: str, preset: Preset, name: str, base: str, seed: int, tied: bool) -> None:
    """Stream a GGUF whose matrices are ``base`` (f32, f16, q8_0, or q4_k_m: random k-quant blocks
    of Q4_K_M's types, :mod:`harness.synth_kquant`) to ``path``: one tensor in memory at a time
    (a Q8_0 one never whole in F32)."""
    import gguf
    w = gguf.GGUFWriter(path, preset.arch)
    w.add_name(name)
    w.add_file_type(int({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}[base]))
    _write_metadata(w, preset)
    plan = _tensor_plan(preset, tied)
    types = _file_types(preset, tied, base)
    for tname, shape in plan.items():
        ttype = types[tname]
        raw = ttype in ("Q8_0", "Q4_K", "Q6_K")   # given as bytes: (..., row) -> (..., row bytes) uint8
        w.add_tensor_info(tname, (*shape[:-1], _nbytes(shape[-1:], ttype)) if raw else shape,
                          np.dtype(np.uint8 if raw else _DTYPES[ttype]), _nbytes(shape, ttype),
                          raw_dtype=gguf.GGMLQuantizationType[ttype] if raw else None)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for tname, shape in plan.items():
            if types[tname] in ("Q4_K", "Q6_K"):
                std = _EMBD_STD if tname == "token_embd.weight" else _MAT_STD
                w.write_tensor_data(random_blocks(_rng(seed, tname), types[tname], shape, std))
            else:
                w.write_tensor_data(_make_tensor(seed, tname, shape, preset, base if base != "q4_k_m" else "q8_0"))
    finally:
        w.close()


def _quantize(src: str, dst: str, wtype: str) -> None:
    """llama.cpp's quantizer, run in the llama.cpp worker process (a crash there is a SynthError)."""
    from harness.llama.runner import LlamaError
    from harness.llama.worker import run_isolated
    try:
        rc = run_isolated(quantize_file, src, dst, wtype)
    except LlamaError as e:
        raise SynthError(f"cannot make a {wtype} fixture: {e}") from None
    if rc != 0:
        raise SynthError(f"llama.cpp could not quantize {src} to {wtype} (llama_model_quantize returned {rc})")


def quantize_file(src: str, dst: str, wtype: str) -> int:
    """``llama_model_quantize(src -> dst)`` in this process (a Q8_0 ``src`` is requantized); its return code."""
    from harness.llama.lib import llama
    lc = llama()
    p = lc.llama_model_quantize_default_params()
    p.ftype = {"q8_0": lc.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": lc.LLAMA_FTYPE_MOSTLY_Q4_K_M}[wtype]
    p.nthread = min(os.cpu_count() or 1, 8)
    p.allow_requantize = True
    return lc.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))


def _nbytes(shape: tuple[int, ...], ttype: str) -> int:
    return int(np.prod(shape)) * _BYTES_PER_256[ttype] // 256


def _q4_k_m_type(name: str, shape: tuple[int, ...], preset: Preset, tied: bool) -> str:
    """The type llama.cpp's Q4_K_M gives a matrix of a dense qwen2/qwen3 model (its
    llama_tensor_get_type), for size estimates; rows that k-quants cannot take are bounded by Q8_0."""
    if shape[-1] % 256:
        return "Q8_0"
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "Q6_K"
    if name.endswith(("attn_v.weight", "ffn_down.weight")):
        i, n = int(name.split(".")[1]), preset.n_layer
        if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2:   # llama.cpp's use_more_bits
            return "Q6_K"
    return "Q4_K"


def _file_types(preset: Preset, tied: bool, base: str) -> dict[str, str]:
    """Tensor name -> GGML type in a file written as ``base`` (f32, f16, q8_0, or q4_k_m drawn
    directly: Q4_K_M's k-quant types where rows are whole 256-blocks, else as in a Q8_0 file)."""
    out = {}
    for name, shape in _tensor_plan(preset, tied).items():
        out[name] = _tensor_type(shape, "q8_0" if base == "q4_k_m" else base)
        if base == "q4_k_m" and len(shape) > 1 and shape[-1] % 256 == 0:
            out[name] = _q4_k_m_type(name, shape, preset, tied)
    return out


def _base_type(preset: str, wtype: str, q8_base: bool | None, kquant: bool | None = None) -> str:
    """The type written first: the file itself (f32, f16; q4_k_m drawn directly), or the base
    llama.cpp's quantizer makes a q8_0/q4_k_m file from (q8_0 or f32)."""
    if wtype in ("f32", "f16") or (wtype == "q4_k_m" and (preset in _KQUANT if kquant is None else kquant)):
        return wtype
    return "q8_0" if (preset in _Q8_BASE if q8_base is None else q8_base) else "f32"


def disk_estimate(preset: str, wtype: str, tied: bool | None = None, q8_base: bool | None = None,
                  kquant: bool | None = None) -> tuple[int, int]:
    """(temporary base, final file) bytes that :func:`write_synthetic` has on disk at once with
    these arguments, estimated from the tensor shapes; the base is 0 where it becomes the final file."""
    _check_choice("preset", preset, PRESETS)
    _check_choice("weight type", wtype, WEIGHT_TYPES)
    p = PRESETS[preset]
    tied = p.tied if tied is None else bool(tied)
    base = _base_type(preset, wtype, q8_base, kquant)
    plan = _tensor_plan(p, tied)
    types = _file_types(p, tied, base)
    base_bytes = _HEADER_BYTES + sum(_nbytes(s, types[n]) for n, s in plan.items())
    if base == wtype:
        return 0, base_bytes
    final = _HEADER_BYTES + sum(_nbytes(s, _tensor_type(s, "q8_0") if wtype == "q8_0" or len(s) == 1
                                         else _q4_k_m_type(n, s, p, tied)) for n, s in plan.items())
    return base_bytes, final


def _check_space(out_path: str, preset: str, wtype: str, tied: bool, q8_base: bool | None,
                 kquant: bool | None) -> None:
    base, final = disk_estimate(preset, wtype, tied, q8_base, kquant)
    directory = os.path.dirname(out_path)
    free = shutil.disk_usage(directory).free
    if base + final > free:
        gb = lambda n: f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"   # noqa: E731
        parts = f"a {gb(base)} {_base_type(preset, wtype, q8_base, kquant).upper()} base and " if base else ""
        raise SynthError(f"{out_path}: not enough free disk space: {preset} {wtype} needs about {gb(base + final)} "
                         f"({parts}the {gb(final)} {wtype.upper()} file), {directory} has {gb(free)} free")


def _check_choice(kind: str, value: str, choices) -> None:
    if value not in choices:
        raise SynthError(f"unknown {kind} {value!r}; choose one of: {', '.join(choices)}")


def _temp_path(directory: str, base: str, tag: str) -> str:
    """A fresh hidden name next to the output (unique per process and call)."""
    return os.path.join(directory, f".{base}.{os.getpid()}-{uuid.uuid4().hex[:8]}.{tag}.tmp")


def write_synthetic(out_path: str | os.PathLike, preset: str = "tiny", wtype: str = "f32",
                    seed: int = 0, tied: bool | None = None, q8_base: bool | None = None,
                    kquant: bool | None = None) -> str:
    """Write a random-weight GGUF of a preset to ``out_path`` atomically and return its path.

    ``tied=None`` takes the preset's default; ``tied=True`` omits output.weight. ``q8_base``: make a
    q8_0/q4_k_m file from a Q8_0 base (itself the q8_0 file) rather than an F32 one; None takes the
    preset's default (the big presets do). ``kquant``: draw a q4_k_m file's k-quant blocks directly
    (:mod:`harness.synth_kquant`, no quantizer, no base); None takes the preset's default (only
    qwen2.5-32b does). Fails before writing when the disk cannot hold it."""
    _check_choice("preset", preset, PRESETS)
    _check_choice("weight type", wtype, WEIGHT_TYPES)
    if not isinstance(seed, int) or seed < 0:
        raise SynthError(f"seed must be a non-negative integer, got {seed!r}")
    p = PRESETS[preset]
    tied = p.tied if tied is None else bool(tied)
    out_path = os.path.abspath(os.fspath(out_path))
    directory, base_name = os.path.split(out_path)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise SynthError(f"{out_path}: cannot create directory ({e.strerror})") from None
    name = f"synthetic-{preset}-{wtype}-s{seed}{'-tied' if tied else ''}"
    base = _base_type(preset, wtype, q8_base, kquant)
    temps = []
    try:
        _check_space(out_path, preset, wtype, tied, q8_base, kquant)
        base_path = _temp_path(directory, base_name, base)
        temps.append(base_path)
        _write_base(base_path, p, name, base, seed, tied)
        final = base_path
        if wtype != base:
            final = _temp_path(directory, base_name, wtype)
            temps.append(final)
            _quantize(base_path, final, wtype)
        os.replace(final, out_path)
    except OSError as e:
        raise SynthError(f"{out_path}: cannot write ({e.strerror or e})") from None
    finally:
        for t in temps:
            if os.path.exists(t):
                os.remove(t)
    return out_path


def default_fixture(wtype: str = "f32", preset: str = "tiny", seed: int = 0,
                    cache_dir: str | os.PathLike | None = None, tied: bool | None = None) -> str:
    """Path of a cached fixture ``{cache_dir}/{preset}-{wtype}-s{seed}[-tied].gguf``, written if
    missing. ``cache_dir`` defaults to ``build/fixtures`` under the current working directory."""
    _check_choice("preset", preset, PRESETS)
    _check_choice("weight type", wtype, WEIGHT_TYPES)
    tied = PRESETS[preset].tied if tied is None else bool(tied)
    directory = os.fspath(cache_dir) if cache_dir is not None else os.path.join("build", "fixtures")
    name = f"{preset}-{wtype}-s{seed}{'-tied' if tied else ''}.gguf"
    path = os.path.abspath(os.path.join(directory, name))
    if not os.path.isfile(path):
        write_synthetic(path, preset=preset, wtype=wtype, seed=seed, tied=tied)
    return path
