"""Reference runs: traces recorded to disk, read back with every tensor checked, and compared.

A run (or any trace written in the same format by another engine) is a directory with a
``manifest.json`` and per-step safetensors files; the format is specified in
``docs/trace-format.md`` and written by :mod:`harness.runs.writer` (standalone, copyable).

* :func:`~harness.runs.record.record` (in :mod:`harness.runs.record`) captures llama.cpp into a
  new run; :func:`write_trace` writes any in-memory trace in the format.
* :func:`load_run` reads a run and validates the manifest and every tensor (name, dtype, shape
  against the layouts of :mod:`harness.sites`, file sizes, sha256); :func:`load_tensor` reads
  one tensor without touching the others (for notebooks).
* :func:`compare_runs` diffs two traces with the tolerance policy of the reference's backend and
  weight type, widened for tensors stored in float16 (see :class:`StoragePolicy`).

Every input problem is a :class:`RunError` whose message is one line.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from harness.provenance import from_engine
from harness.sites import SiteError, SiteFilter, parse_site
from harness.compare.tolerance import FLOOR_UNITS, UNIT_ROUNDOFF, Policy, Tol, max_floor
from harness.trace import Trace
from harness.runs.writer import FORMAT, FORMAT_VERSION, ITEMSIZE, TraceWriteError, TraceWriter

MANIFEST = "manifest.json"
REQUIRED = ("format_version", "n_layer", "tokens", "n_prompt", "tensors")
STORAGE_OF_TAG = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_TENSOR_RE = re.compile(r"^(\d+)/(.+)$")


class RunError(Exception):
    """A run or trace that cannot be written, read or compared; ``str()`` is one line."""


# -- reading -----------------------------------------------------------------------------------
@dataclass
class RecordedRun:
    """A trace read from disk, plus its manifest."""
    path: str
    manifest: dict
    trace: Trace
    storage: str                      # least precise dtype stored: "float32", "float16", "bfloat16"
    dtypes: dict = field(default_factory=dict)   # (step, site) -> the dtype that tensor was stored in

    @property
    def name(self) -> str:
        return self.manifest.get("name") or os.path.basename(os.path.normpath(self.path))

    @property
    def engine(self) -> dict:
        e = self.manifest.get("engine")
        return e if isinstance(e, dict) else {}

    @property
    def backend(self) -> str | None:
        return self.engine.get("backend")

    @property
    def provenance(self) -> dict:
        """The engine's recorded provenance (llama.cpp build and options, the machine); for runs
        recorded before it was stored, what the engine section states, marked ``partial``."""
        return from_engine(self.engine)

    @property
    def weight_type(self) -> str | None:
        g = self.manifest.get("gguf") if isinstance(self.manifest.get("gguf"), dict) else {}
        return self.manifest.get("weight_type") or self.engine.get("weight_type") or g.get("weight_type")


def _fail(path: str, msg: str) -> RunError:
    return RunError(f"{path}: {msg}")


def read_manifest(path: str) -> dict:
    """The validated manifest of the run at ``path`` (a directory or its manifest.json)."""
    path = os.fspath(path)
    if os.path.basename(path) == MANIFEST:
        path = os.path.dirname(path) or "."
    if not os.path.isdir(path):
        raise RunError(f"{path}: no such run directory")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise _fail(path, f"not a complete trace: no {MANIFEST} (a record that was interrupted leaves "
                          "no manifest; record it again)")
    try:
        with open(mpath) as f:
            m = json.load(f)
    except json.JSONDecodeError as e:
        raise _fail(mpath, f"not valid JSON (line {e.lineno}: {e.msg}); the manifest is damaged") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(mpath, f"cannot read ({e})") from None
    if not isinstance(m, dict):
        raise _fail(mpath, "the manifest must be a JSON object")
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise _fail(mpath, f"missing required field(s) {', '.join(missing)}")
    if m.get("format", FORMAT) != FORMAT:
        raise _fail(mpath, f"format {m.get('format')!r} is not {FORMAT!r}")
    v = m["format_version"]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise _fail(mpath, f"format_version must be a positive integer, got {v!r}")
    if v > FORMAT_VERSION:
        raise _fail(mpath, f"format version {v} is newer than this llamadiff reads (up to {FORMAT_VERSION}); "
                           "upgrade llamadiff")
    nl, toks, npr = m["n_layer"], m["tokens"], m["n_prompt"]
    if not isinstance(nl, int) or nl < 1:
        raise _fail(mpath, f"n_layer must be a positive integer, got {nl!r}")
    if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                             for t in toks):
        raise _fail(mpath, "tokens must be a list of non-negative integers")
    if not isinstance(npr, int) or not 1 <= npr <= len(toks):
        raise _fail(mpath, f"n_prompt must be between 1 and the number of tokens ({len(toks)}), got {npr!r}")
    if "steps" in m and m["steps"] != len(toks) - npr:
        raise _fail(mpath, f"steps is {m['steps']!r} but the tokens give {len(toks) - npr} decode steps")
    if not isinstance(m["tensors"], list) or not m["tensors"]:
        raise _fail(mpath, "tensors must be a non-empty list")
    return m


def _tensor_key(path: str, entry, n_layer: int, n_steps: int) -> tuple[int, str]:
    if not isinstance(entry, dict) or not all(k in entry for k in ("name", "file", "dtype", "shape")):
        raise _fail(path, f"tensor entry {entry!r:.80} needs name, file, dtype and shape")
    m = _TENSOR_RE.match(str(entry["name"]))
    if not m:
        raise _fail(path, f"tensor name {entry['name']!r} is not '{{step}}/{{site}}'")
    step, site = int(m.group(1)), m.group(2)
    try:
        layer = parse_site(site)[0]
    except SiteError as e:
        raise _fail(path, f"tensor {entry['name']!r}: {e}") from None
    if layer is not None and layer >= n_layer:
        raise _fail(path, f"tensor {entry['name']!r}: layer {layer} but n_layer is {n_layer}")
    if step > n_steps:
        raise _fail(path, f"tensor {entry['name']!r}: step {step} but the tokens give steps 0..{n_steps}")
    if entry["dtype"] not in STORAGE_OF_TAG:
        raise _fail(path, f"tensor {entry['name']!r}: dtype {entry['dtype']!r} (supported: F32, F16, BF16)")
    f = entry["file"]
    if not isinstance(f, str) or not f or f != os.path.basename(f) or f.startswith("."):
        raise _fail(path, f"tensor {entry['name']!r}: file {f!r} must be a plain file name in the run directory")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise _fail(path, f"tensor {entry['name']!r}: shape {shape!r} is not a list of sizes")
    return step, site


def _config_dims(m: dict) -> dict[str, int]:
    """Layout dims the manifest states (config or dims), to check the tensors against."""
    out: dict[str, int] = {}
    cfg = m.get("config")
    if isinstance(cfg, dict):
        names = dict(D="d_model", F="d_ff", H="n_head", Hkv="n_head_kv", V="n_vocab")
        out.update({d: cfg[k] for d, k in names.items() if isinstance(cfg.get(k), int)})
        if isinstance(cfg.get("key_length"), int):        # the head size when the file states it (qwen3)
            out["Dh"] = cfg["key_length"]
        elif "D" in out and out.get("H"):
            out["Dh"] = out["D"] // out["H"]
    dims = m.get("dims")
    if isinstance(dims, dict):
        out.update({d: n for d, n in dims.items() if isinstance(n, int) and d not in ("T", "P")})
    return out


def _native_shape(key: tuple[int, str], shape: tuple, stated: dict, n_prompt: int) -> tuple | None:
    """The site's layout shape for an engine-native flat projection, (T, H*Dh) stored for a
    (T, H, Dh) site (or Hkv), when the manifest states both dims; else None."""
    layout = parse_site(key[1])[1].layout
    if len(shape) != 2 or len(layout) != 3 or layout[0] != "T" or layout[2] != "Dh":
        return None
    heads, dh = stated.get(layout[1]), stated.get("Dh")
    T = n_prompt if key[0] == 0 else 1
    if heads and dh and tuple(shape) == (T, heads * dh):
        return (T, heads, dh)
    return None


# sites an engine may dump for its last token only at the prefill (T = 1 instead of the prompt length)
LAST_ROW_SITES = ("output_norm", "logits")


def _check_layout(path: str, key: tuple[int, str], shape: tuple, dims: dict, n_prompt: int) -> None:
    step, site = key
    layout = parse_site(site)[1].layout
    T = n_prompt if step == 0 else 1
    if site in LAST_ROW_SITES and len(shape) == len(layout) and shape[0] == 1:
        T = 1                                              # the last token's row only
    fixed = {"T": T, "P": (0 if step == 0 else n_prompt + step - 1) + T}
    if len(shape) != len(layout):
        raise _fail(path, f"tensor {step}/{site}: shape {list(shape)} does not fit the layout {layout}")
    for d, n in zip(layout, shape):
        want = fixed.get(d, dims.get(d))
        if want is None:
            dims[d] = n
        elif want != n:
            raise _fail(path, f"tensor {step}/{site}: shape {list(shape)} does not fit the layout {layout} "
                              f"({d} should be {want})")


def _read_header(path: str, fpath: str) -> tuple[dict, int]:
    """(header, data start) of a safetensors file, checking it is complete."""
    fname = os.path.basename(fpath)
    try:
        size = os.path.getsize(fpath)
        with open(fpath, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(path, f"{fname} is truncated ({size} bytes): the run is damaged")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, 100 * 2**20):
                raise _fail(path, f"{fname} is truncated or damaged (header of {n} bytes, file of {size})")
            header = json.loads(f.read(n).decode())
    except FileNotFoundError:
        raise _fail(path, f"{fname} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _fail(path, f"{fname} has a damaged header (not JSON)") from None
    if not isinstance(header, dict):
        raise _fail(path, f"{fname} has a damaged header")
    end = 0
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            a, b = e["data_offsets"]
            want = math.prod(e["shape"]) * ITEMSIZE[e["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise _fail(path, f"{fname}: damaged header entry for {name!r}") from None
        if b - a != want or a < 0:
            raise _fail(path, f"{fname}: header entry {name!r} has {b - a} bytes of data, its shape needs {want}")
        end = max(end, b)
    if size != 8 + n + end:
        what = "truncated" if size < 8 + n + end else "longer than its header says"
        raise _fail(path, f"{fname} is {what} ({size} bytes, expected {8 + n + end}): the run is damaged")
    return header, 8 + n


def sha256_file(path: str) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _trace_meta(m: dict, path: str, storage: str) -> dict:
    e = m.get("engine") if isinstance(m.get("engine"), dict) else {}
    g = m.get("gguf") if isinstance(m.get("gguf"), dict) else {}
    cfg = m.get("config") if isinstance(m.get("config"), dict) else {}
    meta = {"source": e.get("name", "trace"), "architecture": cfg.get("architecture"), "backend": e.get("backend"), "device": e.get("device"),
            "kv_type": e.get("kv_type"), "flash_attn": e.get("flash_attn"), "extra_bufts": e.get("extra_bufts"),
            "provenance": from_engine(e), "device_name": e.get("device_name"),
            "weight_type": m.get("weight_type") or e.get("weight_type") or g.get("weight_type"),
            "gguf": g.get("file"), "versions": e.get("versions"), "run": path, "storage_dtype": storage,
            "unavailable": m.get("unavailable", [])}
    return {k: v for k, v in meta.items() if v is not None}


def load_run(path, filt: SiteFilter | None = None, verify: bool = True) -> RecordedRun:
    """Read and validate the run at ``path``; ``filt`` keeps a subset of (step, site)."""
    from safetensors import safe_open
    path = os.fspath(path)
    if os.path.basename(path) == MANIFEST:
        path = os.path.dirname(path) or "."
    m = read_manifest(path)
    n_layer, n_prompt = m["n_layer"], m["n_prompt"]
    n_steps = len(m["tokens"]) - n_prompt
    dims = _config_dims(m)
    stated = dict(dims)                                   # what the manifest itself states
    by_file: dict[str, list] = {}
    seen: set = set()
    reshape: dict[tuple[int, str], tuple] = {}            # flat (T, H*Dh) projections -> (T, H, Dh)
    for entry in m["tensors"]:
        key = _tensor_key(path, entry, n_layer, n_steps)
        if key in seen:
            raise _fail(path, f"tensor {entry['name']!r} is listed twice")
        seen.add(key)
        native = _native_shape(key, tuple(entry["shape"]), stated, n_prompt)
        if native:
            reshape[key] = native
        _check_layout(path, key, native or tuple(entry["shape"]), dims, n_prompt)
        by_file.setdefault(entry["file"], []).append((key, entry))
    files = m.get("files") if isinstance(m.get("files"), dict) else {}
    trace = Trace(n_layer, tokens=list(m["tokens"]), n_prompt=n_prompt)
    dtypes: dict[tuple[int, str], str] = {}
    for fname, entries in by_file.items():
        fpath = os.path.join(path, fname)
        header, _ = _read_header(path, fpath)
        info = files.get(fname) if isinstance(files.get(fname), dict) else {}
        if verify and info.get("sha256") and sha256_file(fpath) != info["sha256"]:
            raise _fail(path, f"{fname} does not match the sha256 in the manifest: the file is corrupted")
        for (step, site), e in entries:
            h = header.get(e["name"])
            if h is None:
                raise _fail(path, f"{fname} has no tensor {e['name']!r} (listed in the manifest)")
            if h.get("dtype") != e["dtype"] or list(h.get("shape", [])) != list(e["shape"]):
                raise _fail(path, f"{fname}: tensor {e['name']!r} is {h.get('dtype')} {h.get('shape')} "
                                  f"in the file, {e['dtype']} {e['shape']} in the manifest")
        wanted = [(k, e) for k, e in entries if filt is None or filt.wants(*k)]
        if not wanted:
            continue
        try:
            with safe_open(fpath, framework="pt") as f:
                for (step, site), e in wanted:
                    t = f.get_tensor(e["name"])
                    dtypes[(step, site)] = STORAGE_OF_TAG[e["dtype"]]
                    t = t.float() if t.dtype != torch.float32 else t
                    trace.tensors[(step, site)] = t.reshape(reshape[step, site]) if (step, site) in reshape else t
        except Exception as ex:  # safetensors raises its own error types on damaged files
            raise _fail(path, f"{fname} cannot be read ({type(ex).__name__}: {ex})") from None
    storage = max(set(dtypes.values()) or {"float32"}, key=lambda s: UNIT_ROUNDOFF[s])
    trace.meta = _trace_meta(m, path, storage)
    return RecordedRun(path, m, trace, storage, dtypes)


def load_tensor(path, step: int, site: str) -> torch.Tensor:
    """One tensor of a run (float32), reading only its file's header and its own bytes."""
    from safetensors import safe_open
    path = os.fspath(path)
    m = read_manifest(path)
    name = f"{int(step)}/{site}"
    for e in m["tensors"]:
        if isinstance(e, dict) and e.get("name") == name:
            _tensor_key(path, e, m["n_layer"], len(m["tokens"]) - m["n_prompt"])
            fpath = os.path.join(path, e["file"])
            _read_header(path, fpath)
            with safe_open(fpath, framework="pt") as f:
                t = f.get_tensor(name).float()
            native = _native_shape((int(step), site), tuple(t.shape), _config_dims(m), m["n_prompt"])
            return t.reshape(native) if native else t
    raise RunError(f"{path}: no tensor {name!r} in this run")


