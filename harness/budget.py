"""Memory budget of a run, from the shapes alone: will it fit, and if not, what would.

Pure functions over a :class:`~harness.gguf.load.ModelConfig` and a :class:`Plan`; nothing is
allocated. :func:`estimate` adds up what a run holds at its peak on the host and on the GPU
(llama.cpp's weights, KV cache and compute buffer; our weights and KV cache, with lazy weights
the largest matrix expanded; the captured traces, or with micro-batches only one batch of them;
the comparison's float64 temporaries),
:func:`check` raises :class:`BudgetError` (one line: the estimate, what is available, and
settings that would fit) when the peak exceeds the available memory. Available memory is read
from ``/proc/meminfo`` and ``torch.cuda.mem_get_info``, or from the environment variables
``LLAMADIFF_HOST_MEMORY`` / ``LLAMADIFF_GPU_MEMORY`` (bytes, or ``8G``, ``512M``), which let a
test fake a small machine.

The figures are estimates (allocator slack, a CUDA context and Python itself are a constant),
meant to refuse a run that certainly cannot fit, before it starts, and to size micro-batches.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace

from harness.sites import BY_KEY, SiteFilter, all_sites, parse_site

GiB = 1 << 30
RUNTIME_HOST = 1 * GiB        # per process (caller + llama.cpp worker): Python, torch, libraries
RUNTIME_GPU = 1 * GiB         # CUDA contexts (both processes), cuBLAS workspaces
COMPARE_BYTES = 40            # per element of a pair reduced: float64 copies + temporaries
STATS_ELEMENTS = 1 << 24      # a larger pair is reduced in slices of about this many elements
DEQUANT_TEMP = 256 << 20      # harness.gguf.dequant's chunk temporaries on a GPU (16M elements)
BATCH_ELEMENTS = 1 << 22      # small pairs reduced together on a GPU: elements concatenated at once
BATCH_BYTES = 160             # per such element: float64 copies, segment ids, temporaries (measured ~140)
ATTN_TEMP_BYTES = 16          # per (H, T, P) element of our attention: scores, scaled+mask, softmax, rounded
HOLD = 1 * GiB                # harness.stream.Lockstep.HOLD: our reduced tensors held for one check
STAGE_HOLD = 256 << 20        # harness.stream.Lockstep.STAGE_HOLD: held past a stage's end
PIPE_COPIES = 2               # a captured batch on the host: the worker's copy + the caller's (pickled)


class BudgetError(Exception):
    """The run cannot fit in memory; ``str()`` is one line with the estimate and what would fit."""


@dataclass(frozen=True)
class Plan:
    """What a run will do. ``ubatch`` None: the prompt in one batch, every captured tensor held
    until the comparison (the classic path); an int: micro-batches of that many tokens, each
    compared as it comes and then freed (bounded working set)."""
    n_prompt: int
    steps: int
    device: str = "cpu"              # where both sides run ("cpu" or "cuda")
    local: bool = True               # a second (anchored) run of our model
    ours: bool = True                # False: llama.cpp only (record)
    ubatch: int | None = None
    layered: bool = False            # micro-batches with llama.cpp in this process: its nodes are handed
                                     # over as computed, so about one layer of them is held, not the batch
    sites: str | None = None
    layers: frozenset[int] | None = None
    our_weight_bytes: int = 0        # our weights as loaded (float, or raw when lazy)
    lazy: bool = False               # our matrices kept quantized, each expanded when used
    llama_weight_bytes: int = 0      # llama.cpp's copy (about the GGUF's size)
    kv_item: int = 2                 # llama.cpp KV cache bytes per element (F16)
    our_item: int = 4                # our activations' dtype size

    @property
    def filt(self) -> SiteFilter:
        return SiteFilter(self.sites, self.layers)


@dataclass
class Estimate:
    host: int
    gpu: int
    parts: dict[str, tuple[str, int]] = field(default_factory=dict)    # name -> (where, bytes)

    def __str__(self) -> str:
        s = f"host {human(self.host)}"
        return s + (f", GPU {human(self.gpu)}" if self.gpu else "")

    def detail(self) -> str:
        big = sorted(self.parts.items(), key=lambda kv: -kv[1][1])[:4]
        return ", ".join(f"{k} {human(v)} ({w})" for k, (w, v) in big if v)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# -- traces --------------------------------------------------------------------------------------
def site_counts(cfg, filt: SiteFilter | None = None, step: int = 0) -> dict[str, int]:
    """Site key -> how many sites of that key ``filt`` keeps at ``step`` (layers x 1, or 1)."""
    filt = filt or SiteFilter()
    out: dict[str, int] = {}
    for name in all_sites(cfg.n_layer, cfg.spec.sites):
        if filt.wants(step, name):
            key = parse_site(name)[1].key
            out[key] = out.get(key, 0) + 1
    return out


def _numel(key: str, dims: dict) -> int:
    return math.prod(dims[d] for d in BY_KEY[key].layout)


def batch_bytes(cfg, counts: dict[str, int], T: int, P: int) -> tuple[int, int]:
    """(float32 bytes of every kept site for a batch of T tokens over P positions, elements of
    the largest one)."""
    dims = cfg.dims(T, P)
    sizes = {k: _numel(k, dims) for k in counts}
    return sum(4 * n * counts[k] for k, n in sizes.items()), max(sizes.values(), default=0)


def stage_bytes(cfg, counts: dict[str, int], T: int, P: int) -> int:
    """float32 bytes of a batch's largest stage (harness.stream): one layer's kept sites, or the
    global ones (embedding, output norm, logits) together."""
    dims = cfg.dims(T, P)
    layer = sum(4 * _numel(k, dims) for k in counts if BY_KEY[k].per_layer)
    return max(layer, sum(4 * _numel(k, dims) for k in counts if not BY_KEY[k].per_layer))


def _batches(plan: Plan):
    """(step, T, P) of every llama_decode the plan makes."""
    U = plan.ubatch or plan.n_prompt
    for t0 in range(0, plan.n_prompt, U):
        T = min(U, plan.n_prompt - t0)
        yield 0, T, t0 + T
    for s in range(1, plan.steps + 1):
        yield s, 1, plan.n_prompt + s


def trace_bytes(cfg, plan: Plan) -> tuple[int, int, int, int]:
    """(bytes of the whole trace, bytes of the largest batch, elements of the largest site,
    bytes of the largest stage of a batch)."""
    total = peak = largest = stage = 0
    cache: dict[int, dict] = {}
    for step, T, P in _batches(plan):
        counts = cache.get(min(step, 1))
        if counts is None:
            counts = cache[min(step, 1)] = site_counts(cfg, plan.filt, step)
        b, n = batch_bytes(cfg, counts, T, P)
        total, peak, largest = total + b, max(peak, b), max(largest, n)
        stage = max(stage, stage_bytes(cfg, counts, T, P))
    return total, peak, largest, stage


# -- the estimate ----------------------------------------------------------------------------------
def n_ctx_cells(plan: Plan) -> int:
    return -(-(plan.n_prompt + plan.steps + 1) // 256) * 256


def estimate(cfg, plan: Plan) -> Estimate:
    """Peak host and GPU bytes of a run (see the module docstring for what is counted)."""
    gpu_run = str(plan.device).startswith("cuda")
    parts: dict[str, tuple[str, int]] = {}
    where = "GPU" if gpu_run else "host"

    def add(name, nbytes, at=where):
        parts[name] = (at, int(nbytes))

    n_ctx, U = n_ctx_cells(plan), min(plan.ubatch or n_ctx_cells(plan), n_ctx_cells(plan))
    H, Hkv, Dh = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    add("llama.cpp weights", plan.llama_weight_bytes)
    add("llama.cpp KV cache", n_ctx * cfg.n_layer * 2 * Hkv * Dh * plan.kv_item)
    add("llama.cpp compute buffer", 4 * (2 * H * U * n_ctx + 4 * U * cfg.d_ff + U * cfg.n_vocab))
    total, peak, largest, stage = trace_bytes(cfg, plan)
    streaming = plan.ubatch is not None
    sides = 1 + (plan.ours and plan.local) + plan.ours         # ref, ours, local
    if not plan.ours:                    # record: one step at a time, copied to the host
        add("captured tensors (one step)", peak * (1 + PIPE_COPIES), "host")
    elif streaming and plan.layered:     # a layer of llama.cpp's and ours, until reduced (harness.stream)
        held = min(peak, stage + STAGE_HOLD)      # the pending pairs' reference tensors too
        add("captured tensors (one layer)", held + 4 * largest)      # + one node's raw copy in flight
        add("our tensors awaiting reduction", min(peak, 2 * stage + STAGE_HOLD) if gpu_run else largest * 4)
    elif streaming:                      # llama.cpp's batch, and ours until reduced (harness.stream)
        add("captured tensors (one batch)", peak + 4 * largest)      # + one node's raw copy in flight
        add("our tensors awaiting reduction", min(peak, HOLD) if gpu_run else largest * 4)
        if not gpu_run:
            add("tensors through the worker pipe", peak * PIPE_COPIES, "host")
    elif gpu_run:                        # diff_on_device: the reference's trace on the GPU
        add("captured tensors (whole run)", total)
    else:                                # diff_gguf: three whole traces on the host
        add("captured tensors (whole run)", total * sides)
        add("tensors through the worker pipe", peak * PIPE_COPIES, "host")
    if plan.ours:
        P = plan.n_prompt + plan.steps
        T = plan.ubatch or plan.n_prompt
        add("our weights", plan.our_weight_bytes)
        if plan.lazy:                    # one matrix in float at a time (the output matrix is the largest)
            add("our largest matrix, expanded", max(cfg.n_vocab, cfg.d_ff, H * Dh) * cfg.d_model * plan.our_item
                + DEQUANT_TEMP)
        add("our KV caches", (1 + plan.local) * P * cfg.n_layer * 2 * Hkv * Dh * plan.our_item)
        add("our activations", ATTN_TEMP_BYTES * H * T * P + 4 * T * (cfg.d_ff * 3 + cfg.n_vocab))
        add("comparison temporaries", COMPARE_BYTES * min(largest, STATS_ELEMENTS) + 4 * largest
            + (BATCH_BYTES * BATCH_ELEMENTS if gpu_run else 0))     # + a contiguous copy of a strided pair
    add("runtimes (Python, torch, llama.cpp; 2 processes)", 2 * RUNTIME_HOST, "host")
    if gpu_run:
        add("CUDA contexts", RUNTIME_GPU, "GPU")
    host = sum(v for w, v in parts.values() if w == "host")
    gpu = sum(v for w, v in parts.values() if w == "GPU")
    return Estimate(host, gpu, parts)


# -- what is available ---------------------------------------------------------------------------
_SIZE_RE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]?)i?b?\s*$", re.I)


def parse_size(text: str) -> int:
    """``"8G"``, ``"512MiB"``, ``"1000000"`` -> bytes (ValueError otherwise)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a memory size: {text!r} (e.g. 8G, 512M, 1000000)")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index((m.group(2) or "_").lower()))


