"""The model in PyTorch (qwen2, qwen3; what differs by architecture comes from its
:class:`~harness.gguf.arch.ArchSpec`), one small class per block, a hook point at every site of
harness.sites that the architecture has.

Weights are used exactly as the GGUF stores them (torch layout = reversed ggml ``ne``): nothing
is fused or permuted, so every activation lines up element by element with llama.cpp's.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from harness.gguf.load import GGUFError, GGUFModel, LazyWeight, ModelConfig, load_gguf
from harness.ours import cuda_q8_1
from harness.ours.hooks import Hook, HookManager, HookPoint, site_matcher
from harness.ours.numerics import (act_rounder, cuda_kqv, cuda_matmul, cuda_one_token_vec, fast_rope_cos_sin,
                                   fast_rope_status, kv_cells, mmvf_kernel_status)
from harness.provenance import machine_provenance
from harness.sites import LAYER_KEYS, SiteFilter, site_name
from harness.trace import Sink, Trace


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * weight if weight is not None else y


def rope_scale(half: int, base: float) -> torch.Tensor:
    """ggml's theta_scale = base^(-2/Dh), computed in float32 as llama.cpp does (a CPU scalar)."""
    f32 = torch.float32
    return torch.tensor(base, dtype=f32) ** torch.tensor(-2.0 / (2 * half), dtype=f32)