# -- writing -----------------------------------------------------------------------------------
def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RunError(f"run name {name!r}: use letters, digits, '.', '_', '-' (not starting with '.')")
    return name


def write_trace(trace: Trace, out_dir, dtype: str = "float32", overwrite: bool = False, **manifest) -> str:
    """Write any in-memory Trace in the trace format (atomically); returns the directory."""
    try:
        w = TraceWriter(os.fspath(out_dir), trace.n_layer, trace.n_prompt, tokens=trace.tokens,
                        dtype=dtype, overwrite=overwrite, **manifest)
        with w:
            for (step, site), t in trace.items():
                w.add(step, site, t.detach().float().cpu().numpy())
    except TraceWriteError as e:
        raise RunError(f"{out_dir}: {e}") from None
    return w.out_dir


# -- comparing ---------------------------------------------------------------------------------
class StoragePolicy(Policy):
    """The tolerance policy, widened for traces stored in a lower precision: a float16-stored
    tensor carries up to one float16 rounding (2^-11 relative per element) that neither engine
    made, and a local recomputation on float16-rounded inputs carries it through one more op.
    Each tolerance is therefore at least the policy's own floor for that dtype
    (FLOOR_UNITS unit roundoffs for rel, :func:`~harness.compare.tolerance.max_floor` of that for max)."""

    def __init__(self, backend: str, weight_type: str, dtype: str = "float32", storage: str = "float32",
                 table: dict | None = None, site_types: dict[str, str] | None = None):
        super().__init__(backend, weight_type, dtype, table, site_types=site_types)
        self.storage = storage

    def tolerance(self, family: str, kind: str = "local", wclass: str | None = None) -> Tol:
        t = super().tolerance(family, kind, wclass)
        if self.storage == "float32":
            return t
        floor = FLOOR_UNITS * UNIT_ROUNDOFF[self.storage]
        return Tol(max(t.rel, floor), max(t.max, max_floor(family, floor)))

    def describe(self) -> dict:
        d = super().describe()
        d["storage_dtype"] = self.storage
        if self.storage != "float32":
            d["exact"] = False
        return d


