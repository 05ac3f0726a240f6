"""GPU path: llama.cpp's CUDA build against PyTorch on CUDA. Skipped cleanly without a GPU."""
import pytest
import torch

from harness.diff import DiffRequest, diff_gguf, diff_on_device, model_for
from harness.trace import Trace

pytestmark = pytest.mark.gpu
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from harness.llama.lib import LlamaUnavailable, llama
    try:
        if not llama().llama_supports_gpu_offload():
            pytest.skip("llama-cpp-python has no GPU offload in this build")
    except LlamaUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def cuda_ref(tiny_f32):
    from harness.llama.runner import LlamaOptions, LlamaRunner
    with LlamaRunner(tiny_f32, LlamaOptions(device="cuda", keep_on_device=True), 64) as r:
        ref = r.run(PROMPT, 3)
    assert ref.meta["backend"] == "cuda"
    return ref


def test_cuda_capture_has_every_site_on_the_gpu(cuda_ref):
    assert len(cuda_ref) == 4 * (3 * 20 + 3)
    assert all(t.is_cuda for _, t in cuda_ref.items())


def test_cuda_runs_turn_llama_cpps_cuda_graphs_off(cuda_ref):
    """Set before llama.cpp's first graph compute (it reads it once per process): micro-batched
    prompts aborted with an illegal instruction with CUDA graphs on (RESULTS.md, ninth session)."""
    import os
    if os.environ.get("LLAMADIFF_CUDA_GRAPHS") == "1":
        pytest.skip("LLAMADIFF_CUDA_GRAPHS=1 keeps llama.cpp's CUDA graphs on")
    assert os.environ.get("GGML_CUDA_DISABLE_GRAPHS") is not None


@pytest.mark.parametrize("wtype", ["f32", "f16", "q8_0", "q4_k_m"])
def test_clean_tiny_on_cuda_has_no_divergence(synth_dir, wtype):
    from harness.synth import default_fixture
    path = default_fixture(wtype, preset="tiny", seed=0, cache_dir=synth_dir)
    res = diff_on_device(DiffRequest(path, tokens=PROMPT, steps=4, device="cuda"))
    c = res.comparison
    assert len(c.table) == 5 * 63
    assert not c.diverged, c.first and c.first.explanation


def test_drop_bias_localized_on_cuda(tiny_f32):
    from harness.ours.inject import REGISTRY
    res = diff_on_device(DiffRequest(tiny_f32, tokens=PROMPT, steps=2, device="cuda",
                                     faults=[REGISTRY["drop_qkv_bias"]]))
    f = res.comparison.first
    assert (f.step, f.layer, f.site) == (0, 0, "blk.0.q")


def test_on_device_comparison_equals_host_path(tiny_f32, cuda_ref):
    req = DiffRequest(tiny_f32, tokens=PROMPT, steps=3, device="cuda")
    model = model_for(req, cuda_ref)
    host_ref = Trace(cuda_ref.n_layer, cuda_ref.tokens, cuda_ref.n_prompt, dict(cuda_ref.meta),
                     {k: v.cpu() for k, v in cuda_ref.tensors.items()})
    host = diff_gguf(req, model=model, ref=host_ref).comparison.table
    dev = diff_on_device(req, model=model, ref=cuda_ref).comparison.table
    assert list(host["site"]) == list(dev["site"]) and list(host["step"]) == list(dev["step"])
    assert list(host["passed"]) == list(dev["passed"])
    assert list(host["local_passed"]) == list(dev["local_passed"])
    for col in ("rel_l2", "max_abs", "local_rel_l2"):
        assert torch.allclose(torch.tensor(host[col].astype(float).values), torch.tensor(dev[col].astype(float).values),
                              rtol=1e-6, atol=1e-12), col


@pytest.mark.parametrize("wtype", ["f16", "q4_k_m"])
def test_lazy_weights_on_cuda_equal_eager_and_capture_equals_host_copy(synth_dir, wtype):
    """Layer-by-layer weights on the GPU: same site tensors as the eager load, bit for bit; and
    llama.cpp's nodes copied on the device equal the same nodes copied to the host."""
    from harness.llama.runner import LlamaOptions, LlamaRunner
    from harness.ours.model import load_model
    from harness.synth import default_fixture
    path = default_fixture(wtype, preset="tiny", seed=0, cache_dir=synth_dir)
    eager = load_model(path, device="cuda", kv_dtype=torch.float16, mirror="cuda")
    lazy = load_model(path, device="cuda", kv_dtype=torch.float16, mirror="cuda", lazy_weights=True)
    a, b = eager.run_with_cache(PROMPT, 2), lazy.run_with_cache(PROMPT, 2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a.keys())
    with LlamaRunner(path, LlamaOptions(device="cuda", keep_on_device=True), 64) as r:
        dev = r.run(PROMPT, 2)
        r.on_device = False
        host = r.run(PROMPT, 2)
    assert dev.keys() == host.keys() and len(dev) == 3 * (3 * 20 + 3)
    assert all(dev[k].is_cuda and not host[k].is_cuda and torch.equal(dev[k].cpu(), host[k]) for k in dev.keys())


