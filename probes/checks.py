"""Reference-free probes: invariants a correct Qwen2 / Qwen3 forward pass satisfies, checked on ONE trace.

No second engine is needed: each check reads one :class:`~harness.trace.Trace` (our PyTorch
model's or llama.cpp's) plus what the GGUF says (config, and for the layout probe the weights)
and returns plain records ``dict(name, site, step, passed, value, threshold, detail)``; ``value``
is the measured violation (bigger is worse), ``passed`` is ``value <= threshold``. A probe
*fires* when any of its records fails. ``run_checks`` runs them all; ``summarize`` keeps one
row per probe (its worst record); ``probe`` makes a trace to probe (llama.cpp's, or ours with
faults injected: :func:`probes.context.probe_trace`) and runs them. Thresholds are properties of the invariant (float32 rounding, softmax
underflow, angle precision), not tuned to the fixtures.

=================  ============================================================  ====================
probe              invariant                                                     fires on (zoo fault)
=================  ============================================================  ====================
attention_rows     attention rows sum to 1; future (masked) positions are 0     causal_mask_missing
kv_positions       kq/attn_weights span n_prompt + step cells, +1 per decode     kv_pos_stuck
                   step, and the softmax reads every one of them
rope_pair_norm     RoPE rotates NEOX pairs (j, j + Dh/2): each pair keeps its    rope_interleaved
                   norm (RoPE's input vs q_rope / k_rope; the input is the
                   architecture's: q / k on qwen2, q_norm / k_norm on qwen3)
rope_relative      the rotation angle is linear in position (angle(p) = p *      decode_pos_off_by_one
                   angle(1)), so q.k depends on relative position only
rope_frequency     the angle per position is the file's theta_j = base^(-2j/Dh)  rope_base_wrong
logit_spikes       no logit is an isolated spike far outside its row's           vocab_tail_garbage
                   distribution (robust z-score; token id and value reported)
hidden_norms       hidden-state norms do not jump (> 100x, heuristic) or turn    fp16_softmax_overflow
                   inf/NaN between consecutive layers (l_out norm ratios)
residual_adds      ffn_inp = layer input + attn_out, l_out = ffn_inp + ffn_out   residual_dropped_mid
matmul_layout      each matmul output is input @ W^T for the GGUF's W; if not,   qkv_weight_transposed,
                   which layout of W explains it (transposed, wrong leading      lm_head_transpose
                   dimension, another layer's or tensor's weight)
head_norms         qwen3: q_norm / k_norm are RMSNorm of each head of q_proj /   qk_norm_whole,
                   k_proj times attn_q_norm / attn_k_norm weight; if not, which  qk_norm_after_rope,
                   variant explains it (whole projection, narrower chunks, not   k_norm_missing,
                   applied, unweighted, the other norm's weight, after RoPE)     k_norm_uses_q_weight,
                                                                                 head_dim_from_d_model
=================  ============================================================  ====================

Why a separate residual probe: on the random-weight tiny fixtures a dropped residual does not
move the hidden-state norm (each block's FFN output is as large as the stream), so the norm
probe only catches blow-ups; the residual adds themselves are checked exactly instead.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from harness.gguf.load import GGUFModel
from harness.sites import input_sites
from probes.context import CheckError, ProbeContext, check_record, layer_sites, probe_trace, rel_error, step_positions
from probes.head_norms import check_head_norms

# thresholds (see each check's docstring for where they come from)
ROW_SUM_TOL = 1e-4            # float32 softmax rows sum to 1 within ~P * 1e-7
UNDERFLOW_GAP = 80.0          # a score gap below this can never underflow a float32 softmax weight to 0
PAIR_NORM_TOL = 1e-3          # relative to the tensor's rms pair norm; float32 rotation: ~1e-6
ANGLE_TOL = 2e-3              # radians; float32 angles of positions < 1e4: < 1e-4
SPIKE_Z = 20.0                # robust z-score of an isolated logit
NORM_JUMP = 100.0             # heuristic: largest plausible norm ratio between consecutive layer outputs
RESIDUAL_TOL = 1e-4           # relative error of a float32 add
LAYOUT_TOL = 0.05             # relative error within which a layout "reproduces" a matmul output


# -- attention --------------------------------------------------------------------------------
def check_attention_rows(trace, pc: ProbeContext) -> list[dict]:
    """Each softmax row sums to 1 (float32: within ~P * 1e-7, threshold 1e-4) and gives exactly
    0 to positions after the query's own (the causal mask): value = the larger violation."""
    out = []
    for step, _, site, w in layer_sites(trace, "attn_weights"):
        H, T, P = w.shape
        w = w.double()
        if not bool(torch.isfinite(w).all()):
            n = int((~torch.isfinite(w)).sum())
            out.append(check_record("attention_rows", site, step, math.inf, ROW_SUM_TOL, f"{n} non-finite attention weights"))
            continue
        dev = (w.sum(-1) - 1).abs()                                         # (H, T)
        qpos = step_positions(trace, step, T)
        future = torch.arange(P)[None, :] > qpos[:, None]                   # (T, P)
        fut = w.abs() * future
        d, f = float(dev.max()), float(fut.max()) if P else 0.0
        if f > d:
            h, t, p = (int(i) for i in torch.unravel_index(fut.argmax(), fut.shape))
            detail = (f"token {t} (position {int(qpos[t])}) attends to future position {p} with weight "
                      f"{f:.3g} (head {h}): causal mask missing")
        elif d > ROW_SUM_TOL:
            h, t = (int(i) for i in torch.unravel_index(dev.argmax(), dev.shape))
            detail = f"row of head {h} token {t} sums to {float(w.sum(-1)[h, t]):.6g}, not 1"
        else:
            detail = f"rows sum to 1 within {d:.2g}; future positions 0"
        out.append(check_record("attention_rows", site, step, max(d, f), ROW_SUM_TOL, detail))
    return out