def check_compatible(ref: Trace, cand: Trace, ref_name: str = "reference", cand_name: str = "candidate") -> int:
    """Raise RunError unless ``cand`` can be compared with ``ref``; returns the number of common tensors."""
    if ref.n_layer != cand.n_layer:
        raise RunError(f"{cand_name} has {cand.n_layer} layers, {ref_name} has {ref.n_layer}")
    if ref.n_prompt != cand.n_prompt:
        raise RunError(f"{cand_name} has a {cand.n_prompt}-token prompt, {ref_name} one of {ref.n_prompt}")
    n = min(len(ref.tokens), len(cand.tokens))
    if list(ref.tokens[:n]) != list(cand.tokens[:n]):
        i = next(i for i in range(n) if ref.tokens[i] != cand.tokens[i])
        raise RunError(f"{cand_name} was run on other tokens than {ref_name} (position {i}: "
                       f"{cand.tokens[i]} vs {ref.tokens[i]})")
    common = 0
    for key, r in ref.tensors.items():
        if key in cand.tensors:
            if tuple(cand.tensors[key].shape) != tuple(r.shape):
                raise RunError(f"incompatible shapes at {key[1]} step {key[0]}: {cand_name} "
                               f"{list(cand.tensors[key].shape)}, {ref_name} {list(r.shape)}")
            common += 1
    if not common:
        raise RunError(f"{cand_name} and {ref_name} have no (step, site) in common")
    return common


