"""transformers as a candidate (harness.hf): its model of our GGUF, hooked at our sites, agrees with
our model at every site and with llama.cpp end to end; a planted bug in the HF module is found at
its exact (step, layer, site); transformers' failures are one-line HFErrors."""
import importlib.util
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed: no Hugging Face candidate to test")

from harness.compare.comparator import compare_traces  # noqa: E402
from harness.compare.tolerance import Policy  # noqa: E402
from harness.diff import DiffRequest, capture_reference  # noqa: E402
from harness.gguf.load import GGUFError  # noqa: E402
from harness.hf.trace import HFError, hf_trace, hf_trace_like, load_hf  # noqa: E402
from harness.ours.model import load_model  # noqa: E402
from harness.sites import all_sites  # noqa: E402
from harness.gguf.arch import ARCHS  # noqa: E402
from tests.gguf_edit import rewrite  # noqa: E402

PROMPT = [5, 17, 300, 42, 7, 999, 123, 64]
STEPS = 3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _against_ours(path):
    hf = hf_trace(path, PROMPT, steps=STEPS)
    ours = load_model(path).run_with_cache(PROMPT, STEPS, hf.tokens[len(PROMPT):])
    return hf, ours


@pytest.fixture(scope="module")
def hf_f32(tiny_f32):
    return load_hf(tiny_f32)


@pytest.mark.parametrize("case", ["qwen2", "qwen2-tied", "qwen3"])
def test_every_site_matches_our_model(tiny_f32, tiny_tied_f32, tiny_qwen3_f32, case):
    path = {"qwen2": tiny_f32, "qwen2-tied": tiny_tied_f32, "qwen3": tiny_qwen3_f32}[case]
    hf, ours = _against_ours(path)
    arch = ARCHS[case.split("-")[0]]
    assert hf.meta["source"] == "transformers" and hf.meta["architecture"] == arch.name
    assert hf.tokens == ours.tokens and hf.n_prompt == len(PROMPT)   # greedy decode picked the same tokens
    expected = {(s, n) for s in range(STEPS + 1) for n in all_sites(hf.n_layer, arch.sites)}
    assert set(hf.tensors) == set(ours.tensors) == expected
    for key, t in ours.items():
        assert hf[key].shape == t.shape, key
        assert hf[key].dtype == torch.float32
        assert _rel(hf[key], t) < 1e-5, (key, _rel(hf[key], t))


def test_quantized_gguf_is_dequantized_by_transformers_like_ours(tiny_gguf, tiny_f32, request):
    """Every weight type of the tiny preset (Q8_0, Q4_K_M made by llama.cpp's quantizer): transformers'
    dequantization and ours give the same model to float32 roundoff, and it is not the F32 model."""
    hf, ours = _against_ours(tiny_gguf)
    worst = max(_rel(hf[k], t) for k, t in ours.items())
    assert worst < 1e-5, worst
    if request.node.callspec.params["tiny_gguf"] != "f32":
        f32 = hf_trace(tiny_f32, PROMPT, 0, sites="logits")
        assert _rel(hf[0, "logits"], f32[0, "logits"]) > 1e-4


@pytest.fixture(scope="module")
def llama_f32_ref(tiny_f32, llama_lib):
    return capture_reference(DiffRequest(tiny_f32, tokens=PROMPT, steps=STEPS, kv_type="f32"))


def _vs_llama(hf_model, ref):
    hf = hf_trace_like(hf_model, ref)
    return hf, compare_traces(hf, ref, Policy("cpu", "F32"))


def test_no_divergence_from_llama_cpp(hf_f32, llama_f32_ref):
    hf, cmp = _vs_llama(hf_f32, llama_f32_ref)
    assert hf.tokens == llama_f32_ref.tokens
    assert cmp.meta["compared"] == len(llama_f32_ref) and cmp.meta["missing_in_ours"] == 0
    assert cmp.first is None and cmp.first_e2e is None, cmp.first
    assert max(_rel(hf[k], r) for k, r in llama_f32_ref.items()) < 1e-4


def _zero_largest_q_bias(hf):
    bias = hf.model.layers[0].self_attn.q_proj.bias
    bias[bias.abs().argmax()] = 0.0


