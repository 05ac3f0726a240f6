"""harness.ours.numerics' CUDA arithmetic against literal per-block transcriptions of ggml-cuda's
code (quantize.cu quantize_q8_1 / quantize_mmq_q8_1, vecdotq.cuh vec_dot_q5_0_q8_1, mmq's Q4_K
mma dot), and harness.gguf.dequant.offset_parts against dequantize."""
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from harness.gguf.dequant import dequantize, offset_parts
from harness.ours import numerics
from harness.ours.numerics import CudaQuantMatMul, MMVQ_MAX_TOKENS, q8_1_mmq, q8_1_mmvq
from harness.synth import default_fixture

f32, f16 = np.float32, np.float16


def random_raw(qtype, shape, seed=0):
    """Random blocks with finite f16 scales (exponent bits kept below 0x3c00: |d| < 1)."""
    block, size = GGML_QUANT_SIZES[qtype]
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (int(np.prod(shape)) // block * size,), dtype=torch.uint8, generator=g)
    b = raw.view(-1, size)
    b[:, 1] &= 0x3B
    if qtype in (Q.Q4_K, Q.Q5_K):
        b[:, 3] &= 0x3B
    return raw


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_0, Q.Q4_K, Q.Q5_K])
def test_offset_parts_rebuild_dequantize_bit_for_bit(qtype):
    raw = random_raw(qtype, (6, 512))
    q, scale, offset = offset_parts(raw, qtype, (6, 512))
    rebuilt = scale.repeat_interleave(32, -1) * q - offset.repeat_interleave(32, -1)
    assert torch.equal(rebuilt, dequantize(raw, qtype, (6, 512)))
    assert q.min() >= 0 and q.max() <= (15 if qtype in (Q.Q4_0, Q.Q4_K) else 31)
    assert torch.equal(q, q.round())


def roundf(v):
    return np.float32(np.sign(v) * np.floor(np.abs(np.float64(v)) + 0.5))


def literal_mmvq(block):
    """quantize_q8_1 for one block of 32: d = amax / 127; q = roundf(x / d); ds = half2(d, sum)."""
    amax = f32(np.max(np.abs(block)))
    d = f32(amax / f32(127))
    q = [0.0 if amax == 0 else roundf(f32(x / d)) for x in block]
    return np.array(q, np.float64), float(f16(d)), float(f16(np.sum(block, dtype=f32)))


def literal_mmq(block, ds4):
    """quantize_mmq_q8_1: d_inv = 127 / amax; q = roundf(x * d_inv); d = 1 / d_inv (half in DS4)."""
    amax = f32(np.max(np.abs(block)))
    d_inv = f32(f32(127) / amax)
    q = [roundf(f32(x * d_inv)) for x in block]
    d = f32(f32(1) / d_inv)
    return np.array(q, np.float64), float(f16(d)) if ds4 else float(d), float(f16(np.sum(block, dtype=f32)))


def test_activation_rounding_matches_the_literal_kernels_and_rounds_halves_away_from_zero():
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    x[2, :32] = torch.tensor([127.0, 2.5, -2.5, 0.5] + [1.0] * 28)     # d_inv = 1: exact halves
    xq, s = q8_1_mmvq(x)
    for ds4 in (True, False):
        xm, sm = q8_1_mmq(x, ds4)
        for t in range(3):
            for b in range(2):
                blk = x[t, 32 * b:32 * b + 32].numpy()
                q, d, s_lit = literal_mmq(blk, ds4)
                assert np.array_equal(xm[t, 32 * b:32 * b + 32].numpy(), (q * d).astype(f32))
                assert sm[t, b].item() == s_lit
    for t in range(3):
        for b in range(2):
            q, d, s_lit = literal_mmvq(x[t, 32 * b:32 * b + 32].numpy())
            assert np.array_equal(xq[t, 32 * b:32 * b + 32].numpy(), (q * d).astype(f32))
            assert s[t, b].item() == s_lit
    assert xq[2, 1].item() == pytest.approx(3.0) and xq[2, 2].item() == pytest.approx(-3.0)  # not 2 (even)
    assert torch.equal(q8_1_mmvq(torch.zeros(2, 32))[0], torch.zeros(2, 32))
    assert torch.equal(q8_1_mmq(torch.zeros(2, 32), True)[0], torch.zeros(2, 32))


