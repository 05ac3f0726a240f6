"""Independent check of our PyTorch model: same weights through Hugging Face transformers' Qwen2
and Qwen3 (per-head Q/K norms, head size 128 where d_model / n_head is 64)."""
import pytest
import torch

from harness.ours.model import load_model

transformers = pytest.importorskip("transformers")

PROMPT = [5, 17, 300, 42, 7, 999, 123, 64]
STEPS = 4


def _hf_model(model):
    cfg, w = model.config, model.gguf.weights
    common = dict(
        vocab_size=cfg.n_vocab, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head_kv,
        rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_base, max_position_embeddings=cfg.n_ctx,
        tie_word_embeddings=model.gguf.tied, use_sliding_window=False, attn_implementation="eager")
    if cfg.architecture == "qwen3":
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=cfg.head_dim, **common)).eval()
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()
    sd = {"model.embed_tokens.weight": w["token_embd.weight"], "model.norm.weight": w["output_norm.weight"],
          "lm_head.weight": w["token_embd.weight"] if model.gguf.tied else w["output.weight"]}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    for i in range(cfg.n_layer):
        for hf_name, g in names.items():
            if f"blk.{i}.{g}.weight" not in w:         # q/k norms: qwen3 only
                continue
            sd[f"model.layers.{i}.{hf_name}.weight"] = w[f"blk.{i}.{g}.weight"]
            if f"blk.{i}.{g}.bias" in w:
                sd[f"model.layers.{i}.{hf_name}.bias"] = w[f"blk.{i}.{g}.bias"]
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def tiny_qwen3(synth_dir):
    from harness.synth import default_fixture
    return default_fixture("f32", preset="tiny-qwen3", seed=0, cache_dir=synth_dir)


@pytest.mark.parametrize("case", ["qwen2", "qwen2-tied", "qwen3"])
def test_logits_and_hidden_states_match_transformers(tiny_f32, tiny_tied_f32, tiny_qwen3, case):
    model = load_model({"qwen2": tiny_f32, "qwen2-tied": tiny_tied_f32, "qwen3": tiny_qwen3}[case])
    assert model.config.architecture == case.split("-")[0]
    hf = _hf_model(model)
    trace = model.run_with_cache(PROMPT, steps=STEPS)
    tokens = trace.tokens
    with torch.no_grad():
        out = hf(torch.tensor([tokens[:len(PROMPT)]]), use_cache=True, output_hidden_states=True)
        steps_out = [out]
        for k in range(STEPS):
            out = hf(torch.tensor([[tokens[len(PROMPT) + k]]]), past_key_values=out.past_key_values,
                     use_cache=True, output_hidden_states=True)
            steps_out.append(out)
    n = model.config.n_layer
    worst = 0.0
    for step, o in enumerate(steps_out):
        worst = max(worst, _rel(trace[step, "logits"], o.logits[0]))
        hs = o.hidden_states
        assert len(hs) == n + 1
        assert _rel(trace[step, "embd"], hs[0][0]) < 1e-6
        for i in range(n - 1):
            worst = max(worst, _rel(trace[step, f"blk.{i}.l_out"], hs[i + 1][0]))
        # transformers returns the last hidden state after the final norm
        worst = max(worst, _rel(trace[step, "output_norm"], hs[n][0]))
    assert worst < 1e-5, worst
    # greedy decode picked the same tokens transformers would
    for step, o in enumerate(steps_out[:-1]):
        assert tokens[len(PROMPT) + step] == int(o.logits[0, -1].argmax())