def _scale_an_up_row(hf):
    hf.model.layers[2].mlp.up_proj.weight[7] *= 1.1


@pytest.mark.parametrize("bug, expected", [(_zero_largest_q_bias, (0, 0, "blk.0.q")),
                                           (_scale_an_up_row, (0, 2, "blk.2.ffn_up"))])
def test_a_broken_hf_module_is_found_at_its_site(tiny_f32, llama_f32_ref, bug, expected):
    """A bug planted in the HF modules (one element of layer 0's q bias, its largest outlier,
    zeroed; one row of layer 2's up projection scaled by 1.1): the first divergence is at its exact
    (step, layer, site); the op's input (q_proj before the bias, ffn_norm) still agrees."""
    broken = load_hf(tiny_f32)
    with torch.no_grad():
        bug(broken.model)
    hf, cmp = _vs_llama(broken, llama_f32_ref)
    assert (cmp.first.step, cmp.first.layer, cmp.first.site) == expected
    row = cmp.table.set_index(["step", "site"])
    before = {"blk.0.q": "blk.0.q_proj", "blk.2.ffn_up": "blk.2.ffn_norm"}[expected[2]]
    assert bool(row.loc[(0, before), "passed"]) and not bool(row.loc[(0, expected[2]), "passed"])


def test_site_filter_and_greedy_steps(hf_f32):
    tr = hf_trace(hf_f32, PROMPT, steps=2, sites="blk.1.q_rope,logits")
    assert set(tr.tensors) == {(s, n) for s in range(3) for n in ("blk.1.q_rope", "logits")}
    cfg = hf_f32.model.config
    H = cfg.num_attention_heads
    assert tr[0, "blk.1.q_rope"].shape == (len(PROMPT), H, cfg.hidden_size // H)
    assert tr[1, "logits"].shape[0] == 1 and tr.tokens[-1] == int(tr[1, "logits"][-1].argmax())


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                    reason="accelerate is not installed: transformers' from_pretrained refuses GGUF files")
def test_from_pretrained_and_the_reader_give_the_same_model(tiny_f32, hf_f32):
    fp = load_hf(tiny_f32, load="from_pretrained")
    assert fp.meta["load_path"].startswith("from_pretrained")
    a, b = hf_trace(fp, PROMPT, STEPS), hf_trace(load_hf(tiny_f32, load="reader"), PROMPT, STEPS)
    assert all(torch.equal(a[k], b[k]) for k in b.keys())


def test_errors_are_one_line(tiny_f32, tmp_path, monkeypatch):
    assert issubclass(HFError, GGUFError)        # the CLI maps GGUFError to exit 2
    dropped, llama = tmp_path / "dropped.gguf", tmp_path / "llama.gguf"
    rewrite(tiny_f32, str(dropped), drop=("blk.1.ffn_up.weight",))
    rewrite(tiny_f32, str(llama), arch="llama")
    reshaped = tmp_path / "reshaped.gguf"                     # a shape transformers' model cannot take
    rewrite(tiny_f32, str(reshaped), reshape={"blk.0.ffn_up.weight": (256, 512)})
    with pytest.raises(HFError, match=r"cannot load reshaped.gguf .*model.layers.0.mlp.up_proj.weight") as e:
        load_hf(reshaped)
    assert "\n" not in str(e.value)
    with pytest.raises(HFError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]") as e:
        load_hf(dropped, load="reader")          # not left randomly initialised
    assert "\n" not in str(e.value)
    with pytest.raises(HFError, match="architecture 'llama' has no Hugging Face candidate"):
        load_hf(llama)
    with pytest.raises(GGUFError, match="no such file"):
        load_hf(tmp_path / "none.gguf")
    with pytest.raises(HFError, match="token id 100000 out of range"):
        hf_trace(tiny_f32, [1, 100000])
    monkeypatch.setitem(sys.modules, "transformers", None)      # import transformers -> ImportError
    with pytest.raises(HFError, match="transformers is not usable") as e:
        load_hf(tiny_f32)
    assert "\n" not in str(e.value)