def check_kv_positions(trace, pc: ProbeContext) -> list[dict]:
    """The KV length advances by one per decode step: kq and attn_weights span exactly
    n_prompt + step cells (the prefill: n_prompt), and the softmax reads every cell up to the
    query's position. A weight of exactly 0 at a cell whose score is within 80 of the row's
    maximum cannot come from a softmax with scale <= 1 (e^-80 is far from float32 underflow):
    such a cell was not attended. value = wrong cell counts + skipped cells; threshold 0."""
    out, last_p = [], {}
    for step, layer, site, w in layer_sites(trace, "attn_weights"):
        H, T, P = w.shape
        want = trace.start_pos(step) + T
        problems, value = [], 0.0
        kq = trace.tensors.get((step, f"blk.{layer}.kq"))
        if kq is not None and kq.shape[-1] != want:
            problems.append(f"kq spans {kq.shape[-1]} cells, expected {want}")
            value += abs(kq.shape[-1] - want)
        if P != want:
            problems.append(f"attention spans {P} cells, expected {want} (n_prompt {trace.n_prompt} + step {step})")
            value += abs(P - want)
        if layer in last_p and step == last_p[layer][0] + 1 and P - last_p[layer][1] != 1:
            problems.append(f"KV length went {last_p[layer][1]} -> {P} from step {step - 1} to {step}, not +1")
            value += abs(P - last_p[layer][1] - 1)
        last_p[layer] = (step, P)
        if kq is not None and kq.shape == w.shape and bool(torch.isfinite(kq).all()):
            qpos = step_positions(trace, step, T)
            visible = torch.arange(P)[None, None, :] <= qpos[None, :, None]          # (1, T, P)
            gap = kq.double().amax(-1, keepdim=True) - kq.double()
            skipped = visible & (w == 0) & (gap < UNDERFLOW_GAP)
            n = int(skipped.sum())
            if n:
                used = (visible & (w != 0)).sum(-1)                                   # (H, T)
                h, t = (int(i) for i in torch.unravel_index(used.argmin(), used.shape))
                problems.append(f"softmax reads only {int(used[h, t])} of {int(qpos[t]) + 1} cells (head {h} "
                                f"token {t}); over all heads {n} visible cells get weight exactly 0 though "
                                f"their scores are close to the row maximum: the KV length is not advancing")
                value += n
        detail = "; ".join(problems) or f"{P} cells = n_prompt {trace.n_prompt} + step {step}, all read"
        out.append(check_record("kv_positions", site, step, value, 0.0, detail))
    return out


