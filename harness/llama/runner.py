"""Capture every hook site of :mod:`harness.sites` from llama.cpp, through llama-cpp-python.

A :class:`LlamaRunner` holds a loaded model and a context whose eval callback
(:class:`harness.llama.capture.Capture`) copies out the graph nodes a :class:`SiteFilter` wants
(fewer nodes = fewer graph splits), converts them to the canonical layouts and hands them to a
sink after each step's ``llama_decode``. The callback is a context parameter, so a runner holds
the capturing context and, only when asked for plain logits (the observer check), a second
context without any callback. With ``keep_on_device`` on a CUDA build, nodes are copied on the
GPU and the sink gets CUDA tensors (no host copy).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from harness.llama.ggml_struct import GGMLFuncs, gpu_device_names
from harness.gguf.load import GGUFError, open_gguf, read_config, tensor_types
from harness.llama.lib import LlamaUnavailable, llama, versions
from harness.llama.capture import FLASH_MISSING, NOTHING, Capture
from harness.provenance import llama_provenance
from harness.sites import SiteFilter, all_sites, parse_site
from harness.trace import Sink, Trace


class LlamaError(Exception):
    """llama.cpp could not produce a trace; ``str()`` is a one-line user-facing message."""


_DECODE_RC = {1: ": no KV cache slot for the batch; a larger context or smaller micro-batches",
              2: ": aborted",
              -1: ": invalid input batch",
              -2: ": llama.cpp could not allocate or compute the graph, probably out of memory; "
                  "try smaller micro-batches, a shorter prompt or fewer --sites"}


KV_TYPES = {"f32": 0, "f16": 1}          # GGML_TYPE_F32, GGML_TYPE_F16
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class LlamaOptions:
    device: str = "auto"        # "cpu" | "cuda" | "auto" (all layers offloaded when the build can)
    flash_attn: bool = False
    kv_type: str = "f16"        # llama.cpp's default KV cache type; "f32" for exact comparisons
    n_ctx: int | None = None    # default: what the run needs; rounded up to a multiple of 256
    n_threads: int | None = None  # default: every CPU core
    keep_on_device: bool = False  # CUDA: hand the sink torch tensors on the GPU (no host copy)
    all_outputs: bool = True      # logits for every token; False: only the last token of each step
                                  # (saves T x V floats of host memory; the last layer's sites from
                                  # ffn_inp on then hold only that row: llama.cpp drops the others)
    extra_bufts: bool = False     # llama.cpp's extra buffer types (CPU weight repacking: AMX, AArch64/
                                  # x86 repack of Q4_0/IQ4_NL/Q4_K...). Off: the plain ggml CPU kernels
                                  # the tolerances were calibrated on, the same on every CPU (AMX
                                  # repacking crashes llama_decode on some CPUs). On: llama.cpp's default.
    isolate: bool = True          # run llama.cpp in a worker process (harness.llama.worker): a crash
                                  # inside it becomes a LlamaCrash instead of killing the caller
    ubatch: int | None = None     # micro-batches: the prompt is decoded ubatch tokens at a time (one
                                  # llama_decode each, n_batch = n_ubatch = ubatch), each batch's
                                  # tensors handed over before the next; every row outputs logits.
                                  # None: one batch per step (n_ubatch = n_ctx)


def _lib():
    """llama_cpp through harness.llama.lib, as a LlamaError when it cannot be imported."""
    try:
        return llama()
    except LlamaUnavailable as e:
        raise LlamaError(str(e)) from None


def _read_gguf(path: str):
    """Config and matrix weight type of a GGUF, as LlamaError when unusable."""
    try:
        hdr = open_gguf(path)
        cfg = read_config(hdr, path)
    except GGUFError as e:
        raise LlamaError(str(e)) from None
    types = tensor_types(hdr)
    return cfg, types.get("blk.0.ffn_down.weight") or types.get("token_embd.weight", "?")


class LlamaRunner:
    """A loaded model plus a capturing context; use as a context manager or call close()."""

    def __init__(self, gguf_path, options: LlamaOptions | None = None, n_ctx_needed: int = 512,
                 on_stage=None):
        self.path, self.options = os.fspath(gguf_path), options or LlamaOptions()
        self.on_stage = on_stage or (lambda what: None)   # told "context", "decode step N", ... first
        self.model = self.ctx = self._plain_ctx = self._batch = None
        o = self.options
        if o.device not in DEVICES:
            raise LlamaError(f"unknown device {o.device!r} (expected one of {', '.join(DEVICES)})")
        if o.kv_type not in KV_TYPES:
            raise LlamaError(f"unknown kv_type {o.kv_type!r} (expected one of {', '.join(KV_TYPES)})")
        self.config, self.weight_type = _read_gguf(self.path)
        self.lc = _lib()
        try:
            self._setup(n_ctx_needed)
        except BaseException:
            self.close()
            raise

    def _setup(self, n_ctx_needed: int) -> None:
        o = self.options
        self.g = GGMLFuncs(self.lc.llama_cpp._lib)
        self.gpu = self._use_gpu()
        if self.gpu and os.environ.get("LLAMADIFF_CUDA_GRAPHS") != "1":
            # llama.cpp's CUDA graphs off, before its first CUDA graph compute reads this (once per
            # process): with them, micro-batched prompts (97 or 128 tokens a batch) aborted inside
            # llama_decode with "an illegal instruction" on an H100 (0.3.36), plain decoding
            # without our callback too; without them the same runs complete. Same kernels, same numbers.
            # LLAMADIFF_CUDA_GRAPHS=1 keeps them (benchmarks: llama.cpp's own default speed).
            os.environ.setdefault("GGML_CUDA_DISABLE_GRAPHS", "1")
        self._capture = Capture(self.g, self.config, self.lc, on_device=o.keep_on_device and self.gpu)
        self.model = self._load_model()
        self.n_vocab = self.lc.llama_vocab_n_tokens(self.lc.llama_model_get_vocab(self.model))
        self.on_stage("context creation")
        self.ctx = self._new_context(o.n_ctx or max(int(n_ctx_needed), 1), self._capture.cb)
        self.n_ubatch = self.lc.llama_n_ubatch(self.ctx)
        self.n_ctx = self.lc.llama_n_ctx(self.ctx) if o.ubatch else min(self.lc.llama_n_ctx(self.ctx), self.n_ubatch)
        self._batch = self.lc.llama_batch_init(self.n_ubatch, 0, 1)
        self.meta = self._describe()
        self.last_logits: list[np.ndarray] = []

    # -- setup -------------------------------------------------------------------------------
    def _use_gpu(self) -> bool:
        can = bool(self.lc.llama_supports_gpu_offload())
        if self.options.device == "cuda" and not can:
            raise LlamaError("device 'cuda' requested but this llama-cpp-python build has no GPU "
                             "offload (reinstall with CMAKE_ARGS=-DGGML_CUDA=on)")
        return can and self.options.device != "cpu"

    def _load_model(self):
        mp = self.lc.llama_model_default_params()
        mp.n_gpu_layers = -1 if self.gpu else 0
        mp.use_mmap = not self.gpu      # offloaded weights: stream them, don't map the file into RSS
        mp.use_extra_bufts = bool(self.options.extra_bufts)
        model = self.lc.llama_model_load_from_file(self.path.encode(), mp)
        if not model:
            raise LlamaError(f"{self.path}: llama.cpp could not load this GGUF "
                             f"({self.config.architecture}, {self.config.n_layer} layers, weights {self.weight_type})")
        return model

    def _new_context(self, n_ctx: int, cb):
        lc, o = self.lc, self.options
        cp = lc.llama_context_default_params()
        n_ctx = -(-n_ctx // 256) * 256                 # llama.cpp pads n_ctx to 256 cells anyway
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = min(o.ubatch, n_ctx) if o.ubatch else n_ctx   # one graph per llama_decode
        cp.n_threads = cp.n_threads_batch = o.n_threads or os.cpu_count() or 1
        cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if o.flash_attn \
            else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.type_k = cp.type_v = KV_TYPES[o.kv_type]
        cp.offload_kqv = cp.op_offload = self.gpu
        cp.no_perf = True
        if cb is not None:
            cp.cb_eval, cp.cb_eval_user_data = cb, None
        ctx = lc.llama_init_from_model(self.model, cp)
        if not ctx:
            raise LlamaError(f"{self.path}: llama.cpp could not create a context of {n_ctx} tokens "
                             f"(kv_type {o.kv_type}, flash_attn {o.flash_attn})")
        return ctx

    def _describe(self) -> dict:
        o = self.options
        meta = {"source": "llama.cpp", "binding": "llama-cpp-python",
                "backend": "cuda" if self.gpu else "cpu", "device": "cuda" if self.gpu else "cpu", "flash_attn": o.flash_attn,
                "kv_type": o.kv_type, "n_ctx": self.n_ctx, "ubatch": o.ubatch, "n_threads": o.n_threads or os.cpu_count(),
                "weight_type": self.weight_type, "extra_bufts": o.extra_bufts, "architecture": self.config.architecture,
                "gguf": os.path.basename(self.path), "versions": versions(),
                "provenance": llama_provenance(self.lc, gpu=self.gpu, options=o)}
        if self.gpu:
            meta["device_name"] = ", ".join(gpu_device_names(self.g.lib)) or "?"
        return meta

    @property
    def on_device(self) -> bool:
        """Whether captured nodes stay on the GPU (``keep_on_device`` on a CUDA build); set it to
        False to copy them to the host instead (the naive path, for comparisons)."""
        return self._capture.on_device

    @on_device.setter
    def on_device(self, value: bool) -> None:
        self._capture.on_device = bool(value)

    @property
    def dry_capture(self) -> bool:
        """Benchmarks: say yes to the same nodes but copy none (the sink gets nothing). llama.cpp's
        scheduler synchronises the backend after every node we say yes to (ggml-backend.cpp,
        ``compute_splits``), so this times that floor of any capture."""
        return self._capture.dry

    @dry_capture.setter
    def dry_capture(self, value: bool) -> None:
        self._capture.dry = bool(value)

    def close(self) -> None:
        lc = getattr(self, "lc", None)
        if lc is None:
            return
        if self._batch is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        for attr in ("_plain_ctx", "ctx"):
            if getattr(self, attr):
                lc.llama_free(getattr(self, attr))
                setattr(self, attr, None)
        if self.model:
            lc.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "LlamaRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- tokens --------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenization (special tokens parsed, the model's BOS rule applied)."""
        vocab, data = self.lc.llama_model_get_vocab(self.model), text.encode()
        n = len(data) + 8
        while True:
            buf = (self.lc.llama_token * n)()
            got = self.lc.llama_tokenize(vocab, data, len(data), buf, n, True, True)
            if got >= 0:
                return list(buf[:got])
            n = -got

    def _check(self, prompt: list[int], steps: int, decode_tokens: list[int] | None) -> list[int]:
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise LlamaError("empty prompt: give at least one token")
        if steps < 0:
            raise LlamaError(f"steps must be >= 0, got {steps}")
        for t in prompt + [int(t) for t in decode_tokens or []]:
            if not 0 <= t < self.n_vocab:
                raise LlamaError(f"token id {t} out of range (vocabulary has {self.n_vocab} tokens)")
        if len(prompt) + steps > self.n_ctx:
            raise LlamaError(f"prompt of {len(prompt)} tokens + {steps} steps needs "
                             f"{len(prompt) + steps} positions, the context has {self.n_ctx}")
        return prompt

    # -- decoding ------------------------------------------------------------------------------
    def _decode(self, ctx, feed: list[int], pos0: int, step: int) -> np.ndarray:
        """Decode ``feed`` at positions pos0.. (every row outputs logits); last row's logits."""
        b = self._batch
        b.n_tokens = len(feed)
        for i, tok in enumerate(feed):
            out = bool(self.options.all_outputs or self.options.ubatch) or i == len(feed) - 1
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos0 + i, 1, int(out)
            b.seq_id[i][0] = 0
        self.on_stage(f"decode step {step}")
        rc = self.lc.llama_decode(ctx, b)
        if ctx is self.ctx and self._capture.error is None:
            self.on_stage(f"capture step {step}")
            self._capture.finish_step()      # the step's copies -> canonical tensors -> sink
        self._raise_capture_error(step)
        if rc != 0:
            raise LlamaError(f"llama_decode failed at step {step} (returned {rc}{_DECODE_RC.get(rc if rc > -2 else -2, '')})")
        row = self.lc.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self.n_vocab,)).copy()

    def _raise_capture_error(self, step: int) -> None:
        e = self._capture.error
        if isinstance(e, KeyboardInterrupt):
            raise e
        if e is not None:       # the sink's own failure (e.g. our model, run by harness.stream) says so
            what = "handing over llama.cpp's tensor failed" if e is self._capture.sink_error else "capture failed"
            where = f" at node {self._capture.error_node!r}" if self._capture.error_node else ""
            raise LlamaError(f"{what} at step {step}{where}: {type(e).__name__}: {e}") from e

    def _generate(self, ctx, prompt, steps, decode_tokens, before_step=None, after_batch=None) -> list[int]:
        """Prefill + ``steps`` teacher-forced decodes on a cleared cache; fills last_logits. With
        ``options.ubatch`` the prefill is decoded in micro-batches; ``before_step(step, T, P)``
        and ``after_batch(step, pos0, tokens)`` are called around each llama_decode."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(ctx), True)
        tokens, feed, pos, self.last_logits = list(prompt), list(prompt), 0, []
        U = self.n_ubatch if self.options.ubatch else max(len(feed), 1)
        for step in range(steps + 1):
            for t0 in range(0, len(feed), U):
                part = feed[t0:t0 + U]
                if before_step:
                    before_step(step, len(part), pos + t0 + len(part))
                row = self._decode(ctx, part, pos + t0, step)
                if after_batch:
                    after_batch(step, pos + t0, part)
            self.last_logits.append(row)
            if step < steps:
                nxt = int(decode_tokens[step]) if decode_tokens and step < len(decode_tokens) \
                    else int(row.argmax())
                pos, feed = pos + len(feed), [nxt]
                tokens.append(nxt)
        return tokens

    def run(self, prompt: list[int], steps: int = 0, decode_tokens: list[int] | None = None,
            sink: Sink | None = None, filt: SiteFilter | None = None, capture: bool = True) -> Trace:
        """Prefill ``prompt`` (step 0) then ``steps`` single-token decodes, teacher-forced on
        ``decode_tokens`` (greedy where not given), capturing the sites ``filt`` keeps."""
        prompt = self._check(prompt, steps, decode_tokens)
        if self.options.ubatch and capture and not hasattr(sink, "batch_done"):
            raise LlamaError("a micro-batched run hands each batch's tensors over as it comes: give a sink "
                             "with a batch_done(step, pos0, tokens) method (a Trace would keep only the last batch)")
        trace = Trace(self.config.n_layer, meta=dict(self.meta))
        filt = (filt or SiteFilter()) if capture else NOTHING
        cap = self._capture
        cap.start(filt, sink or trace, streaming=bool(getattr(sink, "streams", False)))
        try:
            tokens = self._generate(self.ctx, prompt, steps, decode_tokens, cap.begin_step,
                                    getattr(sink, "batch_done", None))
            captured = cap.captured
        finally:
            cap.start(NOTHING, lambda *a: None)     # drop references to the sink
        trace.tokens, trace.n_prompt = tokens, len(prompt)
        trace.meta.update(self._unavailable(filt, steps, captured))
        return trace

    def _unavailable(self, filt: SiteFilter, steps: int, captured: set) -> dict:
        names = all_sites(self.config.n_layer, self.config.spec.sites)
        missing = [n for n in names if any(filt.wants(s, n) and (s, n) not in captured
                                           for s in range(steps + 1))]
        why = {n: "fused into FLASH_ATTN_EXT (flash attention is on)"
               if self.options.flash_attn and parse_site(n)[1].key in FLASH_MISSING
               else "no matching node in llama.cpp's graph" for n in missing}
        return {"unavailable": missing, "unavailable_reason": why}

    def logits_plain(self, prompt: list[int], steps: int = 0,
                     decode_tokens: list[int] | None = None) -> list[np.ndarray]:
        """Per-step last-row logits from a second context that has no eval callback at all."""
        prompt = self._check(prompt, steps, decode_tokens)
        if self._plain_ctx is None:
            self._plain_ctx = self._new_context(self.n_ctx, None)
        self._generate(self._plain_ctx, prompt, steps, decode_tokens)
        return list(self.last_logits)


def tokenize_file(path: str, text: str) -> list[int]:
    """llama.cpp's tokenization of ``text`` with a GGUF's vocabulary alone (no weights, no
    context): what a run will feed, known before its memory is planned."""
    lc = _lib()
    mp = lc.llama_model_default_params()
    mp.vocab_only = True
    model = lc.llama_model_load_from_file(os.fspath(path).encode(), mp)
    if not model:
        raise LlamaError(f"{path}: llama.cpp could not load this GGUF's vocabulary")
    try:
        vocab, data = lc.llama_model_get_vocab(model), text.encode()
        n = len(data) + 8
        while True:
            buf = (lc.llama_token * n)()
            got = lc.llama_tokenize(vocab, data, len(data), buf, n, True, True)
            if got >= 0:
                return list(buf[:got])
            n = -got
    finally:
        lc.llama_model_free(model)