def test_isolated_cuda_capture_comes_over_by_ipc_and_equals_in_process(tiny_f32, cuda_ref):
    """llama.cpp in its worker process: the captured tensors arrive on this GPU (CUDA IPC, no
    host copy), bit for bit the same as an in-process capture."""
    from harness.llama.runner import LlamaOptions
    from harness.llama.worker import IsolatedRunner
    with IsolatedRunner(tiny_f32, LlamaOptions(device="cuda", keep_on_device=True), 64) as r:
        iso = r.run(PROMPT, 3)
    assert iso.meta["isolated"] is True and iso.keys() == cuda_ref.keys()
    assert all(iso[k].is_cuda and torch.equal(iso[k], cuda_ref[k]) for k in cuda_ref.keys())


def test_rope_mirrors_cuda_fast_math_at_long_positions(tiny_f32, monkeypatch):
    """ggml-cuda's RoPE uses -use_fast_math intrinsics (__powf, __sinf, __cosf): their angles
    drift from float32 ones as the position grows. The mirror compiles the same intrinsics, so
    q_rope/k_rope agree to float32 rounding at 1,900 positions; the accurate-float32 fallback
    does not (this test fails if the mirror silently falls back)."""
    import harness.ours.model as model_mod
    tokens = [3 + (7 * i) % 1000 for i in range(1900)]
    req = DiffRequest(tiny_f32, tokens=tokens, steps=1, device="cuda", ubatch=0)

    def worst_rope() -> float:
        t = diff_on_device(req).comparison.table
        rows = t[t.site.str.endswith("q_rope") | t.site.str.endswith("k_rope")]
        assert len(rows) == 2 * 3 * 2         # q and k, 3 layers, prefill and one decode step
        return float(rows.local_rel_l2.astype(float).max())

    fast = worst_rope()
    from harness.ours.numerics import fast_rope_status
    assert fast_rope_status() == "compiled"
    monkeypatch.setattr(model_mod, "fast_rope_cos_sin", lambda *a: None)
    accurate = worst_rope()
    assert fast < 1e-6, fast
    assert accurate > 10 * fast, (accurate, fast)


def test_compiled_mmvf_gives_the_emulations_bits():
    """The one-token F16 matmul as one compiled kernel (numerics.mmvf_half) against the float64
    emulation it replaces, on block sizes 32 to 256, one to 37 half2 steps per thread, odd row
    counts and a batch (the kqv mirror's heads)."""
    from harness.ours import numerics
    g = torch.Generator(device="cuda").manual_seed(3)
    for B, R, K in ((0, 5, 64), (0, 33, 130), (0, 896, 896), (0, 7, 4864), (0, 3, 18944), (14, 64, 768)):
        shape_w, shape_x = ((B, R, K), (B, 1, K)) if B else ((R, K), (1, K))
        w = torch.randn(*shape_w, generator=g, device="cuda")
        x = torch.randn(*shape_x, generator=g, device="cuda") * 8
        got = numerics.mmvf_half(x, w)
        want = torch.stack([numerics.mmvf_half_emulated(a, b) for a, b in zip(x, w)]) if B else \
            numerics.mmvf_half_emulated(x, w)
        assert torch.equal(got, want), (B, R, K)
    assert numerics.mmvf_kernel_status() == "compiled"


def test_attention_mirrors_cudas_kq_and_kqv_kernels(synth_dir):
    """kq at one token keeps q in float32 (mul_mat_vec_f at GGML_PREC_F32); kqv takes
    mul_mat_vec_f's half sums at one token and cuBLAS's F16 compute above 16 tokens. Before these
    mirrors the tiny F16 file's local errors were 2e-4 to 3e-4 (kq, decode; kqv, 40-token prefill)
    and 4e-5 (kqv, decode) (benchmarks/cuda_numerics.py on the H100)."""
    from harness.synth import default_fixture
    path = default_fixture("f16", preset="tiny", seed=0, cache_dir=synth_dir)
    tokens = [3 + (11 * i) % 500 for i in range(40)]
    t = diff_on_device(DiffRequest(path, tokens=tokens, steps=2, device="cuda")).comparison.table
    rows = t[t.site.str.endswith(".kq") | t.site.str.endswith(".kqv")]
    assert len(rows) == 2 * 3 * 3 and set(rows.step) == {0, 1, 2}
    worst = rows.groupby([rows.site.str.rsplit(".", n=1).str[-1], rows.step > 0]).local_rel_l2.max()
    assert (worst.astype(float) < 1e-5).all(), worst


def test_one_token_scores_round_q_past_512_kv_cells_on_cuda(synth_dir):
    """Past 512 cells of n_kv with several KV heads, ggml-cuda's one-token kq leaves mul_mat_vec_f
    (ggml_cuda_should_use_mmvf) for a kernel that rounds q to F16; the mirror follows (the 32k and
    7B 8k rows flagged kq at decode step 1 while it kept q float; RESULTS.md, tenth session)."""
    from harness.synth import default_fixture
    path = default_fixture("f16", preset="tiny", seed=0, cache_dir=synth_dir)
    tokens = [3 + (11 * i) % 500 for i in range(600)]
    t = diff_on_device(DiffRequest(path, tokens=tokens, steps=2, device="cuda")).comparison.table
    rows = t[t.site.str.endswith(".kq") & (t.step > 0)]
    assert len(rows) == 2 * 3
    assert (rows.local_rel_l2.astype(float) < 1e-5).all(), rows.local_rel_l2.tolist()