# -- RoPE -------------------------------------------------------------------------------------
def _pairs(x: torch.Tensor) -> torch.Tensor:
    """(T, nh, Dh) -> complex (T, nh, Dh/2): NEOX pairs (j, j + Dh/2)."""
    half = x.shape[-1] // 2
    x = x.double()
    return torch.complex(x[..., :half], x[..., half:])


def _wrap(a: torch.Tensor) -> torch.Tensor:
    return torch.remainder(a + math.pi, 2 * math.pi) - math.pi


def _rope_pairs(trace, pc: ProbeContext):
    """(step, layer, site, z_in, z_out) for q_rope and k_rope sites whose input is in the trace:
    the architecture's input of RoPE (qwen2: the biased q / k; qwen3: the normed q_norm / k_norm)."""
    inputs = pc.cfg.spec.inputs
    for key in ("q_rope", "k_rope"):
        for step, layer, site, y in layer_sites(trace, key):
            x = trace.tensors.get((step, input_sites(site, inputs)[0]))
            if x is not None and x.shape == y.shape:
                yield step, layer, site, _pairs(x), _pairs(y)


def _angles(zi: torch.Tensor, zo: torch.Tensor):
    """Per (token, pair): the rotation angle, pooled over heads (weighted by |z|^2), and a mask
    of the pairs whose input is large enough to measure it."""
    c = (zi.conj() * zo).sum(1)                                               # (T, half)
    wgt = zi.abs().pow(2).sum(1)
    top = float(wgt.max()) if wgt.numel() else 0.0
    ok = wgt > 1e-6 * top if top > 0 else torch.zeros_like(wgt, dtype=torch.bool)
    return c.angle(), ok & torch.isfinite(c.real) & torch.isfinite(c.imag)


def check_rope_pair_norm(trace, pc: ProbeContext) -> list[dict]:
    """RoPE with NEOX pairing rotates (x_j, x_{j+Dh/2}) as a 2-D vector: its norm is unchanged.
    value = max | |pair out| - |pair in| | in units of the tensor's rms pair norm (float32
    rotation: ~1e-6; threshold 1e-3). Another pairing (interleaved 2j, 2j+1) breaks it."""
    out = []
    for step, _, site, zi, zo in _rope_pairs(trace, pc):
        ni, no = zi.abs(), zo.abs()
        rms = float(ni.pow(2).mean().sqrt()) or 1.0
        d = (no - ni).abs() / rms
        v = float(d.max()) if bool(torch.isfinite(d).all()) else math.inf
        if v > PAIR_NORM_TOL:
            t, h, j = (int(i) for i in torch.unravel_index(torch.nan_to_num(d, nan=math.inf).argmax(), d.shape))
            detail = (f"pair (dim {j}, dim {j + zi.shape[-1]}) of head {h} token {t}: norm {float(ni[t, h, j]):.4g} "
                      f"-> {float(no[t, h, j]):.4g}: not a rotation of NEOX pairs (interleaved pairing?)")
        else:
            detail = f"pair norms preserved within {v:.2g}"
        out.append(check_record("rope_pair_norm", site, step, v, PAIR_NORM_TOL, detail))
    return out


def _angle_table(trace, pc: ProbeContext):
    """{(layer, key): {position: (angles (half,), ok mask)}} and {(step, site): [(pos, ...)]}."""
    by_pos, sites = {}, {}
    for step, layer, site, zi, zo in _rope_pairs(trace, pc):
        phi, ok = _angles(zi, zo)
        key = (layer, site.rsplit(".", 1)[1])
        for t, p in enumerate(step_positions(trace, step, zi.shape[0]).tolist()):
            by_pos.setdefault(key, {})[p] = (phi[t], ok[t])
            sites.setdefault((step, site, key), []).append(p)
    return by_pos, sites


