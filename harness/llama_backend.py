"""Capture every hook site of :mod:`harness.sites` from llama.cpp, through llama-cpp-python.

llama.cpp's scheduler calls an *eval callback* (``llama_context_params.cb_eval``) for every graph
node: first with ``ask=True`` ("do you want to see this node?"), then, for the nodes we said yes
to, with ``ask=False`` right after the node is computed. We answer yes only for the nodes a
:class:`SiteFilter` wants (fewer yeses = fewer graph splits), copy each one out immediately (the
allocator reuses buffers and some ops run in place), convert it to the canonical layout and hand
it to a sink. Graph nodes are matched by name *and* op (``Qcur-0`` labels a MUL_MAT, an ADD, a
RESHAPE and a ROPE), see the ``llama_name``/``llama_op`` columns of the sites table.

Two graph facts of llama.cpp (as vendored by llama-cpp-python 0.3.36) this relies on:

* ``attn_out`` (the output projection) is an unnamed MUL_MAT (``node_<n>``). It is copied when
  computed and resolved when the ``ffn_inp-{i}`` ADD arrives: the stashed MUL_MAT that is one of
  its operands (in the last layer through a GET_ROWS that keeps the output rows; we request
  logits for every token, so no row is dropped).
* ``kq``/``kq_soft_max`` span every KV cell of the (padded, >= 256) cache view; only the first
  P cells hold positions of this run (the cache is cleared at the start of every run).
  With flash attention on they do not exist: they are reported in ``meta["unavailable"]``.

The callback is a context parameter, so a runner holds the capturing context and, only when
asked for plain logits (the observer check), a second context without any callback.
A Python exception inside the callback never crosses into C: the first one is recorded, every
later node is declined, and :meth:`LlamaRunner.run` raises it as a :class:`LlamaError`.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from .ggml_struct import GGMLFuncs, gpu_device_names, tensor_at, to_torch_device
from .gguf_io import GGUFError, open_gguf, read_config, tensor_types
from .llama_lib import LlamaUnavailable, llama, versions
from .sites import BY_KEY, SITES, SiteFilter, all_sites, parse_site, shape_of, site_name
from .trace import Sink, Trace


class LlamaError(Exception):
    """llama.cpp could not produce a trace; ``str()`` is a one-line user-facing message."""


KV_TYPES = {"f32": 0, "f16": 1}          # GGML_TYPE_F32, GGML_TYPE_F16
DEVICES = ("auto", "cpu", "cuda")
FLASH_MISSING = ("kq", "attn_weights")   # fused away by FLASH_ATTN_EXT


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


# (graph name without "-{i}", ggml op) -> site key; op None matches any op.
_NODE_SITES: dict[tuple[str, str | None], str] = {
    (s.llama_name, s.llama_op): s.key for s in SITES if s.llama_name}
_LAYER_RE = re.compile(r"^(.+)-(\d+)$")
_UNNAMED_RE = re.compile(r"^(node_\d+)?$")
_WEIGHT_LAYER_RE = re.compile(rb"^blk\.(\d+)\.")
_NOTHING = SiteFilter(steps=frozenset())


def _node_site(name: str, op: str) -> str | None:
    """Canonical site name of a graph node, or None."""
    m = _LAYER_RE.match(name)
    base, layer = (m.group(1), int(m.group(2))) if m else (name, None)
    key = _NODE_SITES.get((base, op)) or _NODE_SITES.get((base, None))
    if key is None or BY_KEY[key].per_layer != (layer is not None):
        return None
    return site_name(key, layer)


_REDUCED = {"ffn_inp", "ffn_norm", "ffn_gate", "ffn_up", "ffn_act", "ffn_out", "l_out", "output_norm",
            "logits"}


def spec_rows_reduced(site: str, numel: int, dims: dict) -> bool:
    """Whether a last-layer/output site holds only the output row (outputs for the last token only)."""
    return parse_site(site)[1].key in _REDUCED and numel == math.prod(shape_of(site, dict(dims, T=1)))


class _Capture:
    """The eval callback and its per-run state."""

    def __init__(self, g: GGMLFuncs, cfg, lc, on_device: bool = False):
        self.g, self.cfg, self.on_device = g, cfg, on_device
        self.cb = lc.ggml_backend_sched_eval_callback(self._callback)  # keep alive with the runner
        self.start(_NOTHING, lambda *a: None)

    def start(self, filt: SiteFilter, sink: Sink) -> None:
        self.filt, self.sink = filt, sink
        self.step, self.dims = 0, self.cfg.dims()
        self.stash: dict[int, torch.Tensor] = {}
        self.captured: set[tuple[int, str]] = set()
        self.error: BaseException | None = None
        self.error_node = ""
        self.attn_out_layers: set[int] = set()

    def begin_step(self, step: int, T: int, P: int) -> None:
        self.step, self.dims = step, self.cfg.dims(T, P)
        self.stash.clear()
        self.attn_out_layers = {i for i in range(self.cfg.n_layer)
                                if self.filt.wants(step, site_name("attn_out", i))}

    def _callback(self, addr, ask, _user) -> bool:
        if self.error is not None:
            return False
        try:
            return self._ask(addr) if ask else self._observe(addr)
        except BaseException as e:  # noqa: BLE001 - nothing may cross the ctypes boundary
            self.error = e
            try:
                self.error_node = tensor_at(addr).name.decode(errors="replace")
            except Exception:
                pass
            return False

    def _classify(self, t) -> tuple[str | None, bool]:
        """(site, is_unnamed_matmul) of a node."""
        op = self.g.op_name(t.op)
        name = t.name.decode(errors="replace")
        if op == "MUL_MAT" and _UNNAMED_RE.match(name):
            return None, True
        return _node_site(name, op), False

    def _ask(self, addr) -> bool:
        t = tensor_at(addr)
        site, unnamed_mm = self._classify(t)
        if unnamed_mm:   # attn_out candidate; its weight's name tells the layer when it is a plain one
            m = _WEIGHT_LAYER_RE.match(tensor_at(t.src[0]).name) if t.src[0] else None
            return bool(self.attn_out_layers) if m is None else int(m.group(1)) in self.attn_out_layers
        if site is None:
            return False
        layer, spec = parse_site(site)
        return self.filt.wants(self.step, site) or (spec.key == "ffn_inp" and layer in self.attn_out_layers)

    def _observe(self, addr) -> bool:
        t = tensor_at(addr)
        site, unnamed_mm = self._classify(t)
        if unnamed_mm:
            self.stash[addr] = self._read(addr, t)
            return True
        layer, spec = parse_site(site)
        if spec.key == "ffn_inp" and layer in self.attn_out_layers:
            self._resolve_attn_out(t, layer)
        if self.filt.wants(self.step, site):
            self._emit(site, self._read(addr, t))
        return True

    def _read(self, addr, t) -> torch.Tensor:
        """The node's data as a torch tensor shaped like reversed ``ne``: on the GPU when the node
        lives there and on_device is set, else a host copy."""
        if self.on_device:
            x = to_torch_device(self.g, addr, t)
            # nodes llama.cpp keeps on the host (the embedding lookup) join the rest on the GPU
            return x if x is not None else torch.from_numpy(self.g.to_numpy(addr, t)).cuda()
        return torch.from_numpy(self.g.to_numpy(addr, t))

    def _resolve_attn_out(self, t, layer: int) -> None:
        """Emit the stashed MUL_MAT that is an operand of ffn_inp (maybe through a GET_ROWS)."""
        for src in t.src[:2]:
            s = tensor_at(src) if src else None
            if s is not None and self.g.op_name(s.op) == "GET_ROWS" and s.src[0]:
                src = s.src[0]
            if src in self.stash:
                self._emit(site_name("attn_out", layer), self.stash[src])
                break
        self.stash.clear()

    def _emit(self, site: str, arr: torch.Tensor) -> None:
        shape = shape_of(site, self.dims)
        if parse_site(site)[1].key in FLASH_MISSING:      # (1, H, T, n_kv): keep cached cells
            H, T, P = shape
            if arr.numel() % (H * T) or arr.numel() // (H * T) < P:
                raise ValueError(f"{site}: llama.cpp tensor {tuple(arr.shape)[::-1]} does not hold {P} KV cells")
            arr = arr.reshape(H, T, -1)[..., :P]
        if arr.numel() != math.prod(shape) and spec_rows_reduced(site, arr.numel(), self.dims):
            shape = shape_of(site, dict(self.dims, T=1))        # only the output row survives
        if arr.numel() != math.prod(shape):
            raise ValueError(f"{site}: llama.cpp tensor with ne {list(arr.shape)[::-1]} does not fit "
                             f"the layout {shape}")
        if (self.step, site) in self.captured:
            raise ValueError(f"{site} computed twice in one step (the step was split into several graphs)")
        self.captured.add((self.step, site))
        self.sink(self.step, site, arr.contiguous().reshape(shape))


def _lib():
    """llama_cpp through harness.llama_lib, as a LlamaError when it cannot be imported."""
    try:
        return llama()
    except LlamaUnavailable as e:
        raise LlamaError(str(e)) from None


def _read_gguf(path: str):
    """Config and matrix weight type of a qwen2 GGUF, as LlamaError when unusable."""
    try:
        hdr = open_gguf(path)
        cfg = read_config(hdr, path)
    except GGUFError as e:
        raise LlamaError(str(e)) from None
    types = tensor_types(hdr)
    return cfg, types.get("blk.0.ffn_down.weight") or types.get("token_embd.weight", "?")


class LlamaRunner:
    """A loaded model plus a capturing context; use as a context manager or call close()."""

    def __init__(self, gguf_path, options: LlamaOptions | None = None, n_ctx_needed: int = 512):
        self.path, self.options = os.fspath(gguf_path), options or LlamaOptions()
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
        self._capture = _Capture(self.g, self.config, self.lc, on_device=o.keep_on_device and self.gpu)
        self.model = self._load_model()
        self.n_vocab = self.lc.llama_vocab_n_tokens(self.lc.llama_model_get_vocab(self.model))
        self.ctx = self._new_context(o.n_ctx or max(int(n_ctx_needed), 1), self._capture.cb)
        self.n_ctx = min(self.lc.llama_n_ctx(self.ctx), self.lc.llama_n_ubatch(self.ctx))
        self._batch = self.lc.llama_batch_init(self.n_ctx, 0, 1)
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
        model = self.lc.llama_model_load_from_file(self.path.encode(), mp)
        if not model:
            raise LlamaError(f"{self.path}: llama.cpp could not load this GGUF "
                             f"(qwen2, {self.config.n_layer} layers, weights {self.weight_type})")
        return model

    def _new_context(self, n_ctx: int, cb):
        lc, o = self.lc, self.options
        cp = lc.llama_context_default_params()
        n_ctx = -(-n_ctx // 256) * 256                 # llama.cpp pads n_ctx to 256 cells anyway
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx   # one ubatch per step: one graph per step
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
                "kv_type": o.kv_type, "n_ctx": self.n_ctx, "n_threads": o.n_threads or os.cpu_count(),
                "weight_type": self.weight_type,
                "gguf": os.path.basename(self.path), "versions": versions()}
        if self.gpu:
            meta["device_name"] = ", ".join(gpu_device_names(self.g.lib)) or "?"
        return meta

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
            out = self.options.all_outputs or i == len(feed) - 1
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos0 + i, 1, int(out)
            b.seq_id[i][0] = 0
        rc = self.lc.llama_decode(ctx, b)
        self._raise_capture_error(step)
        if rc != 0:
            raise LlamaError(f"llama_decode failed at step {step} (returned {rc})")
        row = self.lc.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self.n_vocab,)).copy()

    def _raise_capture_error(self, step: int) -> None:
        e = self._capture.error
        if isinstance(e, KeyboardInterrupt):
            raise e
        if e is not None:
            where = f" at node {self._capture.error_node!r}" if self._capture.error_node else ""
            raise LlamaError(f"capture failed at step {step}{where}: {type(e).__name__}: {e}") from e

    def _generate(self, ctx, prompt, steps, decode_tokens, before_step=None) -> list[int]:
        """Prefill + ``steps`` teacher-forced decodes on a cleared cache; fills last_logits."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(ctx), True)
        tokens, feed, pos, self.last_logits = list(prompt), list(prompt), 0, []
        for step in range(steps + 1):
            if before_step:
                before_step(step, len(feed), pos + len(feed))
            row = self._decode(ctx, feed, pos, step)
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
        trace = Trace(self.config.n_layer, meta=dict(self.meta))
        filt = (filt or SiteFilter()) if capture else _NOTHING
        cap = self._capture
        cap.start(filt, sink or trace)
        try:
            tokens = self._generate(self.ctx, prompt, steps, decode_tokens, cap.begin_step)
            captured = cap.captured
        finally:
            cap.start(_NOTHING, lambda *a: None)     # drop references to the sink
        trace.tokens, trace.n_prompt = tokens, len(prompt)
        trace.meta.update(self._unavailable(filt, steps, captured))
        return trace

    def _unavailable(self, filt: SiteFilter, steps: int, captured: set) -> dict:
        names = all_sites(self.config.n_layer)
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


