"""The Hugging Face transformers model of a GGUF, hooked at our sites: an independent candidate.

transformers builds the model from the GGUF with its own reader, dequantization and tensor-name
mapping (``from_pretrained(..., gguf_file=...)``, or, where ``accelerate`` is missing and
``from_pretrained`` refuses GGUF files, the same reader called directly: ``load_gguf_checkpoint``
into a model made ``from_config``; the trace meta's ``load_path`` says which). It runs in
float32 with transformers' eager attention, prefill then teacher-forced decode steps on its own
KV cache (``DynamicCache``) at llama.cpp's positions.

Every site is a value transformers itself computed, read by forward hooks, with two exceptions
that are derived from HF's own tensors: ``q_proj``/``k_proj``/``v_proj`` (HF's Linear fuses the
bias; the pre-bias value is ``F.linear(input, weight)`` on the module's own input and weight) and
``kq`` (the unscaled ``query @ key^T`` that eager attention forms and scales in one expression;
recomputed by eager's own expression from the query and cached keys it received). The attention function
is transformers' ``eager_attention_forward``, called through a registered wrapper
(``AttentionInterface``) that also reads its query (q_rope), cached keys (k_rope: the last T),
attention weights and output (kqv).
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.gguf.load import GGUFError, file_type_name, open_gguf, tensor_types
from harness.provenance import machine_provenance
from harness.sites import SiteFilter
from harness.trace import Trace

ATTENTION = "llamadiff_eager"        # our registered wrapper of transformers' eager attention
ARCHITECTURES = ("qwen2", "qwen3")


class HFError(GGUFError):
    """transformers missing, or unable to build the model of this GGUF; ``str()`` is one line."""


@dataclass
class HFModel:
    model: torch.nn.Module           # a transformers *ForCausalLM, float32, eval, our attention wrapper
    meta: dict                       # source, version, load path, architecture, gguf


def _transformers():
    try:
        import transformers
    except Exception as e:           # ImportError, or a broken install
        raise HFError(f"transformers is not usable ({type(e).__name__}: {_line(e)}); "
                      "pip install transformers for the Hugging Face candidate") from None
    return transformers


def _line(e: BaseException) -> str:
    return " ".join(str(e).split())[:400] or type(e).__name__


@contextlib.contextmanager
def _quiet(transformers):
    """transformers' warnings and the GGUF reader's tqdm bar (stderr) silenced for the block."""
    log = transformers.utils.logging
    level = log.get_verbosity()
    log.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        log.set_verbosity(level)


def _attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' own eager attention of the module's model; hands its tensors to the tap."""
    eager = inspect.getmodule(type(module)).eager_attention_forward
    out, weights = eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    tap = getattr(module, "llamadiff_tap", None)
    if tap is not None:
        tap(module, query, key, weights, out)
    return out, weights


def _register(transformers) -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    transformers.AttentionInterface.register(ATTENTION, _attention)
    # the same additive float mask eager attention gets (a name without one gets no mask at all)
    transformers.AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def _from_pretrained(transformers, path: str):
    folder, name = os.path.split(os.path.abspath(path))
    model, info = transformers.AutoModelForCausalLM.from_pretrained(      # mismatches: reported below
        folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager", output_loading_info=True,
        ignore_mismatched_sizes=True)
    _check_fit(model, info.get("missing_keys", ()), info.get("unexpected_keys", ()),
               info.get("mismatched_keys", ()))
    return model


def _check_fit(model, missing, unexpected, mismatched=()) -> None:
    """Every parameter came from the file (a missing or mismatched one would silently stay randomly
    initialised)."""
    missing = sorted(set(missing) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set()))
    if unexpected or missing or mismatched:
        bad = [f"{k}: file {tuple(a)}, model {tuple(b)}" for k, a, b in mismatched][:2]
        raise ValueError(f"GGUF tensors do not fit {type(model).__name__}: missing {missing[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}, size mismatch {bad}")