def _angle_check(name: str, trace, pc: ProbeContext, omega_of: Callable, what: str, hint: str,
                 label: str) -> list[dict]:
    by_pos, sites = _angle_table(trace, pc)
    out = []
    for (step, site, key), positions in sites.items():
        omega = omega_of(by_pos[key])
        if omega is None:
            out.append(check_record(name, site, step, 0.0, ANGLE_TOL, "needs the angles at position 1 (two tokens)"))
            continue
        worst, where = 0.0, None
        for p in positions:
            phi, ok = by_pos[key][p]
            r = _wrap(phi - p * omega).abs()
            r = torch.where(ok, torch.nan_to_num(r, nan=math.inf), torch.zeros_like(r))
            if float(r.max()) > worst:
                worst, where = float(r.max()), (p, int(r.argmax()))
        if worst > ANGLE_TOL:
            p, j = where
            detail = (f"position {p}, pair {j}: rotated by {float(by_pos[key][p][0][j]):.4f} rad, {what} "
                      f"{float(_wrap(p * omega[j])):.4f}: {hint}")
        else:
            detail = f"angles match {label} within {worst:.2g} rad"
        out.append(check_record(name, site, step, worst, ANGLE_TOL, detail))
    return out


def check_rope_relative(trace, pc: ProbeContext) -> list[dict]:
    """q.k after RoPE depends only on the relative position iff the rotation angle of each pair
    is linear in the position: angle(p) = p * angle(1) (mod 2 pi), in particular 0 at position
    0. The angles are measured from the trace's own q -> q_rope (k -> k_rope) pairs, pooled over
    heads; angle(1) comes from the token at position 1. value = worst deviation in radians."""
    def omega(table):
        return table[1][0] if 1 in table else None
    return _angle_check("rope_relative", trace, pc, omega, "linear in position would give",
                        "positions are not consistent (off-by-one position at this step?)",
                        "position x angle(1)")


def check_rope_frequency(trace, pc: ProbeContext) -> list[dict]:
    """The angle per position of pair j is the file's theta_j = rope.freq_base^(-2j/Dh)
    (float64 here; llama.cpp's float32 angles agree within ~1e-4 rad for positions < 1e4).
    value = worst deviation in radians over the trace's positions."""
    cfg = pc.cfg
    half = cfg.head_dim // 2
    theta = float(cfg.rope_base) ** (-torch.arange(half, dtype=torch.float64) * 2 / cfg.head_dim)
    return _angle_check("rope_frequency", trace, pc, lambda table: theta,
                        f"theta_j of rope.freq_base {cfg.rope_base:g} gives",
                        "wrong RoPE frequencies (rope base?) or position",
                        "position x theta_j")


# -- logits and hidden states -----------------------------------------------------------------
def check_logit_spikes(trace, pc: ProbeContext) -> list[dict]:
    """No logit far outside its row's distribution: robust z = (x - median) / (1.4826 MAD) per
    token row; value = the largest |z| (threshold 20: random and trained heads alike stay well
    below; garbage rows, e.g. an uninitialized padded vocabulary tail, do not)."""
    from harness.ours.faults import padded_vocab_tail
    tail = padded_vocab_tail(pc.gguf_path) if pc.gguf_path else None
    out = []
    for (step, site), lg in trace.items():
        if site != "logits":
            continue
        x = lg.double()
        if not bool(torch.isfinite(x).all()):
            n = int((~torch.isfinite(x)).sum())
            out.append(check_record("logit_spikes", site, step, math.inf, SPIKE_Z, f"{n} non-finite logits"))
            continue
        med = x.median(-1, keepdim=True).values
        mad = (x - med).abs().median(-1, keepdim=True).values * 1.4826
        z = ((x - med) / mad.clamp_min(1e-12)).abs()
        t, tok = (int(i) for i in torch.unravel_index(z.argmax(), z.shape))
        v = float(z[t, tok])
        n = int((z > SPIKE_Z).sum())
        if v > SPIKE_Z:
            where = " (in the padded [PAD] tail)" if tail is not None and tok >= tail else ""
            detail = (f"{n} spikes; worst: token {tok}{where} logit {float(x[t, tok]):.4g} at row {t}, robust z "
                      f"{v:.0f} (row median {float(med[t]):.3g}, MAD {float(mad[t]):.3g})")
        else:
            detail = f"largest robust z {v:.1f} (token {tok})"
        out.append(check_record("logit_spikes", site, step, v, SPIKE_Z, detail))
    return out


