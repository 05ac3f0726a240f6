"""Recording llama.cpp into a reference run (the format of :mod:`harness.runs.store`).

:func:`record` captures llama.cpp on a GGUF and streams the tensors into a new run, one step in
memory at a time; :func:`estimate_size` says how large it will be from the shapes alone. Every
input problem is a :class:`~harness.runs.store.RunError` whose message is one line.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
from dataclasses import dataclass

from harness import __version__
from harness.compare.tolerance import POLICY_VERSION
from harness.runs.store import RunError, check_name, read_manifest, sha256_file
from harness.runs.writer import KEEP_FLOAT32, TraceWriteError, TraceWriter
from harness.sites import SiteFilter, all_sites, parse_site, shape_of


# -- size estimate -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SizeEstimate:
    bytes: int
    n_tensors: int
    steps: int
    dtype: str

    def __str__(self) -> str:
        return (f"{self.n_tensors} tensors over {self.steps + 1} steps, about {human_bytes(self.bytes)} "
                f"({self.dtype})")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def estimate_size(cfg, n_prompt: int, steps: int, filt: SiteFilter | None = None,
                  dtype: str = "float32") -> SizeEstimate:
    """Bytes a run of ``n_prompt`` + ``steps`` decodes will take, from the shapes alone."""
    filt = filt or SiteFilter()
    total = n = 0
    for step in range(steps + 1):
        T = n_prompt if step == 0 else 1
        dims = cfg.dims(T, (0 if step == 0 else n_prompt + step - 1) + T)
        for site in all_sites(cfg.n_layer, cfg.spec.sites):
            if filt.wants(step, site):
                item = 2 if dtype == "float16" and parse_site(site)[1].key not in KEEP_FLOAT32 else 4
                total += math.prod(shape_of(site, dims)) * item + 160   # + header and manifest entry
                n += 1
    return SizeEstimate(total + 2048, n, steps, dtype)


# -- recording ---------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gguf_info(path: str, weight_type: str) -> dict:
    from harness.gguf.load import open_gguf
    info = {"file": os.path.basename(path), "path": path, "bytes": os.path.getsize(path),
            "sha256": sha256_file(path), "weight_type": weight_type}
    try:
        name = open_gguf(path).fields.get("general.name")
        if name is not None:
            info["general_name"] = str(name)
    except Exception:
        pass
    return info


def _engine_info(meta: dict) -> dict:
    from harness.llama.lib import llama
    versions = dict(meta.get("versions") or {})
    try:
        versions["llama_cpp"] = llama().llama_version().decode()
    except Exception:
        pass
    e = {"name": meta.get("source", "llama.cpp"), "binding": meta.get("binding"),
         "backend": meta.get("backend"), "device": meta.get("device"),
         "device_name": meta.get("device_name") or (_cpu_name() if meta.get("backend") == "cpu" else None),
         "flash_attn": meta.get("flash_attn"), "kv_type": meta.get("kv_type"), "n_ctx": meta.get("n_ctx"),
         "n_threads": meta.get("n_threads"), "weight_type": meta.get("weight_type"),
         "extra_bufts": meta.get("extra_bufts"), "versions": versions, "provenance": meta.get("provenance")}
    return {k: v for k, v in e.items() if v is not None}


@dataclass
class RecordResult:
    path: str
    estimate: SizeEstimate
    bytes: int
    n_tensors: int
    manifest: dict


def run_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def record(gguf, name: str, tokens: list[int] | None = None, prompt: str | None = None, steps: int = 4,
           out_dir="reference_runs", device: str = "cpu", sites: str | None = None,
           layers: list[int] | None = None, float16: bool = False, kv_type: str = "f16",
           flash_attn: bool = False, overwrite: bool = False, max_bytes: int | None = None,
           on_estimate=None, extra_bufts: bool = False) -> RecordResult:
    """Capture llama.cpp on ``gguf`` (prefill of the prompt + ``steps`` greedy decodes) into
    ``out_dir/name``. ``on_estimate(SizeEstimate)`` is called before anything is captured; a run
    whose estimate exceeds ``max_bytes`` is refused. The tensors stream to disk one step at a time."""
    from harness.gguf.load import read_config_file
    from harness.llama.runner import LlamaOptions
    from harness.llama.worker import n_ctx_needed, open_runner
    from harness.sites import validate_pattern
    check_name(name)
    gguf = os.fspath(gguf)
    if (tokens is None) == (prompt is None):
        raise RunError("give exactly one of tokens or prompt")
    if steps < 0:
        raise RunError(f"steps must be >= 0, got {steps}")
    cfg = read_config_file(gguf)
    if sites:
        validate_pattern(sites, cfg.n_layer, cfg.spec.sites)
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < cfg.n_layer]
        if bad or not layers:
            raise RunError(f"--layers {layers}: the model has layers 0..{cfg.n_layer - 1}")
    filt = SiteFilter(sites, frozenset(layers) if layers is not None else None)
    dest = os.path.join(os.fspath(out_dir), name)
    if os.path.exists(dest) and not overwrite:
        raise RunError(f"{dest} already exists (choose another --name or pass --force)")
    dtype = "float16" if float16 else "float32"
    n_ctx = n_ctx_needed(list(tokens) if tokens is not None else prompt, steps) + 1
    opts = LlamaOptions(device=device, flash_attn=flash_attn, kv_type=kv_type, extra_bufts=extra_bufts)
    with open_runner(gguf, opts, n_ctx) as runner:
        toks = list(tokens) if tokens is not None else runner.tokenize(prompt)
        est = estimate_size(cfg, len(toks), steps, filt, dtype)
        if on_estimate is not None:
            on_estimate(est)
        if est.n_tensors == 0:
            raise RunError("the site selection keeps no tensor")
        if max_bytes is not None and est.bytes > max_bytes:
            raise RunError(f"estimated size {human_bytes(est.bytes)} exceeds the limit of {human_bytes(max_bytes)}"
                           " (use --sites, --layers or --float16 to record less)")
        try:
            writer = TraceWriter(dest, cfg.n_layer, len(toks), steps=steps, dtype=dtype, overwrite=overwrite)
        except TraceWriteError as e:
            raise RunError(str(e)) from None
        try:
            trace = runner.run(toks, steps, sink=lambda s, n, t: writer.add(s, n, t.numpy()), filt=filt)
            meta = trace.meta
            order = all_sites(cfg.n_layer, cfg.spec.sites)
            recorded = sorted({k[1] for k in writer.seen}, key=order.index)
            writer.close(
                tokens=trace.tokens, name=name,
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                harness_version=__version__, policy_version=POLICY_VERSION,
                weight_type=runner.weight_type, gguf=_gguf_info(gguf, runner.weight_type),
                config=dataclasses.asdict(cfg), engine=_engine_info(meta),
                selection={"sites": sites, "layers": sorted(layers) if layers is not None else None},
                sites=recorded, unavailable=meta.get("unavailable", []),
                unavailable_reason=meta.get("unavailable_reason", {}))
        except BaseException:
            writer.abort()
            raise
    man = read_manifest(dest)
    return RecordResult(dest, est, run_size(dest), len(man["tensors"]), man)