def _env_size(name: str) -> int | None:
    v = os.environ.get(name)
    if not v:
        return None
    try:
        return parse_size(v)
    except ValueError as e:
        raise BudgetError(f"{name}: {e}") from None


def host_available() -> int | None:
    """MemAvailable (or ``LLAMADIFF_HOST_MEMORY``), None when unknown."""
    forced = _env_size("LLAMADIFF_HOST_MEMORY")
    if forced is not None:
        return forced
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gpu_available(device: str = "cuda") -> int | None:
    """Free GPU memory (or ``LLAMADIFF_GPU_MEMORY``), None when unknown."""
    forced = _env_size("LLAMADIFF_GPU_MEMORY")
    if forced is not None:
        return forced
    try:
        import torch
        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
    except Exception:
        pass
    return None


# -- deciding ------------------------------------------------------------------------------------
def fits(est: Estimate, host: int | None, gpu: int | None) -> bool:
    return (host is None or est.host <= host) and (gpu is None or est.gpu <= gpu)


def check(cfg, plan: Plan, host: int | None = None, gpu: int | None = None) -> Estimate:
    """The estimate of ``plan``, or BudgetError (estimate, availability, what would fit) when it
    exceeds ``host``/``gpu`` bytes (None: read from the machine)."""
    host = host if host is not None else host_available()
    if gpu is None and str(plan.device).startswith("cuda"):
        gpu = gpu_available(plan.device)
    est = estimate(cfg, plan)
    if fits(est, host, gpu):
        return est
    have = ", ".join(f"{w} {human(v)}" for w, v in (("host", host), ("GPU", gpu)) if v is not None)
    hint = suggestions(cfg, plan, host, gpu)
    raise BudgetError(f"this run needs about {est} ({est.detail()}), more than is available ({have}); "
                      + (f"would fit: {hint}" if hint else "nothing smaller fits either (a smaller model or a larger machine)"))


