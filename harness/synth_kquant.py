"""Random k-quant blocks, valid as they are: a Q4_K_M-typed synthetic model without a quantizer.

llama.cpp's quantizer needs about 8 minutes on 16 cores for Qwen2.5-32B shapes (42 on 2), from a
34.8 GB Q8_0 base. :func:`random_blocks` instead draws each tensor's blocks directly in their
ggml layout (``ggml-common.h``), so a 20 GB Q4_K_M file is written at disk speed with no base:

- ``block_q4_K`` (144 bytes, 256 weights): f16 ``d`` and ``dmin``, 12 bytes of packed 6-bit scales
  and mins, 128 bytes of 4-bit quants; weight = d * scale * q - dmin * min. Random scale, min and
  quant bits, ``dmin = 7.5 d``: zero mean, std 258 d.
- ``block_q6_K`` (210 bytes): 128 bytes low and 64 high quant bits, 16 int8 scales, f16 ``d``;
  weight = d * scale * (q - 32). Random quant bits, scales in [-32, 32]: zero mean, std 347 d.

``d`` is set for a requested standard deviation. Both sides dequantize the same bytes by the same
formula, so such a file tests everything a quantizer-made one does except the quantizer itself.
"""
from __future__ import annotations

import numpy as np

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q6_K": 210}
_STD_PER_D = {"Q4_K": 258.3, "Q6_K": 346.6}      # a block's weight std in units of d (see above)


def random_blocks(rng: np.random.Generator, ttype: str, shape: tuple[int, ...], std: float) -> np.ndarray:
    """``ttype`` (Q4_K or Q6_K) bytes of a random tensor of ``shape`` (rows a multiple of 256),
    weights of mean 0 and standard deviation about ``std``, as (*shape[:-1], row bytes) uint8."""
    if shape[-1] % QK_K:
        raise ValueError(f"{ttype} needs rows of a multiple of {QK_K} weights, not {shape[-1]}")
    n = int(np.prod(shape)) // QK_K
    size = BLOCK_BYTES[ttype]
    blocks = np.frombuffer(bytearray(rng.bytes(n * size)), np.uint8).reshape(n, size)
    d = np.float16(std / _STD_PER_D[ttype])
    if ttype == "Q4_K":
        blocks[:, 0:4] = np.array([d, np.float16(7.5 * float(d))], np.float16).view(np.uint8)
    else:
        blocks[:, 192:208] = rng.integers(-32, 33, (n, 16), dtype=np.int8).view(np.uint8)
        blocks[:, 208:210] = np.array([d], np.float16).view(np.uint8)
    return blocks.reshape(*shape[:-1], shape[-1] // QK_K * size)