def literal_q5_0_mmvq(x, raw, rows, cols):
    """vec_dot_q5_0_q8_1_impl: d5 * (sumi * d8 - 16 * s8) per block, summed over blocks."""
    q, scale, _ = offset_parts(raw, Q.Q5_0, (rows, cols))
    y = np.zeros((x.shape[0], rows))
    for t in range(x.shape[0]):
        for b in range(cols // 32):
            qa, d8, s8 = literal_mmvq(x[t, 32 * b:32 * b + 32].numpy())
            for r in range(rows):
                sumi = float(np.dot(q[r, 32 * b:32 * b + 32].double().numpy(), qa))
                y[t, r] += scale[r, b].item() * (sumi * d8 - 16 * s8)
    return y


def literal_q4_k_mmq(x, raw, rows, cols):
    """Q4_K MMQ (mma): x_dm = half2(d, -dmin) * half2(sc, m) in half; sum += dm.x * ds.x * sumi +
    dm.y * ds.y, with ds = half2(d8, sum of the unquantized block)."""
    q, scale, offset = offset_parts(raw, Q.Q4_K, (rows, cols))
    hs, ho = scale.half().double().numpy(), offset.half().double().numpy()
    y = np.zeros((x.shape[0], rows))
    for t in range(x.shape[0]):
        for b in range(cols // 32):
            qa, d8, s8 = literal_mmq(x[t, 32 * b:32 * b + 32].numpy(), ds4=True)
            for r in range(rows):
                sumi = float(np.dot(q[r, 32 * b:32 * b + 32].double().numpy(), qa))
                y[t, r] += hs[r, b] * d8 * sumi - ho[r, b] * s8
    return y


@pytest.mark.parametrize("qtype,T,literal", [(Q.Q5_0, 3, literal_q5_0_mmvq), (Q.Q4_K, 12, literal_q4_k_mmq)])
def test_offset_types_take_the_offset_on_unquantized_sums(qtype, T, literal):
    rows, cols = 5, 256
    raw = random_raw(qtype, (rows, cols), seed=2)
    x = torch.randn(T, cols, generator=torch.Generator().manual_seed(3))
    w = dequantize(raw, qtype, (rows, cols))
    mm = numerics.cuda_matmul(qtype.name, lambda: raw, (rows, cols))
    y = mm(x, w).double().numpy()
    lazy = numerics.cuda_matmul(qtype.name, lambda: raw, (rows, cols), keep=False)   # decoded per call
    assert np.array_equal(lazy(x, w).double().numpy(), y) and np.array_equal(mm(x, w).double().numpy(), y)
    want = literal(x, raw, rows, cols)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # the sixth session's mirror (Q8_0-style rounding, offset inside the weight) is measurably off
    old = (numerics.round_q8_0(x) @ w.T).double().numpy()
    assert np.abs(old - want).max() > 100 * np.abs(y - want).max()


def test_token_count_picks_the_kernel():
    """Up to MMVQ_MAX_TOKENS (ggml's MMVQ_MAX_BATCH_SIZE, 8) tokens MMVQ's rounding, above it MMQ's."""
    assert MMVQ_MAX_TOKENS == 8
    raw = random_raw(Q.Q8_0, (4, 64), seed=4)
    w = dequantize(raw, Q.Q8_0, (4, 64))
    mm = CudaQuantMatMul("Q8_0")
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(5))
    eight, nine = mm(x[:8], w), mm(x, w)
    assert torch.equal(eight, q8_1_mmvq(x[:8])[0] @ w.T)
    assert torch.equal(nine, q8_1_mmq(x, ds4=False)[0] @ w.T)        # Q8_0: D4, float scale


def test_cuda_model_uses_the_kernels_and_gguf_raw_bytes(synth_dir, llama_lib):
    from harness.gguf.load import load_gguf
    from harness.ours.model import Model
    gm = load_gguf(default_fixture("q4_k_m", preset="tiny", seed=0, cache_dir=synth_dir))   # llama.cpp quantizes
    m = Model(gm, mirror="cuda")
    assert isinstance(m.blocks[0].ffn.up.kernel, CudaQuantMatMul)
    name = "blk.0.ffn_up.weight"
    assert torch.equal(dequantize(gm.raw(name), Q[gm.types[name]], gm.weights[name].shape), gm.weights[name])
    assert Model(gm, mirror="cpu").blocks[0].ffn.up.kernel is None


# --- against llama.cpp CUDA's own outputs, recorded on an H100 -----------------------------------

RECORDED = __import__("os").path.join(__import__("os").path.dirname(__file__), "data", "cuda_kernels_tiny.pt")


def _recorded_cases():
    return torch.load(RECORDED)["cases"]


@pytest.mark.parametrize("case", _recorded_cases(), ids=lambda c: f"{c['fixture'][1]}-T{c['x'].shape[0]}-{c['site']}")
def test_the_mirror_reproduces_recorded_llama_cpp_cuda_matmuls(case, synth_dir, request):
    """llama.cpp's CUDA input and output of one weight matmul (blk.1, a tiny fixture of seed 11),
    recorded by ``benchmarks/cuda_numerics.py dump``: our CUDA arithmetic on that input gives its
    output to float32 summation order (MMQ, MMF) or bit for bit (one-token F16: MMVF)."""
    from harness.gguf.load import load_gguf
    from harness.runs.store import sha256_file
    from harness.ours.model import Model
    from harness.sites import LAYER_WEIGHTS
    preset, wtype, seed, tied = case["fixture"]
    if wtype != "f16":
        request.getfixturevalue("llama_lib")            # skips where llama.cpp's quantizer is missing
    path = default_fixture(wtype, preset=preset, seed=seed, cache_dir=synth_dir)
    if sha256_file(path) != case["sha256"]:
        pytest.skip("this machine's synthesizer wrote a different fixture than the recorded one")
    gm = load_gguf(path)
    name = f"blk.1.{LAYER_WEIGHTS[case['site']]}"
    block = Model(gm, mirror="cuda").blocks[1]
    mm = block.attn.mq if case["site"] == "q_proj" else block.ffn.down
    x, want = case["x"], case["y"]
    got = mm(x)
    rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
    if wtype == "f16" and x.shape[0] == 1:
        assert torch.equal(got, want)
    else:
        assert rel < 2e-6, rel
    before = (x if wtype == "f16" else numerics.round_q8_0(x)) @ gm.weights[name].T   # the sixth session's
    before_rel = ((before.double() - want.double()).norm() / want.double().norm()).item()
    if x.shape[0] > MMVQ_MAX_TOKENS or wtype == "f16":  # where the sixth session's mirror was off
        assert before_rel > 50 * rel


@pytest.mark.parametrize("site", ["q_proj", "ffn_out"])
def test_one_token_f16_matches_llama_cpp_cuda_on_real_widths(site):
    """Sixteen rows of the 0.5B-shaped F16 file's blk.1 matrices (896 and 4,864 columns: two and
    eleven half2 steps per thread, where the fused multiply-add of mul_mat_vec_f's half accumulation
    shows) at decode step 1, with llama.cpp CUDA's recorded input and outputs."""
    case = next(c for c in torch.load(RECORDED)["mmvf_rows"]["cases"] if c["site"] == site)
    got = numerics.CudaHalfMatMul()(case["x"], case["w"].float())
    assert torch.equal(got, case["y"]), (got - case["y"]).abs().max()


def test_cuda_activation_rounder_follows_the_token_count():
    """act_rounder(..., "cuda") (the probes' look-alike checks): the rounding alone of the kernel."""
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(6))
    q4k, q8 = numerics.act_rounder("Q4_K", "cuda"), numerics.act_rounder("Q8_0", "cuda")
    assert torch.equal(q4k(x), q8_1_mmq(x, ds4=True)[0]) and torch.equal(q8(x), q8_1_mmq(x, ds4=False)[0])
    assert torch.equal(q4k(x[:8]), q8_1_mmvq(x[:8])[0])
    assert torch.equal(numerics.act_rounder("F16", "cuda")(x), x.half().float())
    assert numerics.act_rounder("F32", "cuda") is None


