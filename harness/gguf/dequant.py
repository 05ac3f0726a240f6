"""GGUF block-format dequantization in torch, bit-exact against ``gguf.quants.dequantize``.

``dequantize(raw, qtype, shape)`` turns a tensor's raw bytes (a uint8 torch tensor on any device) into
a float32 tensor of ``shape`` (numpy/torch order) on the same device, so weights can be expanded on
the GPU that will use them. Each block decoder mirrors the numpy reference in gguf/quants.py
operation for operation: f16 scales are widened to f32 first (exact), every product and sum is a
separate float32 op in the same order (no fused multiply-add), and integer codes are formed
exactly (small integers, exactly representable), so results match bit for bit. Big tensors are
decoded in chunks of blocks to bound the intermediate memory. One known non-difference: an F16
*signalling* NaN comes back as a quiet NaN (numpy keeps the payload); NaN either way.

Types not listed in :data:`SUPPORTED` raise ``NotImplementedError`` (callers fall back to numpy).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

# output elements decoded per chunk, by device type: cache-sized on the CPU (measured fastest),
# 64 MiB of float32 elsewhere (few kernel launches per tensor on a GPU)
CHUNK_ELEMENTS = {"cpu": 1 << 18, "other": 1 << 24}


def _f16(b: torch.Tensor, off: int) -> torch.Tensor:
    """The f16 at byte ``off`` of every block, widened to f32: (n, 1)."""
    return b[:, off:off + 2].contiguous().view(torch.float16).float()


def _bits(x: torch.Tensor, shifts, mask: int) -> torch.Tensor:
    """(x >> s) & mask for each shift s: uint8 (..., L) -> (..., len(shifts), L)."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=x.device).view(-1, 1)
    return (x.unsqueeze(-2) >> s) & mask


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Low nibbles then high nibbles of each run of ``group`` bytes: (n, G*group) -> (n, 2*G*group)."""
    n = qs.shape[0]
    return _bits(qs.reshape(n, -1, group), (0, 4), 0x0F).reshape(n, -1)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """Bit i of the little-endian bytes ``qh`` (n, k) as element i: (n, 8k) uint8 0/1."""
    return _bits(qh, range(8), 1).transpose(-1, -2).reshape(qh.shape[0], -1)


# --- 32-element blocks ---------------------------------------------------------------------------

def _q4_0(b):
    q = _nibbles(b[:, 2:], 16).to(torch.int16) - 8
    return _f16(b, 0) * q.float()


def _q4_1(b):
    q = _nibbles(b[:, 4:], 16).float()
    return (_f16(b, 0) * q) + _f16(b, 2)


def _q5(b, off: int) -> torch.Tensor:
    return _nibbles(b[:, off + 4:], 16) | (_high_bits(b[:, off:off + 4]) << 4)


def _q5_0(b):
    q = _q5(b, 2).to(torch.int16) - 16
    return _f16(b, 0) * q.float()


def _q5_1(b):
    return (_f16(b, 0) * _q5(b, 4).float()) + _f16(b, 2)


def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


# --- 256-element K-quant super-blocks -----------------------------------------------------------

def _q2_k(b):
    n, sc = b.shape[0], b[:, :16]
    dl = (_f16(b, 80) * (sc & 0xF).float()).view(n, 16, 1)
    ml = (_f16(b, 82) * (sc >> 4).float()).view(n, 16, 1)
    q = _bits(b[:, 16:80].reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, 256)


def _q3_k_scales(s: torch.Tensor) -> torch.Tensor:
    n = s.shape[0]
    lo = _bits(s[:, :8], (0, 4), 0x0F).reshape(n, 16)
    hi = _bits(s[:, 8:12], (0, 2, 4, 6), 0x03).reshape(n, 16)
    return ((lo | (hi << 4)).to(torch.int16) - 32).float()


def _q3_k(b):
    n = b.shape[0]
    dl = (_f16(b, 108) * _q3_k_scales(b[:, 96:108])).view(n, 16, 1)
    ql = _bits(b[:, 32:96].reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16)
    qh = _bits(b[:, :32].reshape(n, 1, 32), range(8), 1).reshape(n, 16, 16)
    q = (ql.to(torch.int16) - ((qh ^ 1).to(torch.int16) << 2)).float()
    return (dl * q).reshape(n, 256)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes (get_scale_min_k4): two (n, 8) uint8."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k4_dm(b):
    """Per-sub-block scale and min of Q4_K/Q5_K: two (n, 8, 1) float32."""
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).view(n, 8, 1)
    dm = (_f16(b, 2) * mn.float()).view(n, 8, 1)
    return d, dm


def _q4_k(b):
    n = b.shape[0]
    d, dm = _k4_dm(b)
    q = _nibbles(b[:, 16:], 32).view(n, 8, 32).float()
    return (d * q - dm).reshape(n, 256)


def _q5_k(b):
    n = b.shape[0]
    d, dm = _k4_dm(b)
    ql = _nibbles(b[:, 48:], 32).view(n, 8, 32)
    qh = _bits(b[:, 16:48], range(8), 1)  # (n, 8, 32): sub-block j takes bit j
    q = (ql | (qh << 4)).float()
    return (d * q - dm).reshape(n, 256)


def _q6_k(b):
    n = b.shape[0]
    d = (_f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()).view(n, 16, 1)
    ql = _nibbles(b[:, :128], 64).view(n, 8, 32)
    qh = _bits(b[:, 128:192].reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int16) - 32).view(n, 16, 16).float()
    return (d * q).reshape(n, 256)


_BLOCK: dict[Q, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q8_0: _q8_0,
    Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k,
}
_PLAIN = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
SUPPORTED = frozenset(_PLAIN) | frozenset(_BLOCK)


def _blocks(raw: torch.Tensor, qtype: Q) -> torch.Tensor:
    """Decode every block of ``raw`` in chunks into one (n_blocks, block_size) float32 tensor."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    b = raw.view(-1, type_size)
    n = b.shape[0]
    chunk = CHUNK_ELEMENTS.get(raw.device.type, CHUNK_ELEMENTS["other"])
    step = max(1, chunk // block_size)
    if n <= step:
        return _BLOCK[qtype](b)
    out = torch.empty((n, block_size), dtype=torch.float32, device=raw.device)
    for i in range(0, n, step):
        out[i:i + step] = _BLOCK[qtype](b[i:i + step])
    return out


def dequantize(raw: torch.Tensor, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF bytes (uint8, any device) of a ``qtype`` tensor -> new float32 tensor of ``shape``."""
    qtype = Q(qtype)
    if qtype not in SUPPORTED:
        raise NotImplementedError(f"torch dequantization of {qtype.name} is not implemented")
    if raw.dtype != torch.uint8:
        raise TypeError(f"raw bytes must be a uint8 tensor, got {raw.dtype}")
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if shape and shape[-1] % block_size:
        raise ValueError(f"row size {shape[-1]} is not a multiple of the {qtype.name} block size {block_size}")
    want = numel // block_size * type_size
    if raw.numel() != want:
        raise ValueError(f"{qtype.name} tensor of shape {list(shape)} needs {want} bytes, got {raw.numel()}")
    raw = raw.contiguous().view(-1)
    if qtype in _PLAIN:
        out = raw.view(_PLAIN[qtype]).to(torch.float32, copy=True)  # fresh even for F32
    else:
        out = _blocks(raw, qtype)
    return out.reshape(shape)


# --- scale * q - offset form (for mirroring kernels that keep the offset term apart) ------------

def _parts_4_0(b):
    return _nibbles(b[:, 2:], 16).float(), _f16(b, 0), 8.0 * _f16(b, 0)


def _parts_5_0(b):
    return _q5(b, 2).float(), _f16(b, 0), 16.0 * _f16(b, 0)


def _parts_k4(b, q):
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    return q.reshape(n, 256), _f16(b, 0) * sc.float(), _f16(b, 2) * mn.float()


def _parts_q4_k(b):
    return _parts_k4(b, _nibbles(b[:, 16:], 32).float())


def _parts_q5_k(b):
    n = b.shape[0]
    ql = _nibbles(b[:, 48:], 32).view(n, 8, 32)
    return _parts_k4(b, (ql | (_bits(b[:, 16:48], range(8), 1) << 4)).float())


_PARTS = {Q.Q4_0: _parts_4_0, Q.Q5_0: _parts_5_0, Q.Q4_K: _parts_q4_k, Q.Q5_K: _parts_q5_k}
OFFSET_TYPES = frozenset(_PARTS)


def offset_parts(raw: torch.Tensor, qtype: Q, shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """A Q4_0/Q5_0/Q4_K/Q5_K matrix as ``scale * q - offset`` per 32-element sub-block: ``q`` (shape,
    float32 holding the unsigned codes), ``scale`` and ``offset`` (rows, cols // 32, float32).
    Expanded over the sub-blocks, ``scale * q - offset`` equals :func:`dequantize` bit for bit
    (every product and difference is exact). llama.cpp's CUDA kernels apply the offset to a sum of
    the activations rather than element by element (harness.ours.numerics)."""
    qtype = Q(qtype)
    if qtype not in _PARTS:
        raise NotImplementedError(f"no scale/offset form for {qtype.name}")
    rows, cols = (math.prod(shape[:-1]), shape[-1]) if shape else (1, 1)
    b = raw.contiguous().view(-1, GGML_QUANT_SIZES[qtype][1])
    q, scale, offset = _PARTS[qtype](b)
    return q.reshape(shape), scale.reshape(rows, cols // 32), offset.reshape(rows, cols // 32)