def _hidden_chain(trace, step: int):
    names = ["embd"] + [f"blk.{i}.l_out" for i in range(trace.n_layer)]
    return [(n, trace.tensors.get((step, n))) for n in names]


def check_hidden_norms(trace, pc: ProbeContext) -> list[dict]:
    """Hidden-state norms change smoothly through the residual stream: the per-token norm ratio
    of consecutive layer outputs (embd -> l_out.0 -> l_out.1 ...) stays within 1/100 .. 100, and
    nothing turns inf/NaN. value = max(ratio, 1/ratio) over tokens and layers. The bound is a
    heuristic: clean tiny fixtures stay below ~6x; trained models grow the stream by tens of x
    in the layer where their "massive activations" appear (raise NORM_JUMP if that fires)."""
    out = []
    for step in trace.steps():
        chain = [(n, t) for n, t in _hidden_chain(trace, step) if t is not None]
        if len(chain) < 2:
            continue
        worst, site, detail = 1.0, chain[1][0], "no norm change"
        for (n0, a), (n1, b) in zip(chain, chain[1:]):
            na, nb = a.double().norm(dim=-1), b.double().norm(dim=-1)
            if not bool(torch.isfinite(nb).all()):
                t = int((~torch.isfinite(nb)).nonzero()[0])
                worst, site, detail = math.inf, n1, f"{n1} is not finite at token {t} ({n0} is finite)"
                break
            r = nb / na.clamp_min(1e-30)
            jump = torch.maximum(r, 1 / r.clamp_min(1e-30))
            if float(jump.max()) > worst:
                t = int(jump.argmax())
                worst, site = float(jump.max()), n1
                cos = float(torch.nn.functional.cosine_similarity(a[t].double(), b[t].double(), dim=0))
                detail = (f"{n0} -> {n1}: norm {float(na[t]):.4g} -> {float(nb[t]):.4g} (x{float(r[t]):.3g}, "
                          f"cosine {cos:.2f}) at token {t}")
        if worst <= NORM_JUMP:
            detail = f"largest jump x{worst:.3g}: {detail}"
        out.append(check_record("hidden_norms", site, step, worst, NORM_JUMP, detail))
    return out


def check_residual_adds(trace, pc: ProbeContext) -> list[dict]:
    """The residual adds hold exactly: ffn_inp = layer input + attn_out and l_out = ffn_inp +
    ffn_out (float32 adds; threshold 1e-4 relative). value = the worse relative error."""
    out = []
    for step, layer, site, r in layer_sites(trace, "ffn_inp"):
        g = trace.tensors.get
        x_in = g((step, "embd" if layer == 0 else f"blk.{layer - 1}.l_out"))
        a, f, lo = (g((step, f"blk.{layer}.{k}")) for k in ("attn_out", "ffn_out", "l_out"))
        errs = []
        if x_in is not None and a is not None:
            errs.append((float((r.double() - x_in.double() - a.double()).norm() / r.double().norm().clamp_min(1e-30)),
                         site, f"{site} != layer input + attn_out"))
        if f is not None and lo is not None:
            errs.append((float((lo.double() - r.double() - f.double()).norm() / lo.double().norm().clamp_min(1e-30)),
                         f"blk.{layer}.l_out", f"blk.{layer}.l_out != ffn_inp + ffn_out"))
        if not errs:
            continue
        v, where, what = max(errs, key=lambda e: (not math.isfinite(e[0]), e[0]))
        v = v if math.isfinite(v) else math.inf
        detail = f"{what} (relative error {v:.3g}): residual connection dropped?" if v > RESIDUAL_TOL \
            else f"residual adds exact within {v:.2g}"
        out.append(check_record("residual_adds", where, step, v, RESIDUAL_TOL, detail))
    return out


