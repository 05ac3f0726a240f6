"""The registered faults: each corrupts the PyTorch model at one site through the hook API, as
a real engine bug would.

The docstring of each hook function says which real-world engine mistake it models and where it
must be found. Each fault does only what the real bug does: a bug that lives in a kernel every
layer calls corrupts every layer (so it is found in layer 0), a prefill-only bug leaves decode
steps alone, a bug of an op only one architecture has exists only there (``architectures``:
the QKV-bias fault is qwen2's, the per-head Q/K norm and head-size faults are qwen3's), and so on. :func:`fault` lists each in :data:`BUILTIN`, from which
:mod:`harness.ours.inject` makes its ``REGISTRY`` of :class:`~harness.ours.inject.Fault` records
(this module does not import it: the expected locations take a ``RunInfo``, duck-typed);
``llamadiff faults`` lists them; ``llamadiff zoo MODEL.gguf`` injects each one and checks that it
is found where expected.
"""
from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from harness.ours.hooks import Hook
from harness.ours.model import rms_norm, rope_angles, rope_neox

if TYPE_CHECKING:
    from harness.ours.inject import RunInfo

# The keyword arguments of every fault's harness.ours.inject.Fault record, in order
BUILTIN: list[dict] = []

QKV_BIAS_ARCHS = ("qwen2",)        # architectures with the QKV bias sites q, k, v
QK_NORM_ARCHS = ("qwen3",)         # architectures with the per-head Q/K norm sites q_norm, k_norm
NO_BIAS_NOTE = "needs the QKV bias adds at q/k/v; qwen3 has no QKV biases"
NO_QK_NORM_NOTE = "needs the per-head Q/K norms at q_norm/k_norm; qwen2 has none"


def fault(name: str, pattern: str, expected: Callable, min_steps: int = 0, min_prompt: int = 1,
          where_doc: str = "", architectures: tuple[str, ...] | None = None, arch_note: str = ""):
    """Register ``fn`` as fault ``name`` installed at ``pattern``; ``architectures``: the only
    ones it exists in (None: every one), ``arch_note``: why (shown when it is skipped)."""
    def deco(fn: Hook) -> Hook:
        BUILTIN.append(dict(name=name, hooks=[(pattern, fn)], expected=expected, doc=(fn.__doc__ or "").strip(),
                            min_steps=min_steps, min_prompt=min_prompt, where_doc=where_doc,
                            architectures=architectures, arch_note=arch_note))
        return fn
    return deco