def test_one_rounding_to_half_equals_numpys_double_to_half():
    """The F16 emulation's single float64 -> float16 rounding (ties to even, subnormals) against
    numpy's own float64 -> float16 conversion, on random values, exact ties and subnormal ties."""
    import numpy as np
    g = np.random.default_rng(0)
    v = np.concatenate([g.standard_normal(20000) * s for s in (1e-6, 1e-4, 1.0, 100.0, 1e4)])
    h = g.standard_normal(20000).astype(np.float16).astype(np.float64)
    ties = h + np.sign(h) * 2.0 ** (np.floor(np.log2(np.maximum(abs(h), 2.0 ** -24))) - 11)
    sub = (g.integers(-2000, 2000, 2000) + 0.5) * 2.0 ** -24
    v = np.concatenate([v, ties, sub, [0.0, -0.0, 65504.0]])
    v = v[abs(v) < 65504.5]
    want = torch.from_numpy(v.astype(np.float16).astype(np.float64))
    assert torch.equal(numerics.to_half_once(torch.from_numpy(v)), want)


def test_cuda_mirror_keeps_q_in_float32_for_one_token_scores(tiny_f32):
    """kq at llama.cpp's GGML_PREC_F32: at one token CUDA's mul_mat_vec_f multiplies the F16 K by
    the float32 q (no conversion); above one token (mul_mat_f, cuBLAS) and on the CPU
    (vec_dot_f16) q is rounded to F16 first, and so is it at one token where n_kv exceeds 512 cells
    with several KV heads (ggml_cuda_should_use_mmvf: 32k-token CUDA runs flagged kq without that).
    The mirrors' kq against those formulas on their own q_rope and cached k_rope, at the prefill
    (8 and 600 tokens) and one decode step."""
    from harness.ours.model import load_model
    prompt = [3, 14, 15, 92, 65, 35, 89, 79]

    def scores(q, k, group, round_q):
        q = q.half().float() if round_q else q
        return torch.einsum("thd,phd->htp", q, k.half().float().repeat_interleave(group, dim=1))

    long_prompt = [3 + (7 * i) % 1000 for i in range(600)]          # n_kv 768 > 512, 2 KV heads
    for mirror, prompt in (("cuda", prompt), ("cpu", prompt), ("cuda", long_prompt)):
        m = load_model(tiny_f32, kv_dtype=torch.float16, mirror=mirror)
        tr = m.run_with_cache(prompt, steps=1)
        g = m.config.n_head // m.config.n_head_kv
        k_all = torch.cat([tr[0, "blk.1.k_rope"], tr[1, "blk.1.k_rope"]])
        for step, k in ((0, tr[0, "blk.1.k_rope"]), (1, k_all)):
            q = tr[step, "blk.1.q_rope"]
            rounded = not (mirror == "cuda" and step == 1 and len(prompt) < 512)
            assert torch.equal(tr[step, "blk.1.kq"], scores(q, k, g, rounded)), (mirror, step)
            assert not torch.equal(tr[step, "blk.1.kq"], scores(q, k, g, not rounded)), (mirror, step)