def _from_reader(transformers, path: str):
    """transformers' GGUF reader and dequantization without from_pretrained (which wants accelerate)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    folder, name = os.path.split(os.path.abspath(path))
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    _check_fit(model, *model.load_state_dict(tensors, strict=False))
    model.tie_weights()
    return model


def load_hf(gguf_path, load: str = "auto") -> HFModel:
    """transformers' model of the GGUF at ``gguf_path``. ``load``: "from_pretrained", "reader"
    (see the module docstring) or "auto" (from_pretrained where accelerate is installed).
    HFError (one line) when transformers is missing or cannot build it."""
    path = os.fspath(gguf_path)
    hdr = open_gguf(path)                          # GGUFError for a missing or corrupt file
    arch = hdr.fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise HFError(f"{path}: architecture {arch!r} has no Hugging Face candidate here "
                      f"(supported: {', '.join(ARCHITECTURES)})")
    transformers = _transformers()
    if load == "auto":
        load = "from_pretrained" if importlib.util.find_spec("accelerate") else "reader"
    if load not in ("from_pretrained", "reader"):
        raise HFError(f"unknown load path {load!r} (from_pretrained, reader or auto)")
    try:
        with _quiet(transformers):
            _register(transformers)
            model = (_from_pretrained if load == "from_pretrained" else _from_reader)(transformers, path)
            model.set_attn_implementation(ATTENTION)
    except Exception as e:
        raise HFError(f"transformers {transformers.__version__} cannot load {os.path.basename(path)} "
                      f"({load}): {type(e).__name__}: {_line(e)}") from None
    wrong = sorted({str(t.dtype) for t in model.parameters() if t.dtype != torch.float32})
    if wrong:          # from_pretrained(dtype=float32) dequantizes; a packed (GGUF-block) weight is not float32
        raise HFError(f"transformers loaded {os.path.basename(path)} with {', '.join(wrong)} weights, not float32")
    model.eval()
    types = tensor_types(hdr)
    meta = {"source": "transformers", "version": transformers.__version__, "load_path":
            "from_pretrained(gguf_file=...)" if load == "from_pretrained" else "load_gguf_checkpoint + from_config",
            "architecture": arch, "model_class": type(model).__name__, "attention": f"eager ({ATTENTION})",
            "device": "cpu", "dtype": "float32", "gguf": os.path.basename(path), "file_type": file_type_name(hdr),
            "weight_type": types.get("blk.0.ffn_down.weight") or types.get("token_embd.weight", "F32"),
            "kv_type": "f32", "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
            "machine": machine_provenance("cpu")}
    return HFModel(model, meta)


class _Taps:
    """Forward hooks on the HF modules that hand each site's value (our layout) to ``keep``."""

    def __init__(self, hf: torch.nn.Module, keep, filt: SiteFilter | None = None):
        self.hf, self.keep, self.filt, self.step, self.handles = hf, keep, filt, 0, []
        self.n_head, self.n_kv = hf.config.num_attention_heads, hf.config.num_key_value_heads

    def wants(self, name: str) -> bool:
        return self.filt is None or self.filt.wants(self.step, name)

    def put(self, name: str, x: torch.Tensor) -> None:
        if self.wants(name):
            self.keep(self.step, name, x.detach().float().contiguous())

    def on(self, module, name: str, pick=lambda out: out[0]):
        self.handles.append(module.register_forward_hook(lambda m, a, out: self.put(name, pick(out))))

    def before(self, module, name: str):
        self.handles.append(module.register_forward_pre_hook(lambda m, a: self.put(name, a[0][0])))

    def proj(self, module, p: str, key: str, nh: int):
        """``{key}_proj`` before the bias (x @ W^T from the module's own input and weight) and
        ``{key}`` (the module's output), both (T, nh, Dh); no bias: the output is ``{key}_proj``."""
        def hook(m, args, out):
            x = out[0]
            if m.bias is not None:
                self.put(p + key, x.view(x.shape[0], nh, -1))
                if not self.wants(p + key + "_proj"):
                    return
                x = F.linear(args[0][0], m.weight)
            self.put(p + key + "_proj", x.view(x.shape[0], nh, -1))
        self.handles.append(module.register_forward_hook(hook))

    def attention(self, p: str):
        def tap(module, query, key, weights, out):         # (1,H,T,Dh) (1,Hkv,P,Dh) (1,H,T,P) (1,T,H,Dh)
            T = query.shape[2]
            self.put(p + "q_rope", query[0].transpose(0, 1))
            self.put(p + "k_rope", key[0, :, -T:].transpose(0, 1))
            if self.wants(p + "kq"):
                repeat_kv = inspect.getmodule(type(module)).repeat_kv          # eager's own expression
                keys = repeat_kv(key, module.num_key_value_groups)
                self.put(p + "kq", torch.matmul(query, keys.transpose(2, 3))[0])
            self.put(p + "attn_weights", weights[0])
            self.put(p + "kqv", out[0])
        return tap

    def install(self) -> None:
        m = self.hf.model
        self.on(m.embed_tokens, "embd")
        for i, layer in enumerate(m.layers):
            p, a, f = f"blk.{i}.", layer.self_attn, layer.mlp
            self.on(layer.input_layernorm, p + "attn_norm")
            self.proj(a.q_proj, p, "q", self.n_head)
            self.proj(a.k_proj, p, "k", self.n_kv)
            self.proj(a.v_proj, p, "v", self.n_kv)
            if hasattr(a, "q_norm"):                        # qwen3: per-head norms, (1, T, nh, Dh)
                self.on(a.q_norm, p + "q_norm")
                self.on(a.k_norm, p + "k_norm")
            a.llamadiff_tap = self.attention(p)
            self.on(a.o_proj, p + "attn_out")
            self.before(layer.post_attention_layernorm, p + "ffn_inp")
            self.on(layer.post_attention_layernorm, p + "ffn_norm")
            self.on(f.gate_proj, p + "ffn_gate")
            self.on(f.up_proj, p + "ffn_up")
            self.before(f.down_proj, p + "ffn_act")
            self.on(f.down_proj, p + "ffn_out")
            self.on(layer, p + "l_out", lambda out: (out[0] if isinstance(out, tuple) else out)[0])
        self.on(m.norm, "output_norm")
        self.on(self.hf.lm_head, "logits")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for layer in self.hf.model.layers:
            layer.self_attn.__dict__.pop("llamadiff_tap", None)