def _prompt_tokens(runner: LlamaRunner, prompt: list[int] | str) -> list[int]:
    return runner.tokenize(prompt) if isinstance(prompt, str) else list(prompt)


def _n_ctx_needed(prompt: list[int] | str, steps: int) -> int:
    # a text prompt's length is unknown before tokenizing: bytes bound the token count
    n = len(prompt.encode()) + 8 if isinstance(prompt, str) else len(prompt)
    return max(n + max(steps, 0), 1)


def capture(gguf_path, prompt: list[int] | str, steps: int = 0, options: LlamaOptions | None = None,
            filt: SiteFilter | None = None, sink: Sink | None = None,
            decode_tokens: list[int] | None = None) -> Trace:
    """One-shot: load, run (prefill + ``steps`` decodes) capturing ``filt``'s sites, free."""
    with LlamaRunner(gguf_path, options, _n_ctx_needed(prompt, steps)) as r:
        return r.run(_prompt_tokens(r, prompt), steps, decode_tokens, sink=sink, filt=filt)


def observer_check(gguf_path, prompt: list[int] | str, steps: int = 3,
                   options: LlamaOptions | None = None) -> dict:
    """Does observing change the computation? Runs the capturing context (every site copied out,
    then dropped) and a second context without any eval callback on the same tokens, and
    compares each step's last-row logits."""
    with LlamaRunner(gguf_path, options, _n_ctx_needed(prompt, steps)) as r:
        prompt = _prompt_tokens(r, prompt)
        trace = r.run(prompt, steps, sink=lambda *a: None)
        observed = r.last_logits
        plain = r.logits_plain(prompt, steps, decode_tokens=trace.tokens[len(prompt):])
    diffs = [float(np.abs(a - b).max()) for a, b in zip(observed, plain)]
    return {"tokens": trace.tokens, "n_prompt": len(prompt), "max_abs_diff": diffs,
            "identical": all(d == 0.0 for d in diffs),
            "method": "capturing eval callback vs a context without callback, same model and tokens"}
