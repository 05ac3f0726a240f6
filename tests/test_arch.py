"""The architecture seam (harness.gguf.arch): the reader, our model and the capture mapping read
the ArchSpec of the file's architecture instead of assuming qwen2."""
import pytest
import torch

from harness.gguf import arch
from harness.gguf.arch import ARCHS, QWEN2, ArchSpec
from harness.gguf.load import GGUFError, load_gguf, read_config_file
from harness.llama.capture import graph_node_sites, node_site
from harness.ours.inject import REGISTRY
from harness.ours.model import load_model
from harness.sites import SITES, all_sites
from tests.gguf_edit import rewrite

PROMPT = [5, 17, 300, 42]


def test_qwen2_is_registered_with_every_site():
    assert ARCHS["qwen2"] is QWEN2 and QWEN2.prefix == "qwen2"
    assert QWEN2.sites == tuple(s.key for s in SITES if s.key not in ("q_norm", "k_norm"))
    assert QWEN2.qkv_bias and not QWEN2.qk_norm and QWEN2.rope == "neox"
    assert "attn_q.bias" in QWEN2.layer_tensors and "output.weight" in QWEN2.optional
    assert QWEN2.graph_names()["q"] == ("Qcur", "ADD") and QWEN2.graph_names()["q_proj"] == ("Qcur", "MUL_MAT")
    assert node_site("Qcur-2", "ROPE", graph_node_sites(QWEN2)) == "blk.2.q_rope"


def test_config_names_its_architecture(tiny_f32):
    cfg = read_config_file(tiny_f32)
    assert cfg.architecture == "qwen2" and cfg.spec is QWEN2 and cfg.key_length is None and cfg.head_dim == 64


def test_key_length_sets_the_head_size(tmp_path, tiny_f32):
    """attention.key_length, when a file states it, is the head size (not d_model / n_head):
    a file claiming 32 must have (4 * 32, 256) Q projections, and this one has (256, 256)."""
    same = rewrite(tiny_f32, tmp_path / "kl64.gguf", set_keys={"qwen2.attention.key_length": 64})
    assert read_config_file(same).head_dim == 64 and len(load_gguf(same).weights) > 0
    half = rewrite(tiny_f32, tmp_path / "kl32.gguf", set_keys={"qwen2.attention.key_length": 32})
    assert read_config_file(half).head_dim == 32
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_q\.weight has shape \[256, 256\], expected \[128, 256\]"):
        load_gguf(half)


def test_a_second_architecture_is_one_spec(monkeypatch, tmp_path, tiny_f32):
    """A made-up architecture without QKV biases: its spec (no bias tensors, no q/k/v sites) is
    all the reader and our model need; the run equals qwen2 with the biases dropped."""
    layer = {k: v for k, v in QWEN2.layer_tensors.items() if not k.endswith(".bias")}
    nobias = ArchSpec(name="nobias", layer_tensors=layer, qkv_bias=False,
                      sites=tuple(k for k in QWEN2.sites if k not in ("q", "k", "v")))
    monkeypatch.setitem(arch.ARCHS, "nobias", nobias)
    biases = [f"blk.{i}.attn_{x}.bias" for i in range(3) for x in "qkv"]
    path = rewrite(tiny_f32, tmp_path / "nobias.gguf", arch="nobias", drop=biases)
    model = load_model(path)
    assert model.config.architecture == "nobias"
    trace = model.run_with_cache(PROMPT, 1)
    assert {n for _, n in trace.keys()} == set(all_sites(3, nobias.sites))
    assert "blk.0.q" not in {n for _, n in trace.keys()} and len(all_sites(3, nobias.sites)) == 3 + 3 * 17
    ref = load_model(tiny_f32)
    with ref.hooks(REGISTRY["drop_qkv_bias"].hooks):
        want = ref.run_with_cache(PROMPT, 1)
    for key in trace.keys():
        assert torch.equal(trace[key], want[key]), key


def test_an_architecture_our_model_lacks_is_refused_in_one_line(monkeypatch, tmp_path, tiny_f32):
    monkeypatch.setitem(arch.ARCHS, "normrope", ArchSpec(name="normrope", layer_tensors=QWEN2.layer_tensors,
                                                         sites=QWEN2.sites, rope="norm"))
    path = rewrite(tiny_f32, tmp_path / "normrope.gguf", arch="normrope")
    with pytest.raises(GGUFError, match="'normrope' needs norm RoPE, which our model does not implement yet"):
        load_model(path)


def test_qwen3_every_site_matches_llama_cpp(synth_dir):
    """tiny-qwen3 (head size 128 from key_length, d_model / n_head = 64): llama.cpp's graph has
    every qwen3 site (Qcur_normed / Kcur_normed for the head norms, no bias adds), and our model
    agrees with it site by site (F32 weights, F32 KV cache)."""
    from harness.gguf.arch import QWEN3
    from harness.llama.runner import LlamaOptions, LlamaRunner
    from harness.synth import default_fixture
    path = default_fixture("f32", preset="tiny-qwen3", seed=0, cache_dir=synth_dir)
    with LlamaRunner(path, LlamaOptions(device="cpu", kv_type="f32", isolate=False)) as r:
        ref = r.run(PROMPT, 2)
    assert ref.meta["unavailable"] == [] and r.config.head_dim == 128 and r.config.d_model // r.config.n_head == 64
    names = all_sites(3, QWEN3.sites)
    assert set(ref.tensors) == {(s, n) for s in range(3) for n in names}
    ours = load_model(path).run_with_cache(ref.tokens[:len(PROMPT)], 2, ref.tokens[len(PROMPT):])
    for key, x in ref.items():
        rel = float((ours[key].double() - x.double()).norm() / x.double().norm())
        assert rel < 2e-6, (key, rel)