def hf_trace(gguf, prompt: list[int], steps: int = 0, decode_tokens: list[int] | None = None,
             sites: SiteFilter | str | None = None) -> Trace:
    """transformers' trace of ``gguf`` (a path, or an :class:`HFModel` from :func:`load_hf`):
    prefill of ``prompt`` then ``steps`` decode steps teacher-forced on ``decode_tokens``
    (greedy where not given), as ``Model.run_with_cache`` does for ours. ``sites``: a
    SiteFilter or site glob(s); None keeps every site. Tensors float32 on the CPU, our layouts."""
    hfm = gguf if isinstance(gguf, HFModel) else load_hf(gguf)
    hf, transformers = hfm.model, _transformers()
    n_vocab = hf.config.vocab_size
    bad = [t for t in list(prompt) + list(decode_tokens or []) if not 0 <= int(t) < n_vocab]
    if not prompt or bad:
        raise HFError("empty prompt" if not prompt else
                      f"token id {bad[0]} out of range (vocabulary has {n_vocab} tokens)")
    filt = SiteFilter(sites) if isinstance(sites, str) else sites
    trace = Trace(hf.config.num_hidden_layers, meta=dict(hfm.meta))
    taps = _Taps(hf, trace, filt)
    tokens, forced = [int(t) for t in prompt], [int(t) for t in (decode_tokens or [])][:steps]
    cache, feed = transformers.DynamicCache(config=hf.config), tokens[:]
    # transformers 5 renamed the forward's past_key_values to cache (the old name deprecated)
    cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    try:
        taps.install()
        with torch.no_grad():
            for step in range(steps + 1):
                taps.step, pos0 = step, len(tokens) - len(feed)
                pos = torch.arange(pos0, len(tokens))[None]
                out = hf(input_ids=torch.tensor([feed]), position_ids=pos, use_cache=True, **{cache_kw: cache})
                if step < steps:
                    nxt = forced[step] if step < len(forced) else int(out.logits[0, -1].argmax())
                    tokens.append(nxt)
                    feed = [nxt]
    except HFError:
        raise
    except Exception as e:
        raise HFError(f"transformers failed at step {taps.step}: {type(e).__name__}: {_line(e)}") from None
    finally:
        taps.remove()
    trace.tokens, trace.n_prompt = tokens, len(prompt)
    return trace


def hf_trace_like(gguf, ref: Trace, sites: SiteFilter | str | None = None) -> Trace:
    """:func:`hf_trace` teacher-forced on a reference trace's tokens (its prompt and decode inputs)."""
    return hf_trace(gguf, ref.tokens[:ref.n_prompt], ref.n_steps, ref.tokens[ref.n_prompt:], sites)