# -- matmul layout ----------------------------------------------------------------------------
MATMULS = {  # site key -> (input site key, weight suffix)
    "q_proj": ("attn_norm", "attn_q.weight"), "k_proj": ("attn_norm", "attn_k.weight"),
    "v_proj": ("attn_norm", "attn_v.weight"), "attn_out": ("kqv", "attn_output.weight"),
    "ffn_gate": ("ffn_norm", "ffn_gate.weight"), "ffn_up": ("ffn_norm", "ffn_up.weight"),
    "ffn_out": ("ffn_act", "ffn_down.weight"),
}


def _rounder(trace, gm: GGUFModel, name: str):
    """llama.cpp's activation rounding for this weight, when the trace was made with it."""
    m = trace.meta or {}
    backend = m.get("backend") if m.get("source") == "llama.cpp" else m.get("mirror")
    if not backend:
        return None
    from harness.ours.numerics import act_rounder
    return act_rounder(gm.types.get(name), backend)


def _candidates(gm: GGUFModel, name: str, layer: int | None):
    """(label, description, matrix M with out = x @ M) for the weight ``name`` and its look-alikes."""
    W = gm.weights[name]
    R, C = W.shape
    yield "as stored", "x @ W^T", W.T
    if R == C:
        yield "transposed", "matches with the weight transposed (x @ W instead of x @ W^T: row- vs column-major)", W
    else:
        yield ("wrong leading dimension", f"matches with the weight read with the wrong leading dimension (its "
               f"{R}x{C} row-major buffer read as {C}x{R})", W.reshape(-1).view(C, R))
    if layer is not None:
        suffix = name.split(".", 2)[2]
        for j in (layer - 1, layer + 1):
            other = f"blk.{j}.{suffix}"
            if other in gm.weights:
                yield f"layer {j}", f"matches layer {j}'s {suffix} (wrong layer index)", gm.weights[other].T
        for other, w in gm.weights.items():
            if other.startswith(f"blk.{layer}.") and other != name and w.shape == W.shape:
                yield other, f"matches {other} (wrong tensor)", w.T


def check_matmul_layout(trace, pc: ProbeContext) -> list[dict]:
    """Every matmul output of the trace is reproduced by its input site @ W^T with the GGUF's
    (dequantized) weight W, within 5% relative (quantized kernels round activations: ~1e-2 at
    worst; with that rounding mirrored ~1e-4). When not, the probe tries the layouts a kernel
    could have read instead (W transposed, W's buffer read with the wrong leading dimension,
    the same weight of the neighbouring layers, another same-shaped weight of the layer) and
    says which one reproduces the output. value = relative error of the stored layout."""
    gm = pc.weights
    out = []
    for (step, site), y in trace.items():
        if site == "logits":
            layer, in_site, wname = None, "output_norm", "token_embd.weight" if gm.tied else "output.weight"
        elif site.startswith("blk.") and site.rsplit(".", 1)[1] in MATMULS:
            layer = int(site.split(".")[1])
            ik, suffix = MATMULS[site.rsplit(".", 1)[1]]
            in_site, wname = f"blk.{layer}.{ik}", f"blk.{layer}.{suffix}"
        else:
            continue
        x = trace.tensors.get((step, in_site))
        if x is None or wname not in gm.weights:
            continue
        x, y = x.reshape(x.shape[0], -1).float().cpu(), y.cpu()
        rnd = _rounder(trace, gm, wname)
        if rnd is not None:
            x = rnd(x)
        y2 = y.reshape(y.shape[0], -1)
        results = []
        for label, desc, M in _candidates(gm, wname, layer):
            if M.shape[0] != x.shape[1] or M.shape[1] != y2.shape[1]:
                continue
            results.append((label, desc, rel_error(x @ M.float().cpu(), y2)))
        stored = results[0][2]
        if stored <= LAYOUT_TOL:
            detail = f"{in_site} @ {wname}^T reproduces it (relative error {stored:.2g})"
        else:
            best = min(results[1:], key=lambda r: r[2], default=None)
            if best is not None and best[2] <= LAYOUT_TOL:
                detail = f"{best[1]}: relative error {best[2]:.2g} (as stored: {stored:.3g})"
            else:
                tried = ", ".join(f"{r[0]} {r[2]:.2g}" for r in results)
                detail = f"no candidate layout of {wname} reproduces it ({tried})"
        out.append(check_record("matmul_layout", site, step, stored, LAYOUT_TOL, detail))
    return out