def policy_for(ref: RecordedRun, cand_storage: str = "float32", dtype: str = "float32",
               cand_meta: dict | None = None, site_types: dict[str, str] | None = None) -> StoragePolicy:
    """Policy of the reference's backend and weight type (falling back to the candidate's);
    ``site_types``: each weight matmul site's weight type (``harness.diff.site_weight_types`` of
    the run's GGUF), so that each gets its own class's local tolerance; without it, the file's."""
    cand_meta = cand_meta or {}
    backend = ref.backend or cand_meta.get("backend") or "cpu"
    if backend not in ("cpu", "cuda"):
        backend = "cuda" if "cuda" in str(backend).lower() else "cpu"
    wt = ref.weight_type or cand_meta.get("weight_type") or "F32"
    storage = max({ref.storage, cand_storage}, key=lambda s: UNIT_ROUNDOFF[s])
    return StoragePolicy(backend, wt, dtype, storage, site_types=site_types)


def compare_runs(ref: RecordedRun, cand: RecordedRun | Trace, local: Trace | None = None, dtype: str = "float32",
                 site_types: dict[str, str] | None = None):
    """Divergence table of ``cand`` against the reference run (end-to-end errors, plus local
    errors when ``local`` is given; ``site_types``: see :func:`policy_for`)."""
    from harness.compare.comparator import compare_traces
    cand_trace = cand.trace if isinstance(cand, RecordedRun) else cand
    cand_storage = cand.storage if isinstance(cand, RecordedRun) else "float32"
    check_compatible(ref.trace, cand_trace, ref.path, cand.path if isinstance(cand, RecordedRun) else "candidate")
    policy = policy_for(ref, cand_storage, dtype, cand_trace.meta, site_types)
    cmp = compare_traces(cand_trace, ref.trace, policy, local, judge_unanchored=False)  # a subset's inputs: drift
    cmp.meta.update(reference_run=ref.path, storage_dtype=policy.storage)
    return cmp