def _largest(lo: int, hi: int, ok) -> int | None:
    """Largest n in [lo, hi] with ok(n) (ok monotone decreasing), None if not even lo."""
    if not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def suggestions(cfg, plan: Plan, host: int | None, gpu: int | None) -> str:
    """Settings that would fit, each changing one thing: a shorter prompt, fewer steps, no
    attention-score sites, fewer layers, smaller micro-batches."""
    def ok(p: Plan) -> bool:
        return fits(estimate(cfg, p), host, gpu)
    out = []
    if plan.ubatch is None or plan.ubatch > 1:
        u = _largest(1, min(plan.ubatch or plan.n_prompt, plan.n_prompt), lambda u: ok(replace(plan, ubatch=u)))
        if u is not None and u < (plan.ubatch or plan.n_prompt):
            out.append(f"micro-batches of {u} tokens")
    p = _largest(1, plan.n_prompt, lambda n: ok(replace(plan, n_prompt=n)))
    if p is not None and p < plan.n_prompt:
        out.append(f"a prompt of at most {p} tokens")
    s = _largest(0, plan.steps, lambda n: ok(replace(plan, steps=n))) if plan.steps else None
    if s is not None and s < plan.steps:
        out.append(f"--steps {s}")
    no_attn = ",".join(f"blk.*.{k}" for k in cfg.spec.sites if BY_KEY[k].per_layer and "P" not in BY_KEY[k].layout)
    if plan.sites is None and ok(replace(plan, sites=no_attn + ",embd,output_norm,logits")):
        out.append("--sites without the attention scores (blk.*.kq, blk.*.attn_weights)")
    if plan.layers is None and cfg.n_layer > 1:
        n = _largest(1, cfg.n_layer - 1, lambda k: ok(replace(plan, layers=frozenset(range(k)))))
        if n is not None:
            which = ",".join(f"blk.{i}.*" for i in range(n)) if n <= 3 else f"blk.0.* to blk.{n - 1}.*"
            out.append(f"{n} of {cfg.n_layer} layers ({'--layers ' + ','.join(map(str, range(n))) if n <= 3 and not plan.ours else '--sites ' + repr(which) if plan.ours else '--layers 0,...,' + str(n - 1)})")
    return "; ".join(out)