CHECKS: dict[str, Callable] = {
    "attention_rows": check_attention_rows,
    "kv_positions": check_kv_positions,
    "rope_pair_norm": check_rope_pair_norm,
    "rope_relative": check_rope_relative,
    "rope_frequency": check_rope_frequency,
    "logit_spikes": check_logit_spikes,
    "hidden_norms": check_hidden_norms,
    "residual_adds": check_residual_adds,
    "head_norms": check_head_norms,
    "matmul_layout": check_matmul_layout,
}


def run_checks(trace, model_or_path, checks=None) -> list[dict]:
    """Every record of the named checks (default: all) on ``trace``. ``model_or_path``: the GGUF
    path, its GGUFModel, a Model or a ProbeContext."""
    pc = ProbeContext.of(model_or_path)
    names = list(CHECKS) if checks is None else list(checks)
    bad = [n for n in names if n not in CHECKS]
    if bad:
        raise CheckError(f"unknown probe {bad[0]!r}; known: {', '.join(CHECKS)}")
    records = []
    for n in names:
        records += CHECKS[n](trace, pc)
    return records


def fired(records: list[dict]) -> list[str]:
    """Names of the probes with at least one failing record, in CHECKS order."""
    bad = {r["name"] for r in records if not r["passed"]}
    return [n for n in CHECKS if n in bad]


def summarize(records: list[dict], checks=None) -> list[dict]:
    """One row per probe: fired or not, how many records failed, and the worst record (the
    first failing one in execution order, else the one with the largest value)."""
    rows = []
    for name in (checks or CHECKS):
        recs = [r for r in records if r["name"] == name]
        if not recs:
            rows.append(dict(name=name, fired=False, failed=0, total=0, site="-", step=None, value=None,
                             threshold=None, detail="nothing to check in this trace"))
            continue
        bad = [r for r in recs if not r["passed"]]
        worst = bad[0] if bad else max(recs, key=lambda r: r["value"])
        rows.append(dict(name=name, fired=bool(bad), failed=len(bad), total=len(recs), site=worst["site"],
                         step=worst["step"], value=worst["value"], threshold=worst["threshold"],
                         detail=worst["detail"]))
    return rows


def probe(gguf: str, source: str = "torch", tokens: list[int] | None = None, prompt: str | None = None,
          steps: int = 3, faults=(), checks=None, device: str = "cpu",
          extra_bufts: bool = False) -> tuple[list[dict], list[dict], dict]:
    """Make a trace (see probe_trace) and run the checks: ``(summary, records, meta)``."""
    import os
    from harness.ours.inject import get_fault
    faults = [get_fault(f) for f in faults]
    if checks is not None:
        bad = [n for n in checks if n not in CHECKS]
        if bad:
            raise CheckError(f"unknown probe {bad[0]!r}; known: {', '.join(CHECKS)}")
    trace, model = probe_trace(gguf, source, tokens, prompt, steps, faults, device, extra_bufts)
    records = run_checks(trace, model, checks)
    meta = dict(source="llama.cpp" if source == "llama" else "torch", gguf=os.path.basename(str(gguf)),
                n_tokens=len(trace.tokens), n_prompt=trace.n_prompt, steps=trace.n_steps, tokens=list(trace.tokens),
                faults=[f.name for f in faults])
    return summarize(records, checks), records, meta
