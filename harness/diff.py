"""The main job: capture llama.cpp, run our PyTorch model on the same tokens, compare.

``diff_gguf`` is what ``llamadiff report`` and the notebook API call; it returns plain data
(:class:`~harness.compare.comparator.Comparison` plus the traces) and never prints.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from harness.compare.comparator import Comparator, Comparison, compare_traces
from harness.llama.runner import LlamaOptions
from harness.llama.worker import n_ctx_needed, open_runner
from harness.ours.model import Model, load_model
from harness.sites import LAYER_WEIGHTS, SiteFilter, with_inputs
from harness.compare.tolerance import Policy
from harness.trace import Trace
from harness import budget
from harness.budget import Plan


@dataclass
class DiffRequest:
    gguf: str
    prompt: str | None = None
    tokens: list[int] | None = None
    steps: int = 4
    device: str = "cpu"                 # where both sides run: "cpu" or "cuda"
    dtype: str = "float32"              # PyTorch side
    sites: str | None = None            # site glob(s); None = every site
    faults: list = field(default_factory=list)   # harness.ours.inject.Fault records to inject on our side
    kv_type: str = "f16"                # llama.cpp KV cache type (its default is F16)
    flash_attn: bool = False
    local: bool = True                  # also measure each op on the reference's inputs
    all_outputs: bool = True            # False: llama.cpp outputs the last token only (less host memory)
    lazy_weights: bool | None = None    # our matrices kept quantized, expanded one at a time when used;
                                        # None: on CUDA when the float weights would not fit comfortably
    extra_bufts: bool = False           # llama.cpp's extra buffer types (CPU weight repacking, e.g. AMX):
                                        # its default, but not what the tolerances were calibrated on
    isolate: bool = True                # llama.cpp in a worker process: its crash is a LlamaCrash here
    ubatch: int | None = None           # prompt micro-batch size (harness.stream): each batch compared
                                        # and freed before the next; None: chosen from the memory budget
                                        # (one batch when everything fits); 0: always one batch
    progress: Callable[[int, int], None] | None = None   # micro-batched runs: (tokens compared, of all)
                                                          # after each batch; None: nothing reported


@dataclass
class DiffResult:
    comparison: Comparison
    ref: Trace
    ours: Trace
    local: Trace | None


def prompt_tokens(req: DiffRequest) -> list[int]:
    """The tokens the run will feed: ``req.tokens``, else llama.cpp's tokenization of the prompt
    (the vocabulary alone, in the worker unless ``isolate`` is off)."""
    if req.tokens:
        return [int(t) for t in req.tokens]
    from harness.llama.runner import tokenize_file
    from harness.llama.worker import run_isolated
    text = req.prompt or ""
    return run_isolated(tokenize_file, req.gguf, text) if req.isolate else tokenize_file(req.gguf, text)


def memory_plan(req: DiffRequest, n_prompt: int, ubatch: int | None = None, ours: bool = True,
                layers=None) -> Plan:
    """The :class:`~harness.budget.Plan` of a request (weights' sizes read from the GGUF)."""
    import os
    from harness.gguf.load import float_bytes
    from harness.ours.model import DTYPES
    size = os.path.getsize(req.gguf)
    lazy = req.lazy_weights if req.lazy_weights is not None else _float_weights_crowd(req)
    ours_bytes = (size if lazy else float_bytes(req.gguf, DTYPES[req.dtype])) if ours else 0
    return Plan(n_prompt, req.steps, device=req.device, local=req.local, ours=ours, ubatch=ubatch,
                layered=not req.isolate, sites=req.sites, layers=layers, our_weight_bytes=ours_bytes,
                llama_weight_bytes=size,
                lazy=ours and lazy, kv_item=2 if req.kv_type == "f16" else 4, our_item=DTYPES[req.dtype].itemsize)


def plan_request(req: DiffRequest, host: int | None = None, gpu: int | None = None) -> tuple[list[int], int | None]:
    """(tokens, micro-batch size or None) of a request whose estimated peak memory fits; else
    :class:`~harness.budget.BudgetError` with the estimate and what would fit. ``host``/``gpu``:
    available bytes (default: the machine's, see :mod:`harness.budget`)."""
    from harness.gguf.load import read_config_file
    cfg = read_config_file(req.gguf)
    tokens = prompt_tokens(req)
    host = host if host is not None else budget.host_available()
    if gpu is None and str(req.device).startswith("cuda"):
        gpu = budget.gpu_available(req.device)
    ubatch = req.ubatch or None
    if req.ubatch is None:
        ubatch = budget.auto_ubatch(cfg, memory_plan(req, len(tokens)), host, gpu)
    if ubatch is not None and ubatch >= len(tokens) and req.ubatch is None:
        ubatch = None
    budget.check(cfg, memory_plan(req, len(tokens), ubatch), host, gpu)
    return tokens, ubatch


def llama_options(req: DiffRequest, **kw) -> LlamaOptions:
    return LlamaOptions(device=req.device, flash_attn=req.flash_attn, kv_type=req.kv_type,
                        extra_bufts=req.extra_bufts, isolate=req.isolate, **kw)


def capture_filter(req: DiffRequest) -> SiteFilter | None:
    """What llama.cpp captures for ``req``: its sites and, with a ``sites`` subset, their inputs too
    (held as anchors for our local reruns, not compared)."""
    if not req.sites:
        return None
    from harness.gguf.load import read_config_file
    cfg = read_config_file(req.gguf)
    return SiteFilter(with_inputs(req.sites, cfg.n_layer, cfg.spec.sites, cfg.spec.inputs))


def capture_reference(req: DiffRequest) -> Trace:
    with open_runner(req.gguf, llama_options(req), n_ctx_needed=_ctx_needed(req)) as runner:
        prompt = list(req.tokens) if req.tokens else runner.tokenize(req.prompt or "")
        return runner.run(prompt, req.steps, filt=capture_filter(req))


def run_ours(model: Model, ref: Trace, faults=(), filt: SiteFilter | None = None,
             anchor: Trace | None = None) -> Trace:
    """Our model with ``faults`` installed, teacher-forced on the reference's tokens
    (FaultError for a fault that does not exist in the model's architecture)."""
    from harness.ours.inject import check_faults
    check_faults(faults, model.config)
    hooks = [h for f in faults for h in f.hooks]
    with model.hooks(hooks):
        return model.run_with_cache(ref.tokens[:ref.n_prompt], ref.n_steps, ref.tokens[ref.n_prompt:],
                                    filt=filt, anchor=anchor)


def model_for(req: DiffRequest, ref: Trace) -> Model:
    """Our model set up to mirror the reference's numerics where we know them: its F16 KV cache
    and the activation rounding of its backend's matmul kernels."""
    kv = torch.float16 if ref.meta.get("kv_type", "f16") == "f16" else None
    mirror = ref.meta.get("backend") if ref.meta.get("source") == "llama.cpp" else None
    lazy = req.lazy_weights if req.lazy_weights is not None else _float_weights_crowd(req)
    return load_model(req.gguf, device=req.device, dtype=req.dtype, kv_dtype=kv, mirror=mirror,
                      lazy_weights=lazy)


def _float_weights_crowd(req: DiffRequest) -> bool:
    """Would the eagerly dequantized weights take more than 70% of the free GPU memory (which
    llama.cpp's copy of the model already occupies)?"""
    if not str(req.device).startswith("cuda") or not torch.cuda.is_available():
        return False
    from harness.gguf.load import float_bytes
    from harness.ours.model import DTYPES
    return float_bytes(req.gguf, DTYPES[req.dtype]) > 0.7 * torch.cuda.mem_get_info()[0]


def diff_gguf(req: DiffRequest, model: Model | None = None, ref: Trace | None = None) -> DiffResult:
    """The divergence report of a request on the CPU path: whole traces, or, when the memory
    budget asks for micro-batches (or ``req.ubatch`` does), :func:`diff_stream`."""
    if ref is None:
        tokens, ubatch = plan_request(req)
        req = replace(req, tokens=tokens, ubatch=ubatch or 0)
        if ubatch:
            return diff_stream(req, model)
    ref = ref if ref is not None else capture_reference(req)
    model = model if model is not None else model_for(req, ref)
    filt = SiteFilter(req.sites) if req.sites else None
    ours = run_ours(model, ref, req.faults, filt)
    local = run_ours(model, ref, req.faults, filt, anchor=ref) if req.local else None
    policy = model_policy(model, ref.meta.get("backend", "cpu"), req.dtype)
    cmp = compare_traces(ours, ref, policy, local, judge_unanchored=not req.sites)
    cmp.meta["faults"] = [f.name for f in req.faults]
    return DiffResult(cmp, ref, ours, local)


# The weight matrix each weight-matmul site multiplies by (GGUF tensor name without "blk.{i}.").
def site_weight_types(gm) -> dict[str, str]:
    """Full site name -> ggml type of the weight matrix it multiplies by, from a GGUFModel's
    tensor types (``logits``: ``output.weight``, or ``token_embd.weight`` when tied)."""
    out = {}
    for i in range(gm.config.n_layer):
        for key, tensor in LAYER_WEIGHTS.items():
            t = gm.types.get(f"blk.{i}.{tensor}")
            if t is not None:
                out[f"blk.{i}.{key}"] = t
    head = gm.types.get("token_embd.weight" if gm.tied else "output.weight")
    if head is not None:
        out["logits"] = head
    return out


def model_policy(model: Model, backend: str, dtype: str = "float32") -> Policy:
    """The tolerance policy of a comparison against ``model``'s GGUF: the file's class from
    ``general.file_type`` (else the FFN matrix type), each weight matmul's from its own tensor."""
    gm = model.gguf
    ft = gm.file_type if gm.file_type and not gm.file_type.startswith(("GUESSED", "file type")) else gm.weight_type
    return Policy(backend, ft, dtype, site_types=site_weight_types(gm))


def _ctx_needed(req: DiffRequest) -> int:
    """Context cells a request needs (:func:`~harness.llama.worker.n_ctx_needed`), plus one spare."""
    return n_ctx_needed(list(req.tokens) if req.tokens else req.prompt or "", req.steps) + 1


def diff_on_device(req: DiffRequest, model: Model | None = None, runner=None,
                   ref: Trace | None = None) -> DiffResult:
    """Both sides on one GPU, streaming: llama.cpp's tensors are captured into GPU memory (no host
    copy), and each of our tensors is compared where it is produced and then dropped, so host
    memory holds only the table. Same table as :func:`diff_gguf`; ``ours``/``local`` are None.
    When the memory budget asks for micro-batches (or ``req.ubatch`` / the runner's options do),
    :func:`diff_stream` instead: GPU memory then bounded by one batch."""
    filt = SiteFilter(req.sites) if req.sites else None
    if ref is None and runner is None:
        tokens, ubatch = plan_request(req)
        req = replace(req, tokens=tokens, ubatch=ubatch or 0)
        if ubatch:
            return diff_stream(req, model)
    elif ref is None and getattr(runner, "options", None) is not None and runner.options.ubatch:
        return diff_stream(replace(req, ubatch=runner.options.ubatch), model, runner)
    if ref is None:
        opts = llama_options(req, keep_on_device=True, all_outputs=req.all_outputs)
        own = runner is None
        runner = runner or open_runner(req.gguf, opts, n_ctx_needed=_ctx_needed(req))
        try:
            prompt = list(req.tokens) if req.tokens else runner.tokenize(req.prompt or "")
            ref = runner.run(prompt, req.steps, filt=capture_filter(req))
        finally:
            if own:
                runner.close()
    model = model if model is not None else model_for(req, ref)
    comp = Comparator(model_policy(model, ref.meta.get("backend", "cuda"), req.dtype), n_prompt=ref.n_prompt,
                      judge_unanchored=not req.sites)

    def e2e(step, site, x):
        r = ref.tensors.get((step, site))
        if r is not None:
            comp.add(step, site, x, r)

    def local(step, site, x):
        r = ref.tensors.get((step, site))
        if r is not None:
            comp.add_local(step, site, x, r)

    from harness.ours.inject import check_faults
    check_faults(req.faults, model.config)
    hooks = [h for f in req.faults for h in f.hooks]
    args = (ref.tokens[:ref.n_prompt], ref.n_steps, ref.tokens[ref.n_prompt:])
    with model.hooks(hooks):
        model.run_with_cache(*args, filt=filt, sink=e2e, to_cpu=False)
        if req.local:
            model.run_with_cache(*args, filt=filt, sink=local, anchor=ref, to_cpu=False)
    cmp = comp.result(model.describe(), ref)
    cmp.meta["faults"] = [f.name for f in req.faults]
    return DiffResult(cmp, ref, None, None)



def diff_stream(req: DiffRequest, model: Model | None = None, runner=None) -> DiffResult:
    """Micro-batched lockstep comparison (:mod:`harness.stream`): llama.cpp decodes the prompt
    ``req.ubatch`` tokens at a time, our model follows each batch at the same positions, every
    pair is reduced and dropped at once. Same table as :func:`diff_gguf`; the returned traces
    hold no tensors (``ours``/``local`` None)."""
    from harness.gguf.load import read_config_file
    from harness.ours.inject import check_faults
    from harness.stream import Lockstep
    cfg = read_config_file(req.gguf)
    check_faults(req.faults, cfg)
    tokens = prompt_tokens(req)
    filt = SiteFilter(req.sites) if req.sites else None
    on_gpu = str(req.device).startswith("cuda")
    opts = llama_options(req, keep_on_device=on_gpu, ubatch=max(int(req.ubatch or len(tokens)), 1))
    own = runner is None
    runner = runner or open_runner(req.gguf, opts, n_ctx_needed=len(tokens) + req.steps + 1)
    try:
        meta = dict(runner.meta, backend=runner.meta.get("backend"), source="llama.cpp")
        model = model if model is not None else model_for(req, Trace(cfg.n_layer, meta=meta))
        n = len(tokens)
        comp = Comparator(model_policy(model, meta.get("backend", "cpu"), req.dtype), n_prompt=n,
                          judge_unanchored=not req.sites)
        lock = Lockstep(model, comp, filt, [h for f in req.faults for h in f.hooks], req.local,
                        lambda step: (n, n) if step == 0 else (1, n + step),
                        progress=(lambda done: req.progress(done, n + req.steps)) if req.progress else None,
                        prompt=tokens, ubatch=getattr(runner, "n_ubatch", opts.ubatch))
        ref = runner.run(tokens, req.steps, sink=lock, filt=capture_filter(req))
    finally:
        if own:
            runner.close()
    cmp = lock.finish(model.describe(), ref.meta, ref.tokens, ref.n_prompt, cfg.n_layer)
    cmp.meta["faults"] = [f.name for f in req.faults]
    cmp.meta["ubatch"] = opts.ubatch
    return DiffResult(cmp, ref, None, None)


def check_capture(gguf: str, tokens: list[int] | None = None, prompt: str | None = None, steps: int = 4,
                  device: str = "cpu", sites: str | None = None, layers=None, kv_type: str = "f16") -> budget.Estimate:
    """Memory estimate of a llama.cpp-only capture (``llamadiff record``), or BudgetError."""
    from harness.gguf.load import read_config_file
    req = DiffRequest(gguf, prompt=prompt, tokens=tokens, steps=steps, device=device, sites=sites,
                      kv_type=kv_type, ubatch=0)
    cfg = read_config_file(gguf)
    plan = memory_plan(req, len(prompt_tokens(req)), None, ours=False,
                       layers=frozenset(layers) if layers is not None else None)
    return budget.check(cfg, plan)