WORKING = ("llama.cpp compute buffer", "captured tensors (one batch)", "captured tensors (one layer)",
           "our tensors awaiting reduction",
           "tensors through the worker pipe", "our activations", "comparison temporaries")
WORKING_SET = 16 * GiB        # what auto_ubatch allows a batch's working set beyond weights and caches (under
                              # the 20 GB that issue 16 allows above what is held, were the estimate exact)


def working_set(est: Estimate) -> int:
    """Bytes of an estimate that scale with the batch (not weights, caches or runtimes)."""
    return sum(est.parts.get(k, ("", 0))[1] for k in WORKING)


def auto_ubatch(cfg, plan: Plan, host: int | None, gpu: int | None, share: float = 0.8,
                limit: int = WORKING_SET) -> int | None:
    """Micro-batch size for ``plan``: None (one batch, every trace held) when that fits in
    ``share`` of the memory, else the largest batch whose run fits and whose working set stays
    under ``limit`` bytes, else 1 (then :func:`check` says what would fit)."""
    cap = lambda v: None if v is None else int(v * share)     # noqa: E731
    h, g = cap(host), cap(gpu)
    if fits(estimate(cfg, replace(plan, ubatch=None)), h, g):
        return None

    def ok(n):
        est = estimate(cfg, replace(plan, ubatch=n))
        return fits(est, h, g) and working_set(est) <= limit
    return _largest(1, max(plan.n_prompt, 1), ok) or 1
