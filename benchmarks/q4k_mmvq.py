"""python benchmarks/q4k_mmvq.py [ROWS]   (CPU; default 2048 rows of 5120, the 32B-shaped ffn_gate's width)

ggml-cuda's one-token Q4_K dot (mul_mat_vec_q, vec_dot_q4_K_q8_1, 4 warps, FMA contraction)
emulated in float32 on drawn and on quantizer-made blocks, against our mirror (float32 matmul of
the dequantized weight with the Q8_1-rounded activation): the systematic slope statistic of the pair.
Both sides here quantize the activation with an IEEE division; llama.cpp's quantize_q8_1 divides with
fast math, which at a near-tie gives another code: that, not this dot, was the 32B row's flag (twelfth
session, RESULTS.md; harness/ours/cuda_q8_1.py)."""
import sys, ctypes; sys.path.insert(0, '.')
import numpy as np, torch
from harness.synth_kquant import random_blocks
from harness.synth import ggml_base
from harness.gguf.dequant import dequantize
from harness.compare import systematic as S
import gguf
f32 = np.float32

def fma(a, b, c):
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(f32)

def scale_min(sc12):          # (..., 12) uint8 -> sc (..., 8), m (..., 8)
    q = sc12.astype(np.int32)
    sc = np.empty(q.shape[:-1] + (8,), np.int32); m = np.empty_like(sc)
    for j in range(8):
        if j < 4:
            sc[..., j] = q[..., j] & 63; m[..., j] = q[..., j + 4] & 63
        else:
            sc[..., j] = (q[..., j + 4] & 0xF) | ((q[..., j - 4] >> 6) << 4)
            m[..., j] = (q[..., j + 4] >> 4) | ((q[..., j] >> 6) << 4)
    return sc, m

def q8_1(x):
    b = x.reshape(-1, 32)
    amax = np.abs(b).max(1, keepdims=True)
    d = (amax / f32(127)).astype(f32)
    v = b / d
    q = np.where(np.abs(v - np.trunc(v)) == 0.5, np.trunc(v) + np.sign(v), np.round(v)).astype(np.int32)
    dh = d.astype(np.float16).astype(f32)[:, 0]
    return q, dh                                     # (K/32, 32) int, (K/32,) float (half-rounded d)

def ggml_mmvq(blocks, x, fused_d=True):
    R, nb = blocks.shape[0], blocks.shape[1] // 144
    B = blocks.reshape(R, nb, 144)
    dm = B[..., 0:4].copy().view(np.float16).astype(f32)      # (R, nb, 2)
    sc, m = scale_min(B[..., 4:16])                          # (R, nb, 8)
    qs = B[..., 16:].astype(np.int32)                        # (R, nb, 128)
    q8, d8 = q8_1(x)                                         # (K/32, 32), (K/32,)
    tmp = np.zeros((R, 128), f32)
    for tid in range(128):
        iqs, g = 2 * (tid % 16), tid // 16
        j, k = iqs // 8, (iqs // 2) % 4
        pos = np.r_[4 * k:4 * k + 4, 16 + 4 * k:16 + 4 * k + 4]
        for kbx in range(g, nb, 8):
            sumf_d = np.zeros(R, f32); sumf_m = np.zeros(R, f32)
            for i in range(2):
                s = 2 * j + i                                # sub-block, and the q8_1 block index within
                nib = (qs[:, kbx, 32 * j + pos] >> (4 * i)) & 0xF  # (R, 8)
                qb = kbx * 8 + s
                u = q8[qb, pos]                              # (8,)
                dot1 = nib @ u; dot2 = int(u.sum())
                sumf_d = fma(np.full(R, d8[qb], f32), (dot1 * sc[:, kbx, s]).astype(f32), sumf_d)
                sumf_m = fma(np.full(R, d8[qb], f32), (dot2 * m[:, kbx, s]).astype(f32), sumf_m)
            prod_m = (dm[:, kbx, 1] * sumf_m).astype(f32)
            res = fma(dm[:, kbx, 0], sumf_d, -prod_m) if fused_d else (dm[:, kbx, 0] * sumf_d - prod_m).astype(f32)
            tmp[:, tid] = (tmp[:, tid] + res).astype(f32)
    w = tmp.reshape(R, 4, 32)
    acc = w[:, 0].copy()
    for l in (1, 2, 3):
        acc = (acc + w[:, l]).astype(f32)
    for off in (16, 8, 4, 2, 1):
        acc = (acc + acc[:, np.arange(32) ^ off]).astype(f32)
    return acc[:, 0]

def ours(blocks, x, shape):
    W = dequantize(torch.from_numpy(blocks.copy()), gguf.GGMLQuantizationType.Q4_K, shape).numpy()
    q8, d8 = q8_1(x)
    xq = (q8 * d8[:, None]).astype(f32).reshape(-1)
    return (W @ xq).astype(f32), (W.astype(np.float64) @ xq.astype(np.float64))

R, K = int(sys.argv[1]) if len(sys.argv) > 1 else 4096, 5120
rng = np.random.default_rng(0)
x = rng.standard_normal(K).astype(f32)
drawn = random_blocks(np.random.default_rng(1), "Q4_K", (R, K), 0.02)
lib = ggml_base()
src = (rng.standard_normal((R, K)) * 0.02).astype(f32)
made = np.empty(R * K // 256 * 144, np.uint8)
lib.ggml_quantize_chunk(12, src.ctypes.data, made.ctypes.data, 0, R, K, None)
made = made.reshape(R, -1)
for name, blk, fused in (("drawn", drawn, True), ("drawn, no FMA", drawn, False), ("quantizer", made, True)):
    ref = ggml_mmvq(blk, x, fused)
    o32, exact = ours(blk, x, (R, K))
    for label, o in (("our float32 matmul", o32), ("exact (float64)", exact.astype(f32))):
        v = S.sys_vector(torch.from_numpy(o.astype(np.float64)), torch.from_numpy(ref.astype(np.float64)), False).tolist()
        e = o.astype(np.float64) - ref
        print(f"{name:14s} {label:20s} beta {v[0]: .3e} z_slope {v[1]: .2f}  rms err / rms ref {np.sqrt((e**2).mean()/(ref.astype(np.float64)**2).mean()):.2e}")