# -- helpers ----------------------------------------------------------------------------------
def _kv_heads(k: torch.Tensor, n_head: int) -> torch.Tensor:          # (P, Hkv, Dh) -> (P, H, Dh)
    return k.repeat_interleave(n_head // k.shape[1], dim=1)


def _kv_round(t: torch.Tensor, ctx) -> torch.Tensor:
    """Round like the model's F16 KV cache does for attention's dot operands (when it has one)."""
    dt = getattr(ctx.model, "kv_dtype", None)
    return t.to(dt).to(t.dtype) if dt is not None else t


def _cfg(ctx):
    return ctx.model.config


def _positional(site: str) -> Callable:
    """Location of a bug in a position-dependent op of every layer: position 0 is unaffected
    (RoPE by angle 0 is the identity; softmax over one cell is 1), so it shows at a prefill of
    >= 2 tokens, else at the first decode step (position 1), else never."""
    def where(run: RunInfo):
        if run.multi_token_prefill:
            return (0, 0, f"blk.0.{site}")
        return (1, 0, f"blk.0.{site}") if run.has_decode else None
    return where


def _decode_only(site: str) -> Callable:
    return lambda run: (1, 0, f"blk.0.{site}") if run.has_decode else None


# -- the original four ------------------------------------------------------------------------
@fault("drop_qkv_bias", "blk.*.q,blk.*.k,blk.*.v", lambda cfg: (0, 0, "blk.0.q"),
       where_doc="prefill, layer 0, blk.0.q (the bias add)", architectures=QKV_BIAS_ARCHS, arch_note=NO_BIAS_NOTE)
def drop_qkv_bias(x, ctx):
    """QKV biases switched off ("Qwen2.5 has no QKV biases"): q, k, v are the bare projections,
    so the -14..-34 bias outliers vanish. First wrong op: the bias add of q in layer 0."""
    return ctx.inputs["x"]


@fault("lm_head_transpose", "logits", lambda cfg: (0, None, "logits"), where_doc="prefill, logits")
def lm_head_transpose(x, ctx):
    """LM-head GEMM with the wrong transpose / leading dimension: the (V, D) row-major output
    matrix is read as if it were (D, V), so every logit is a dot product with scattered
    weights: garbage logits, some of them spikes that argmax picks."""
    w = ctx.inputs["weight"]                                              # (V, D)
    return ctx.inputs["x"] @ w.reshape(-1).view(w.shape[1], w.shape[0])   # (T, V)


@fault("kv_pos_stuck", "blk.*.attn_weights", _decode_only("attn_weights"), min_steps=1,
       where_doc="first decode step, layer 0, blk.0.attn_weights")
def kv_pos_stuck(x, ctx):
    """KV cache write position stuck at 0: each decode step overwrites cell 0 and attends over
    that one cell, so attention sees only the current token. Shows at the first decode step."""
    if ctx.step == 0:
        return None
    out = torch.zeros_like(x)
    out[..., -1] = 1.0
    return out


@fault("q_register", "blk.*.kq", lambda cfg: (0, 0, "blk.0.kq"), where_doc="prefill, layer 0, blk.0.kq")
def q_register(x, ctx):
    """Q vector loaded into per-thread registers in the attention kernel: only q[0] is valid,
    every thread uses its own register's copy of element 0, so the scores are q[0] * sum(k)."""
    q, k = ctx.inputs["q"], ctx.inputs["k"]                               # (T, H, Dh), (P, Hkv, Dh)
    bad = q[..., :1].expand_as(q)
    return torch.einsum("thd,phd->htp", bad, _kv_heads(k, q.shape[1]))


# -- layouts ----------------------------------------------------------------------------------
@fault("qkv_weight_transposed", "blk.*.q_proj", lambda cfg: (0, 0, "blk.0.q_proj"),
       where_doc="prefill, layer 0, blk.0.q_proj")
def qkv_weight_transposed(x, ctx):
    """Row-major vs column-major GEMM mistake in the Q projection: the kernel is told the
    (QD, D) row-major weight buffer is column-major, i.e. it reads the buffer as a (D, QD)
    matrix and computes x @ that instead of x @ Wq^T. Wq is square in Qwen2 (d_model == n_head *
    head_dim), so nothing fails on shapes: the result is x @ Wq (the weight transposed); in
    Qwen3 (n_head * 128 rows, d_model columns) the buffer is read with the wrong leading
    dimension. Every layer runs the same kernel: first wrong op is q_proj in layer 0 at prefill."""
    w = ctx.inputs["weight"]                                              # (QD, D) as stored
    out = ctx.inputs["x"] @ w.reshape(-1).view(w.shape[1], w.shape[0])   # (T, QD)
    return out.view(x.shape)


# -- RoPE -------------------------------------------------------------------------------------
def _rope_gptj(x: torch.Tensor, pos: torch.Tensor, base: float, mirror: str | None = None) -> torch.Tensor:
    """RoPE with the original (GPT-J / LLaMA "normal") pairing: dim 2i rotates with 2i + 1
    (same angles as the model's NEOX RoPE, see harness.ours.model.rope_angles)."""
    ang = rope_angles(pos, x.shape[-1] // 2, base, mirror)
    cos, sin = ang.cos().to(x.dtype)[:, None, :], ang.sin().to(x.dtype)[:, None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x2 * cos + x1 * sin
    return out


@fault("rope_interleaved", "blk.*.q_rope,blk.*.k_rope", _positional("q_rope"), min_prompt=2,
       where_doc="prefill, layer 0, blk.0.q_rope (needs a prompt of >= 2 tokens, else decode step 1)")
def rope_interleaved(x, ctx):
    """RoPE in interleaved (GPT-J / LLAMA_ROPE_TYPE_NORM) pairing instead of NEOX: the engine
    rotates dims (2i, 2i+1) together where qwen2 rotates (i, i + Dh/2) (the rope-type mistake
    of porting a model as "llama"). Position 0 is the identity either way, so it shows from the
    second prefill token on; q is roped before k: first wrong op is q_rope in layer 0."""
    return _rope_gptj(ctx.inputs["x"], ctx.inputs["pos"], ctx.inputs["base"], ctx.inputs.get("mirror"))


WRONG_ROPE_BASE = 10000.0


@fault("rope_base_wrong", "blk.*.q_rope,blk.*.k_rope",
       lambda run: _positional("q_rope")(run) if float(run.rope_base) != WRONG_ROPE_BASE else None,
       min_prompt=2, where_doc="prefill, layer 0, blk.0.q_rope (needs >= 2 prompt tokens)")
def rope_base_wrong(x, ctx):
    """Wrong RoPE base: the engine ignores the GGUF's rope.freq_base (1e6 for Qwen2.5) and uses
    LLaMA's hard-coded 10000, so every pair but the first rotates at the wrong frequency.
    Identity at position 0; first wrong op is q_rope in layer 0 from the second prefill token."""
    if float(ctx.inputs["base"]) == WRONG_ROPE_BASE:
        return None
    return rope_neox(ctx.inputs["x"], ctx.inputs["pos"], WRONG_ROPE_BASE, ctx.inputs.get("mirror"))


@fault("decode_pos_off_by_one", "blk.*.q_rope,blk.*.k_rope", _decode_only("q_rope"), min_steps=1,
       where_doc="first decode step, layer 0, blk.0.q_rope")
def decode_pos_off_by_one(x, ctx):
    """Off-by-one decode position: at decode steps the engine passes n_past + 1 (the position
    *after* the new token, e.g. the cache length after the write) to RoPE instead of n_past.
    The prefill is right; the first decode step ropes q (then k) at the wrong position."""
    if ctx.step == 0:
        return None
    return rope_neox(ctx.inputs["x"], ctx.inputs["pos"] + 1, ctx.inputs["base"], ctx.inputs.get("mirror"))


# -- attention --------------------------------------------------------------------------------
@fault("attn_no_scale", "blk.*.attn_weights", _positional("attn_weights"), min_prompt=2,
       where_doc="prefill, layer 0, blk.0.attn_weights (needs >= 2 attended positions)")
def attn_no_scale(x, ctx):
    """Missing 1/sqrt(head_dim) scale before the softmax (kq_scale forgotten, or 1.0 passed to
    ggml_soft_max_ext): scores 8x too sharp for head_dim 64 (11x for qwen3's 128). A softmax over one position is 1
    either way, so it shows where >= 2 positions are attended: prefill of >= 2 tokens, layer 0."""
    return torch.softmax(ctx.inputs["kq"] + ctx.inputs["mask"], dim=-1)


@fault("causal_mask_missing", "blk.*.attn_weights",
       lambda run: (0, 0, "blk.0.attn_weights") if run.multi_token_prefill else None, min_prompt=2,
       where_doc="prefill, layer 0, blk.0.attn_weights (needs a prompt of >= 2 tokens; never at decode)")
def causal_mask_missing(x, ctx):
    """Causal mask missing (mask tensor not passed to the softmax): prompt tokens attend to
    later prompt tokens. At decode (T = 1) every cached position is in the past, the mask is
    all zeros and the bug is invisible: it only shows at a prefill of >= 2 tokens, layer 0."""
    return torch.softmax(ctx.inputs["kq"] * ctx.inputs["scale"], dim=-1)


def _gqa_mod_differs(cfg) -> bool:
    g = cfg.n_head // cfg.n_head_kv
    return any(h % cfg.n_head_kv != h // g for h in range(cfg.n_head))


@fault("gqa_head_mod", "blk.*.kq,blk.*.kqv",
       lambda run: (0, 0, "blk.0.kq") if _gqa_mod_differs(run.cfg) else None,
       where_doc="prefill, layer 0, blk.0.kq (scores are computed before the value mix)")
def gqa_head_mod(x, ctx):
    """GQA head mapping ``h % n_kv`` instead of ``h // (n_head / n_kv)``: query head h reads the
    wrong KV head (heads 1 and 2 swap their KV head for 4 query / 2 KV heads), in the scores and
    in the value mix alike. Identical mappings (n_kv == 1 or n_kv == n_head) make it invisible.
    First wrong op: the scores kq in layer 0 at prefill."""
    H = _cfg(ctx).n_head
    if ctx.site.endswith(".kq"):
        q, k = _kv_round(ctx.inputs["q"], ctx), ctx.inputs["k"]            # (T, H, Dh), (P, Hkv, Dh)
        idx = torch.arange(H, device=k.device) % k.shape[1]
        return torch.einsum("thd,phd->htp", q, k[:, idx])
    w, v = _kv_round(ctx.inputs["weights"], ctx), _kv_round(ctx.inputs["v"], ctx)   # (H,T,P), (P,Hkv,Dh)
    idx = torch.arange(H, device=v.device) % v.shape[1]
    return torch.einsum("htp,phd->thd", w, v[:, idx])


F16_INF_AT = 65520.0          # smallest magnitude float16 rounds to inf (max finite is 65504)


def fp16_softmax_overflows(scaled: torch.Tensor) -> torch.Tensor:
    """Per softmax row of ``kq * scale + mask``: does sum(exp(s)), accumulated without first
    subtracting the row max, reach float16's inf? (float64 here, so only f16's range decides.)"""
    return scaled.double().exp().sum(-1, keepdim=True) >= F16_INF_AT


def _fp16_overflow_where(run: RunInfo):
    """First (step, layer) whose reference scores overflow the half-precision normalizer."""
    ref = run.ref
    if ref is None:
        raise ValueError("fp16_softmax_overflow: where it shows depends on the attention scores; "
                         "pass the reference trace (fault.where(cfg, ref=trace))")
    scale = run.cfg.head_dim ** -0.5
    for step in ref.steps():
        T, pos0 = len(ref.step_tokens(step)), ref.start_pos(step)
        for i in range(run.cfg.n_layer):
            kq = ref.tensors.get((step, f"blk.{i}.kq"))
            if kq is None:
                continue
            mask = torch.full((T, kq.shape[-1]), float("-inf")).triu(pos0 + 1)
            if bool(fp16_softmax_overflows(kq.double() * scale + mask).any()):
                return (step, i, f"blk.{i}.attn_weights")
    return None


@fault("fp16_softmax_overflow", "blk.*.attn_weights", _fp16_overflow_where,
       where_doc="first attention whose scaled scores exceed ~11 (float16's exp range): on the "
                 "tiny fixtures prefill, layer 1, blk.1.attn_weights")
def fp16_softmax_overflow(x, ctx):
    """Softmax normalizer accumulated in float16 without subtracting the row max (a "fast"
    half-precision softmax kernel). The q/k bias outliers give scaled scores of ~60 in layer 1
    and ~120 in layer 2 of the tiny fixtures (q.k of several hundred / sqrt(64)): e^60 is far
    beyond float16's 65504, the accumulator becomes inf and the weights inf/inf = NaN (or
    finite/inf = 0). Layer 0's scaled scores stay below ~5 (sum e^s < 1000 on short prompts),
    where the sum fits. The overflow is real (computed from the actual scores); only float16's
    *range* is emulated, not its rounding, so rows whose sum fits come out exactly as llama.cpp's
    f32 softmax (a rounding-only half-precision kernel would be a separate, precision fault,
    found in layer 0). Location: the first (step, layer) whose scores overflow, taken from the
    reference's kq (``where(..., ref=trace)``); prefill, layer 1 on the tiny fixtures."""
    s = ctx.inputs["kq"] * ctx.inputs["scale"] + ctx.inputs["mask"]
    over = fp16_softmax_overflows(s)
    if not bool(over.any()):
        return None
    e = s.double().exp()
    e16 = torch.where(e >= F16_INF_AT, torch.inf, e)                       # terms as float16 holds them
    bad = (e16 / torch.inf).to(x.dtype)                                   # inf/inf = NaN, finite/inf = 0
    return torch.where(over, bad, x)


# -- norms, FFN, residual ---------------------------------------------------------------------
NORM_SITES = "blk.*.attn_norm,blk.*.q_norm,blk.*.k_norm,blk.*.ffn_norm,output_norm"   # q/k_norm: qwen3


@fault("rmsnorm_no_weight", NORM_SITES, lambda cfg: (0, 0, "blk.0.attn_norm"),
       where_doc="prefill, layer 0, blk.0.attn_norm")
def rmsnorm_no_weight(x, ctx):
    """RMSNorm without its weight (the ggml_mul by attn_norm/ffn_norm/output_norm weight left
    out): every norm returns x / rms(x) (qwen3's per-head q/k norms too). The first norm is
    layer 0's attn_norm."""
    return rms_norm(ctx.inputs["x"], None, ctx.inputs["eps"])


WRONG_EPS = 1e-5


@fault("rmsnorm_eps", NORM_SITES,
       lambda run: (0, 0, "blk.0.attn_norm") if abs(run.rms_eps - WRONG_EPS) > 1e-9 else None,
       where_doc="prefill, layer 0, blk.0.attn_norm")
def rmsnorm_eps(x, ctx):
    """RMSNorm with LLaMA's epsilon 1e-5 hard-coded instead of the file's 1e-6. Visible because
    Qwen-like token embeddings are small (rms ~0.02, mean square ~4e-4): 1e-5 vs 1e-6 changes
    layer 0's normalized input by ~1%. Every norm uses it (qwen3's per-head q/k norms too):
    first wrong op is blk.0.attn_norm."""
    if abs(float(ctx.inputs["eps"]) - WRONG_EPS) <= 1e-9:
        return None
    return rms_norm(ctx.inputs["x"], ctx.inputs["weight"], WRONG_EPS)


@fault("swiglu_swapped", "blk.*.ffn_act", lambda cfg: (0, 0, "blk.0.ffn_act"),
       where_doc="prefill, layer 0, blk.0.ffn_act")
def swiglu_swapped(x, ctx):
    """SwiGLU with gate and up swapped (ffn_gate/ffn_up tensors mapped the wrong way round, or
    ggml_swiglu_split's operands exchanged): silu(up) * gate instead of silu(gate) * up."""
    return F.silu(ctx.inputs["up"]) * ctx.inputs["gate"]


@fault("residual_dropped_mid", "blk.*.ffn_inp", lambda cfg: (0, cfg.n_layer // 2, f"blk.{cfg.n_layer // 2}.ffn_inp"),
       where_doc="prefill, layer n_layer // 2, blk.{n_layer//2}.ffn_inp")
def residual_dropped_mid(x, ctx):
    """Attention residual connection dropped in one middle layer (layer n_layer // 2), e.g. a
    graph builder that reassigns ``inpSA`` before the add in one branch: ffn_inp = attn_out
    instead of layer input + attn_out. Only that layer: first wrong op is its ffn_inp."""
    if ctx.layer != _cfg(ctx).n_layer // 2:
        return None
    return ctx.inputs["b"]


# -- logits -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def padded_vocab_tail(path: str) -> int | None:
    """First id of the trailing run of UNUSED ([PAD]) tokens of a GGUF's vocabulary, or None."""
    from gguf import GGUFReader, TokenType
    f = GGUFReader(path, "r").fields.get("tokenizer.ggml.token_type")
    if f is None:
        return None
    types = [int(f.parts[i][0]) for i in f.data]
    start = len(types)
    while start > 0 and types[start - 1] == int(TokenType.UNUSED):
        start -= 1
    return start if start < len(types) else None


def _tail_where(run: RunInfo):
    if run.gguf is not None and padded_vocab_tail(os.fspath(run.gguf)) is None:
        return None
    return (0, None, "logits")


@fault("vocab_tail_garbage", "logits", _tail_where,
       where_doc="prefill, logits (needs a padded [PAD] tail in the vocabulary)")
def vocab_tail_garbage(x, ctx):
    """Garbage in the padded vocabulary tail: the output matrix is padded to a round number of
    rows ([PAD] tokens, 21 rows in tiny, 271 in Qwen2.5) and the engine leaves those rows
    uninitialized instead of zero/copied, so their logits are dot products with junk (here a
    fixed N(0, 1) matrix, 50x the real rows' scale): isolated spikes that greedy decoding picks.
    Only the logits; first wrong op: logits at prefill."""
    start = padded_vocab_tail(ctx.model.gguf.path)
    if start is None:
        return None
    h = ctx.inputs["x"]                                                   # (T, D)
    g = torch.Generator().manual_seed(1234)
    junk = torch.randn(x.shape[-1] - start, h.shape[-1], generator=g).to(h)
    out = x.clone()
    out[:, start:] = h @ junk.T
    return out


# -- qwen3: the per-head Q/K norms and the head size --------------------------------------------
def _qwen3_fault(name: str, pattern: str, expected: Callable, where_doc: str, **kw):
    return fault(name, pattern, expected, where_doc=where_doc, architectures=QK_NORM_ARCHS,
                 arch_note=NO_QK_NORM_NOTE, **kw)


def _head_norm_weight(ctx, which: str) -> torch.Tensor:
    """Layer ``ctx.layer``'s attn_q_norm / attn_k_norm weight (``which``: "q" or "k")."""
    return ctx.model.gguf.weights[f"blk.{ctx.layer}.attn_{which}_norm.weight"]


def _step_positions(x: torch.Tensor, ctx) -> torch.Tensor:
    return torch.arange(ctx.pos, ctx.pos + x.shape[0], device=x.device)


@_qwen3_fault("qk_norm_whole", "blk.*.q_norm,blk.*.k_norm", lambda cfg: (0, 0, "blk.0.q_norm"),
              "prefill, layer 0, blk.0.q_norm")
def qk_norm_whole(x, ctx):
    """Q/K norm over the whole projection instead of per head: the engine RMS-normalizes q_proj
    as one (n_head * head_dim) row per token (an ordinary RMSNorm called before the reshape into
    heads) and then multiplies each head by the head_dim-sized weight, so every head shares one
    scale instead of having unit RMS. q is normed before k: first wrong op is q_norm in layer 0."""
    p = ctx.inputs["x"]                                                   # (T, nh, Dh)
    flat = rms_norm(p.reshape(p.shape[0], -1), None, ctx.inputs["eps"]).view_as(p)
    return flat * ctx.inputs["weight"]


def _norm_after_rope(x, ctx):
    """At q_norm/k_norm: the engine's norm runs on the roped projection; at q_rope/k_rope: the
    tensor is already roped (returned as it comes)."""
    if ctx.site.endswith("_rope"):
        return ctx.inputs["x"]
    m = ctx.model
    roped = rope_neox(ctx.inputs["x"], _step_positions(x, ctx), m.config.rope_base, m.mirror)
    return rms_norm(roped, ctx.inputs["weight"], ctx.inputs["eps"])


@_qwen3_fault("qk_norm_after_rope", "blk.*.q_norm,blk.*.k_norm,blk.*.q_rope,blk.*.k_rope",
              _positional("q_norm"), "prefill, layer 0, blk.0.q_norm (needs a prompt of >= 2 tokens, "
              "else decode step 1)", min_prompt=2)
def qk_norm_after_rope(x, ctx):
    """Q/K norm applied after RoPE instead of before (the Qwen3 block ported from a Llama one,
    the norm inserted just before attention): the engine ropes q_proj, then RMS-normalizes
    and multiplies by attn_q_norm.weight. RoPE keeps each head's norm, but the weight no longer
    commutes with the rotation (w_j scales dim j after it was mixed with dim j + Dh/2), so the
    engine's q_norm output differs from norm-then-rope wherever the rotation is not the identity:
    from the second prefill token on (position 0 is not rotated). First wrong op: q_norm in
    layer 0 (k_norm after it); with a one-token prompt, decode step 1."""
    return _norm_after_rope(x, ctx)


@_qwen3_fault("k_norm_missing", "blk.*.k_norm", lambda cfg: (0, 0, "blk.0.k_norm"),
              "prefill, layer 0, blk.0.k_norm")
def k_norm_missing(x, ctx):
    """K norm forgotten: the port adds q_norm and misses the k_norm line (or fails to load
    attn_k_norm.weight and skips it), so k goes to RoPE un-normalized. q is right; first wrong
    op: k_norm in layer 0 at prefill."""
    return ctx.inputs["x"]


@_qwen3_fault("k_norm_uses_q_weight", "blk.*.k_norm", lambda cfg: (0, 0, "blk.0.k_norm"),
              "prefill, layer 0, blk.0.k_norm")
def k_norm_uses_q_weight(x, ctx):
    """Q norm weight used for K (a copy-paste of the q line: k_norm(k) built with
    attn_q_norm.weight, or both norms mapped to one tensor name at load): the per-head
    normalization of k is right, its per-dimension scale is q's. First wrong op: k_norm in
    layer 0 at prefill."""
    return rms_norm(ctx.inputs["x"], _head_norm_weight(ctx, "q").to(x), ctx.inputs["eps"])


def _head_dim_mismatch(cfg) -> bool:
    return cfg.head_dim != cfg.d_model // cfg.n_head


def _chunks(x: torch.Tensor, width: int) -> torch.Tensor:
    """(T, nh, Dh) -> (T, nh * Dh / width, width): the heads an engine with head size ``width`` sees."""
    return x.reshape(x.shape[0], -1, width)


@_qwen3_fault("head_dim_from_d_model", "blk.*.q_norm,blk.*.k_norm,blk.*.q_rope,blk.*.k_rope,blk.*.attn_weights",
              lambda run: (0, 0, "blk.0.q_norm") if _head_dim_mismatch(run.cfg) else None,
              "prefill, layer 0, blk.0.q_norm (needs attention.key_length != d_model / n_head: "
              "Qwen3-0.6B and the tiny-qwen3 fixture, 128 vs 64)")
def head_dim_from_d_model(x, ctx):
    """Head size taken as d_model / n_head (64 on Qwen3-0.6B) instead of attention.key_length
    (128): the port ignores key_length, so its per-head ops work on 64-wide chunks of the
    128-wide heads. The first op that depends on the head size is the per-head Q norm: its RMS
    is taken over each 64-wide half (then times the 128-wide weight), so it is wrong from the
    first token on; RoPE then rotates pairs (j, j + 32) of each half at base^(-2j/64), and the
    softmax scale is 1/sqrt(64). The projections do not depend on the head size, so they match.
    Invisible where key_length == d_model / n_head (every qwen2 file). First wrong op: q_norm
    in layer 0 at prefill."""
    cfg = _cfg(ctx)
    narrow = cfg.d_model // cfg.n_head
    if narrow == cfg.head_dim:
        return None
    key = ctx.site.rsplit(".", 1)[1]
    if key == "attn_weights":
        return torch.softmax(ctx.inputs["kq"] * narrow ** -0.5 + ctx.inputs["mask"], dim=-1)
    h = ctx.inputs["x"]
    if key.endswith("_norm"):
        return rms_norm(_chunks(h, narrow), None, ctx.inputs["eps"]).view_as(h) * ctx.inputs["weight"]
    return rope_neox(_chunks(h, narrow), ctx.inputs["pos"], ctx.inputs["base"], ctx.inputs.get("mirror")).view_as(h)