def test_batched_mmvf_half_is_the_emulation_per_batch():
    """mmvf_half with leading dims (the kqv mirror: one mul_mat_vec_f per head) equals the
    emulation applied to each (x, w) pair; on the CPU both run the emulation."""
    g = torch.Generator().manual_seed(8)
    x, w = torch.randn(3, 1, 320, generator=g), torch.randn(3, 24, 320, generator=g)
    got = numerics.mmvf_half(x, w)
    assert got.shape == (3, 1, 24)
    for b in range(3):
        assert torch.equal(got[b], numerics.mmvf_half_emulated(x[b], w[b]))
    assert torch.equal(numerics.mmvf_half(x[0], w[0]), got[0])


@pytest.mark.parametrize("T", [1, 12, 40])
def test_cuda_kqv_takes_ggml_cudas_kernel_for_the_token_count(T):
    """kqv over an F16 cache (benchmarks/cuda_numerics.py on the H100, bit for bit at 1 and 64 tokens):
    one token, mul_mat_vec_f per head over the n_kv cells (P padded to 256: its block size follows
    n_kv, so 600 cells reduce as 768); up to 16 tokens F16 operands with float sums; more, cuBLAS's
    F16 compute (on a CPU only its F16 result is mirrored)."""
    g = torch.Generator().manual_seed(9)
    H, Hkv, Dh, P = 4, 2, 32, 600
    w = torch.softmax(torch.randn(H, T, P, generator=g) * 3, dim=-1)
    v = torch.randn(P, Hkv, Dh, generator=g).half().float()
    vt = v.repeat_interleave(2, dim=1).permute(1, 2, 0)                      # (H, Dh, P)
    got = numerics.cuda_kqv(w, v, 2)
    assert got.shape == (T, H, Dh)
    floats = (w.half().float() @ vt.transpose(1, 2)).permute(1, 0, 2)
    if T == 1:
        pad = torch.nn.functional.pad
        want = torch.stack([numerics.mmvf_half_emulated(pad(w[h], (0, 168)), pad(vt[h], (0, 168)))
                            for h in range(H)], dim=1)
        unpadded = torch.stack([numerics.mmvf_half_emulated(w[h], vt[h]) for h in range(H)], dim=1)
        assert not torch.equal(want, unpadded)                  # the 256-cell padding matters
        assert torch.equal(got, want)
        assert not torch.equal(got, floats)
    elif T <= numerics.MMF_MAX_TOKENS:
        assert torch.equal(got, floats)
    else:
        assert torch.equal(got, floats.half().float())


def test_one_token_vec_kernel_choice_follows_ggml_cuda():
    """ggml_cuda_should_use_mmvf for F16 on Ampere and later: one token, src0 of at most 512 rows
    or a single channel; n_kv is the used cells rounded up to 256."""
    assert [numerics.kv_cells(p) for p in (1, 256, 257, 600)] == [256, 256, 512, 768]
    assert numerics.cuda_one_token_vec(512, 2) and not numerics.cuda_one_token_vec(768, 2)
    assert numerics.cuda_one_token_vec(33024, 1)
    g = torch.Generator().manual_seed(10)
    w = torch.softmax(torch.randn(2, 1, 40, generator=g), dim=-1)
    v = torch.randn(40, 2, 640, generator=g).half().float()                   # head_dim 640 > 512 rows
    want = (w.half().float() @ v.permute(1, 2, 0).transpose(1, 2)).permute(1, 0, 2)
    assert torch.equal(numerics.cuda_kqv(w, v, 1), want)