def rope_angles(pos: torch.Tensor, half: int, base: float, mirror: str | None = None,
                scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rotation angles (T, Dh/2): pos * base^(-2j/Dh). Exact (float64) unless ``mirror`` names a
    llama.cpp backend, whose float32 arithmetic is then reproduced: the CPU cache multiplies
    theta by theta_scale once per pair (ggml_rope_cache_init); CUDA computes
    pos * powf(theta_scale, j). At position 2048 the two differ from exact by ~1e-4 rad.
    ``scale`` is :func:`rope_scale` already on ``pos``'s device (saves a host->device copy)."""
    if mirror is None:
        theta = base ** (-torch.arange(half, dtype=torch.float64, device=pos.device) * 2 / (2 * half))
        return pos.to(torch.float64)[:, None] * theta[None, :]
    f32 = torch.float32
    scale = (rope_scale(half, base) if scale is None else scale).to(pos.device)
    p = pos.to(f32)
    if mirror == "cuda":
        j = torch.arange(half, dtype=f32, device=pos.device)
        return p[:, None] * scale ** j[None, :]
    out, theta = [], p
    for _ in range(half):
        out.append(theta)
        theta = theta * scale
    return torch.stack(out, dim=-1)


def rope_tables(pos: torch.Tensor, half: int, base: float, mirror: str | None = None,
                dtype: torch.dtype = torch.float32, scale: torch.Tensor | None = None):
    """What :func:`rope_neox` multiplies by, each (T, 1, Dh) in ``dtype``: [cos, cos] and
    [-sin, sin] of :func:`rope_angles`; with ``mirror`` "cuda" on a CUDA device, of ggml-cuda's
    fast-math cos/sin of them (:func:`~harness.ours.numerics.fast_rope_cos_sin`)."""
    fast = fast_rope_cos_sin(pos, rope_scale(half, base) if scale is None else scale, half) \
        if mirror == "cuda" else None                                      # llama.cpp's fast math
    if fast is None:
        ang = rope_angles(pos, half, base, mirror, scale)                  # (T, Dh/2)
        fast = ang.cos(), ang.sin()
    cos, sin = fast[0].to(dtype)[:, None, :], fast[1].to(dtype)[:, None, :]
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def rope_neox(x: torch.Tensor, pos: torch.Tensor, base: float, mirror: str | None = None,
              tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """RoPE with NEOX pairing (dim j rotates with j + Dh/2), as llama.cpp does for qwen2.
    x: (T, nh, Dh), pos: (T,). Applied in x's dtype. ``tables``: :func:`rope_tables` of these
    positions, when the caller has them (the model computes them once per step).
    Elementwise [x1 cos - x2 sin, x2 cos + x1 sin], in 4 ops instead of 7 (a - b == a + -b)."""
    half = x.shape[-1] // 2
    if tables is None or tables[0].dtype != x.dtype:
        tables = rope_tables(pos, half, base, mirror, x.dtype)
    cos, sin = tables                                                      # (T, 1, Dh)
    return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * sin


ROPE = {"neox": rope_neox}        # ArchSpec.rope -> implementation (NORM pairing: not needed yet)


class MatMul:
    """x @ W^T, optionally rounding x first the way llama.cpp's CPU kernels do (harness.ours.numerics).
    ``weight`` is a float tensor, or a :class:`~harness.gguf.load.LazyWeight` expanded on use."""

    def __init__(self, weight: "torch.Tensor | LazyWeight", rounder=None, kernel=None):
        self.source, self.rounder, self.kernel = weight, rounder, kernel    # kernel(x, W): CUDA mirror
        self.lazy = isinstance(weight, LazyWeight)
        self.weight_t = None if self.lazy else weight.T                        # the view, made once

    @property
    def weight(self) -> torch.Tensor:
        return self.source.expand() if self.lazy else self.source

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x, self.weight)
        wt = self.weight.T if self.lazy else self.weight_t
        return (self.rounder(x) if self.rounder is not None else x) @ wt


class KVCache:
    """Per-layer cached K/V after RoPE, (P, Hkv, Dh). ``store_dtype`` float16 mirrors llama.cpp's
    default F16 cache (values are rounded to it, computation stays in the model dtype)."""

    def __init__(self, n_layer: int, store_dtype: torch.dtype | None = None):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.store_dtype = store_dtype

    def rounded(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` rounded to the cache's store dtype (llama.cpp's F16 operands), in ``t``'s dtype."""
        return t.to(self.store_dtype).to(t.dtype) if self.store_dtype is not None else t

    def reround(self, t: torch.Tensor) -> torch.Tensor:
        """``rounded`` of what :meth:`update` returned: skipped where rounding again provably
        changes nothing (the model dtype holds every value of the store dtype exactly)."""
        exact = self.store_dtype in (None, t.dtype) or t.dtype in (torch.float32, torch.float64)
        return t if exact else self.rounded(t)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.rounded(k), self.rounded(v)
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k]), torch.cat([self.v[layer], v])
        self.k[layer], self.v[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, w: dict, mm: dict, i: int, hp, mirror: str | None = None):
        super().__init__()
        self.cfg, self.i, self.hp, self.mirror = cfg, i, hp, mirror
        p, bias = f"blk.{i}.", cfg.spec.qkv_bias
        self.mq, self.bq = mm[p + "attn_q.weight"], w[p + "attn_q.bias"] if bias else None
        self.mk, self.bk = mm[p + "attn_k.weight"], w[p + "attn_k.bias"] if bias else None
        self.mv, self.bv = mm[p + "attn_v.weight"], w[p + "attn_v.bias"] if bias else None
        self.mo = mm[p + "attn_output.weight"]
        self.rope = ROPE[cfg.spec.rope]
        qk = cfg.spec.qk_norm                # per-head RMSNorm of q and k before RoPE (qwen3)
        self.q_norm_w, self.k_norm_w = (w[p + "attn_q_norm.weight"], w[p + "attn_k_norm.weight"]) if qk else (None, None)

    def _qkv(self, x, name, mat, bias, nh):
        T, Dh = x.shape[0], self.cfg.head_dim
        proj = self.hp[f"{name}_proj"](mat(x).view(T, nh, Dh), x=x, weight=mat.weight)  # (T, nh, Dh)
        if bias is None:
            return proj
        return self.hp[name](proj + bias.view(nh, Dh), x=proj, bias=bias)

    def _head_norm(self, name: str, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        if weight is None:
            return x
        eps = self.cfg.rms_eps
        return self.hp[name](rms_norm(x, weight, eps), x=x, weight=weight, eps=eps)   # over Dh, per head

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: KVCache, mask: torch.Tensor, rope: tuple):
        cfg, hp, T = self.cfg, self.hp, x.shape[0]
        H, Hkv = cfg.n_head, cfg.n_head_kv
        q = self._head_norm("q_norm", self._qkv(x, "q", self.mq, self.bq, H), self.q_norm_w)   # (T, H, Dh)
        k = self._head_norm("k_norm", self._qkv(x, "k", self.mk, self.bk, Hkv), self.k_norm_w)  # (T, Hkv, Dh)
        v = self._qkv(x, "v", self.mv, self.bv, Hkv)                           # (T, Hkv, Dh)
        m, base = self.mirror, cfg.rope_base
        q = hp["q_rope"](self.rope(q, pos, base, m, rope), x=q, pos=pos, base=base, mirror=m)
        k = hp["k_rope"](self.rope(k, pos, base, m, rope), x=k, pos=pos, base=base, mirror=m)
        K, V = cache.update(self.i, k, v)                                      # (P, Hkv, Dh)
        rk, rv = cache.reround(K), cache.reround(V)                      # F16 cache: llama.cpp's dot operands
        # q meets an F16 K as F16 too (CPU vec_dot_f16; CUDA mul_mat_f / cuBLAS convert it), except
        # CUDA's one-token mul_mat_vec_f at llama.cpp's GGML_PREC_F32 for kq: float q, float sums
        # (taken up to 512 cells of n_kv, or with one KV head: 32k-token runs flagged kq without that)
        vec = m == "cuda" and T == 1 and cuda_one_token_vec(kv_cells(K.shape[0]), Hkv)
        rq = q if vec else cache.rounded(q)
        g = H // Hkv
        kq = torch.einsum("thd,phd->htp", rq, rk.repeat_interleave(g, dim=1))  # (H, T, P)
        kq = hp["kq"](kq, q=q, k=K, group=g)
        scale = cfg.head_dim ** -0.5
        w = hp["attn_weights"](torch.softmax(kq * scale + mask, dim=-1), kq=kq, mask=mask, scale=scale)
        if m == "cuda" and cache.store_dtype == torch.float16:                # ggml-cuda's kernels by T
            kqv = cuda_kqv(w, rv, g)
        else:
            kqv = torch.einsum("htp,phd->thd", cache.rounded(w), rv.repeat_interleave(g, dim=1))
        kqv = hp["kqv"](kqv, weights=w, v=V, group=g)                          # (T, H, Dh)
        flat = kqv.reshape(T, H * cfg.head_dim)
        return hp["attn_out"](self.mo(flat), x=flat, weight=self.mo.weight)  # (T, D)


class FeedForward(nn.Module):
    def __init__(self, mm: dict, i: int, hp):
        super().__init__()
        p, self.hp = f"blk.{i}.", hp
        self.gate, self.up, self.down = (mm[p + f"ffn_{n}.weight"] for n in ("gate", "up", "down"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:                      # x (T, D)
        hp = self.hp
        gate = hp["ffn_gate"](self.gate(x), x=x, weight=self.gate.weight)    # (T, F)
        up = hp["ffn_up"](self.up(x), x=x, weight=self.up.weight)            # (T, F)
        act = hp["ffn_act"](F.silu(gate) * up, gate=gate, up=up)             # (T, F)
        return hp["ffn_out"](self.down(act), x=act, weight=self.down.weight)  # (T, D)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, w: dict, mm: dict, i: int, manager: HookManager,
                 mirror: str | None = None):
        super().__init__()
        self.hp = nn.ModuleDict({k: HookPoint(site_name(k, i), i, manager) for k in LAYER_KEYS
                                 if k in cfg.spec.sites})
        p, self.eps = f"blk.{i}.", cfg.rms_eps
        self.attn_norm_w, self.ffn_norm_w = w[p + "attn_norm.weight"], w[p + "ffn_norm.weight"]
        self.attn = Attention(cfg, w, mm, i, self.hp, mirror)
        self.ffn = FeedForward(mm, i, self.hp)

    def forward(self, x, pos, cache, mask, rope):                             # x (T, D)
        hp = self.hp
        h = hp["attn_norm"](rms_norm(x, self.attn_norm_w, self.eps), x=x, weight=self.attn_norm_w, eps=self.eps)
        a = self.attn(h, pos, cache, mask, rope)
        r = hp["ffn_inp"](x + a, a=x, b=a)
        h = hp["ffn_norm"](rms_norm(r, self.ffn_norm_w, self.eps), x=r, weight=self.ffn_norm_w, eps=self.eps)
        f = self.ffn(h)
        return hp["l_out"](r + f, a=r, b=f)


class Model(nn.Module):
    def __init__(self, gm: GGUFModel, kv_dtype: torch.dtype | None = None, mirror: str | None = None):
        """``kv_dtype`` float16 mirrors llama.cpp's F16 KV cache; ``mirror`` ("cpu" or "cuda")
        rounds matmul activations as that llama.cpp backend's kernels do (see harness.ours.numerics)."""
        super().__init__()
        self.gguf, self.config = gm, gm.config
        w, cfg = gm.weights, gm.config
        if cfg.spec.rope not in ROPE:
            raise GGUFError(f"{gm.path}: architecture {cfg.architecture!r} needs {cfg.spec.rope} RoPE, "
                            "which our model does not implement yet")
        self.manager = HookManager(self)
        self.kv_dtype, self.mirror = kv_dtype, mirror
        mm = {n: self._matmul(n, t, mirror) for n, t in w.items() if t.dim() == 2}
        self.embd, self.norm_w = mm["token_embd.weight"], w["output_norm.weight"]
        self.out = mm["token_embd.weight"] if gm.tied else mm["output.weight"]
        self.blocks = nn.ModuleList(Block(cfg, w, mm, i, self.manager, mirror) for i in range(cfg.n_layer))
        self.hp = nn.ModuleDict({k: HookPoint(k, None, self.manager) for k in ("embd", "output_norm", "logits")})
        # ggml's float32 theta_scale on our device once, not a host->device copy per RoPE
        self.rope_scale = rope_scale(cfg.head_dim // 2, cfg.rope_base).to(self.device) if mirror else None

    def _matmul(self, name: str, t, mirror: str | None) -> MatMul:
        """x @ W^T for weight ``name``, with the arithmetic of ``mirror``'s kernels where known:
        the CPU's activation rounding, or the CUDA kernel itself (harness.ours.numerics)."""
        wt = self.gguf.types.get(name)
        if mirror == "cuda":
            return MatMul(t, kernel=cuda_matmul(wt, lambda: self.gguf.raw(name), tuple(t.shape),
                                                keep=not isinstance(t, LazyWeight)))
        return MatMul(t, act_rounder(wt) if mirror == "cpu" else None)

    @property
    def device(self) -> torch.device:
        return self.norm_w.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm_w.dtype

    def forward(self, tokens: torch.Tensor, pos0: int, cache: KVCache) -> torch.Tensor:
        """One step: tokens (T,) at positions pos0..pos0+T-1 -> logits (T, V)."""
        for out in self.stages(tokens, pos0, cache):
            pass
        return out

    def stages(self, tokens: torch.Tensor, pos0: int, cache: KVCache):
        """:meth:`forward` one stage per ``next``: the embedding (stage 0), block i (stage i + 1),
        each yielding None, then the output norm and logits (stage n_layer + 1), yielding the
        logits. A caller can interleave other work between stages (harness.stream runs each
        layer as soon as llama.cpp has computed it)."""
        cfg, T, P = self.config, tokens.shape[0], pos0 + tokens.shape[0]
        pos = torch.arange(pos0, P, device=self.device)
        mask = torch.full((T, P), float("-inf"), device=self.device, dtype=self.dtype) \
            .triu(pos0 + 1)                                                       # causal (T, P)
        rope = rope_tables(pos, cfg.head_dim // 2, cfg.rope_base, self.mirror, self.dtype,
                           self.rope_scale)                                       # 2 x (T, 1, Dh)
        we = self.embd.weight
        x = self.hp["embd"](F.embedding(tokens, we), tokens=tokens, weight=we)   # (T, D)
        yield None
        for block in self.blocks:
            x = block(x, pos, cache, mask, rope)
            yield None
        h = self.hp["output_norm"](rms_norm(x, self.norm_w, self.config.rms_eps), x=x, weight=self.norm_w,
                                   eps=self.config.rms_eps)
        yield self.hp["logits"](self.out(h), x=h, weight=self.out.weight)   # (T, V)

    @contextlib.contextmanager
    def hooks(self, hooks: Iterable[tuple[str, Hook]] = (), recorder=None, anchor=None):
        """Install ``(pattern, fn)`` hooks (and optionally a recorder/anchor) for the block's duration."""
        m = self.manager
        saved = (m.hooks, m.recorder, m.anchor)
        m.install(saved[0] + [(site_matcher(p), fn) for p, fn in hooks], recorder or saved[1], anchor or saved[2])
        try:
            yield self
        finally:
            m.install(*saved)

    def new_cache(self) -> KVCache:
        """An empty KV cache for :meth:`feed` (the store dtype mirrors llama.cpp's cache)."""
        return KVCache(self.config.n_layer, self.kv_dtype)

    @torch.no_grad()
    def feed(self, cache: KVCache, tokens: torch.Tensor, pos0: int, step: int) -> torch.Tensor:
        """One llama_decode's worth of work: ``tokens`` (T,) at positions pos0.. of ``step`` on
        ``cache``, which keeps them. A prefill may come in several micro-batches at increasing
        positions: each attends to the cache so far plus itself (causal), as llama.cpp's ubatches
        do. Hooks see ``ctx.step`` = step and ``ctx.pos`` = pos0. Returns the logits (T, V)."""
        self.manager.step, self.manager.pos = step, pos0
        return self(tokens, pos0, cache)

    @torch.no_grad()
    def run(self, prompt: list[int], steps: int = 0, decode_tokens: list[int] | None = None,
            keep_logits: bool = True) -> list[torch.Tensor]:
        """Prefill then ``steps`` decode steps, teacher-forced on ``decode_tokens`` (greedy where not
        given). Returns each step's logits (T, V) as float32 on the model's device (none unless
        ``keep_logits``); ``self.last_tokens`` holds every token fed."""
        cfg = self.config
        if not prompt:
            raise ValueError("empty prompt")
        bad = [t for t in list(prompt) + list(decode_tokens or []) if not 0 <= t < cfg.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range (vocabulary has {cfg.n_vocab} tokens)")
        cache, tokens, out = self.new_cache(), list(prompt), []
        forced = list(decode_tokens or [])[:steps]
        ids = torch.tensor(tokens + forced, device=self.device)   # one upload, not one per step
        feed = ids[:len(tokens)]
        for step in range(steps + 1):
            logits = self.feed(cache, feed, len(tokens) - feed.shape[0], step)
            if keep_logits:
                out.append(logits.float())
            if step < len(forced):
                tokens.append(forced[step])
                feed = ids[len(tokens) - 1:len(tokens)]
            elif step < steps:                                         # greedy
                feed = logits[-1].argmax().view(1)
                tokens.append(int(feed))
        self.last_tokens = tokens
        return out

    def run_with_cache(self, prompt: list[int], steps: int = 0, decode_tokens: list[int] | None = None,
                       filt: SiteFilter | None = None, sink: Sink | None = None,
                       anchor: Trace | None = None, to_cpu: bool = True) -> Trace:
        """Run and capture every site passing ``filt`` (float32, CPU) into a Trace, or into ``sink``.
        With ``anchor``, each site's value is replaced by the anchor trace's after it is recorded,
        so every op runs on the anchor's inputs (the recorded values are then *local* outputs).
        ``to_cpu=False`` hands the sink float32 tensors where they were computed (GPU path)."""
        trace = Trace(self.config.n_layer, meta=self.describe())
        keep = sink or trace

        def recorder(step, name, x):
            if filt is None or filt.wants(step, name):
                y = (x.detach() if x.requires_grad else x).float()  # we never write in place: no copy
                keep(step, name, y.cpu() if to_cpu else y)

        def anchor_fn(step, name):
            return anchor.tensors.get((step, name))

        with self.hooks(recorder=recorder, anchor=anchor_fn if anchor is not None else None):
            self.run(prompt, steps, decode_tokens, keep_logits=False)
        trace.tokens, trace.n_prompt = self.last_tokens, len(prompt)
        return trace

    def describe(self) -> dict:
        return {"source": "torch", "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "kv_dtype": str(self.kv_dtype).replace("torch.", "") if self.kv_dtype else None,
                "mirror": self.mirror,
                **({"rope_fast_math": fast_rope_status(), "mmvf_kernel": mmvf_kernel_status(),
                    "q8_1_kernel": cuda_q8_1.status()}
                   if self.mirror == "cuda" else {}),
                "weight_type": self.gguf.weight_type, "gguf": os.path.basename(self.gguf.path),
                "architecture": self.config.architecture, "file_type": self.gguf.file_type,
                "type_mix": self.gguf.type_mix(),
                "machine": machine_provenance(self.device)}


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model(path, device: str = "cpu", dtype: str | torch.dtype = "float32",
               kv_dtype: torch.dtype | None = None, mirror: str | None = None,
               torch_dequant: bool | None = None, lazy_weights: bool = False) -> Model:
    """Our model built from a GGUF (see harness.gguf.load for the errors it raises).
    ``torch_dequant`` (default: on for CUDA) dequantizes the weights on ``device``;
    ``lazy_weights`` keeps the matrices quantized there and expands one at a time when used."""
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if torch_dequant is None:
        torch_dequant = str(device).startswith("cuda")
    gm = load_gguf(path, device=device, dtype=dt, torch_dequant=torch_dequant, lazy=lazy_weights)
    return Model(gm, kv_dtype=kv_dtype, mirror=mirror)
