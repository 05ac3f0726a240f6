"""Reference writer of the llamadiff trace format, version 1 (spec: docs/trace-format.md).

Standalone on purpose: it imports only the standard library and numpy, never ``harness``, so it
can be copied as one file into another engine's project. An engine that runs a Qwen2 model
teacher-forced on a token list calls ``add(step, site, array)`` for every hook site it has and
``close()`` at the end; the result is a trace directory that ``llamadiff compare`` and
``llamadiff gate --candidate DIR`` read::

    from trace_writer import TraceWriter
    with TraceWriter("my_run", n_layer=24, tokens=prompt + decoded, n_prompt=len(prompt),
                     engine={"name": "my-engine", "backend": "cuda"}) as w:
        w.add(0, "embd", embd_rows)               # (T, D) float32, T = len(prompt) at step 0
        w.add(0, "blk.0.q", q)                    # (T, H, Dh)
        ...                                       # close() runs when the block ends

A trace directory holds ``manifest.json`` (written last: no manifest, no trace) and one
safetensors file per step (``step-0000.safetensors``, ...), tensors named ``"{step}/{site}"``.
The directory is built under a hidden temporary name next to the target and renamed into place,
so an interrupted writer never leaves something that looks like a complete trace.

The safetensors files are written by hand below (8-byte little-endian header length, JSON
header, raw little-endian row-major data): the same ~20 lines a C++ or Rust engine needs.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid

import numpy as np

FORMAT = "llamadiff-trace"
FORMAT_VERSION = 1

# Canonical hook sites and their layouts (a copy of harness/sites.py; a test keeps them equal).
# T: tokens of this step, P: positions attended over (cached + T), D: hidden size, F: FFN size,
# H / Hkv: query / key-value heads, Dh: head size, V: vocabulary size.
GLOBAL_LAYOUTS = {"embd": ("T", "D"), "output_norm": ("T", "D"), "logits": ("T", "V")}
LAYER_LAYOUTS = {
    "attn_norm": ("T", "D"), "q_proj": ("T", "H", "Dh"), "q": ("T", "H", "Dh"),
    "k_proj": ("T", "Hkv", "Dh"), "k": ("T", "Hkv", "Dh"), "v_proj": ("T", "Hkv", "Dh"),
    "v": ("T", "Hkv", "Dh"), "q_norm": ("T", "H", "Dh"), "k_norm": ("T", "Hkv", "Dh"),
    "q_rope": ("T", "H", "Dh"), "k_rope": ("T", "Hkv", "Dh"),
    "kq": ("H", "T", "P"), "attn_weights": ("H", "T", "P"), "kqv": ("T", "H", "Dh"),
    "attn_out": ("T", "D"), "ffn_inp": ("T", "D"), "ffn_norm": ("T", "D"), "ffn_gate": ("T", "F"),
    "ffn_up": ("T", "F"), "ffn_act": ("T", "F"), "ffn_out": ("T", "D"), "l_out": ("T", "D"),
}
STORAGE = {"float32": (np.dtype("<f4"), "F32"), "float16": (np.dtype("<f2"), "F16")}
# Kept in float32 even in a float16 trace: raw attention scores reach the hundreds (Qwen2's q/k
# bias outliers), where float16's spacing is 0.125-0.5, and the softmax turns that into percent-
# level errors of the attention weights recomputed from them.
KEEP_FLOAT32 = ("kq",)
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)$")
_F16_MAX = float(np.finfo(np.float16).max)


class TraceWriteError(ValueError):
    """A tensor or argument the format cannot hold; one-line message."""


def site_layout(site: str, n_layer: int) -> tuple[str, ...]:
    """Layout of a canonical site name, or TraceWriteError."""
    m = _LAYER_RE.match(site)
    if m and m.group(2) in LAYER_LAYOUTS:
        if int(m.group(1)) >= n_layer:
            raise TraceWriteError(f"site {site!r}: layer {m.group(1)} but the model has {n_layer} layers")
        return LAYER_LAYOUTS[m.group(2)]
    if site in GLOBAL_LAYOUTS:
        return GLOBAL_LAYOUTS[site]
    raise TraceWriteError(f"unknown site {site!r} (canonical names: 'embd', 'blk.0.q_rope', 'logits', ...)")


def safetensors_bytes(tensors: list[tuple[str, np.ndarray, str]], metadata: dict | None = None) -> list:
    """The pieces of a safetensors file: [header length (u64 LE), JSON header, data...].

    ``tensors`` is ``[(name, array, dtype tag)]`` with arrays already in the tag's dtype."""
    header, offset, blobs = {}, 0, []
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, arr, tag in tensors:
        data = np.ascontiguousarray(arr).tobytes()          # row-major (C order), little endian
        header[name] = {"dtype": tag, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)                             # pad with spaces: data starts 8-aligned
    return [len(head).to_bytes(8, "little"), head] + blobs


def write_safetensors(path: str, tensors: list[tuple[str, np.ndarray, str]], metadata: dict | None = None) -> str:
    """Write a safetensors file; returns its sha256 (hex)."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for piece in safetensors_bytes(tensors, metadata):
            f.write(piece)
            h.update(piece)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def dump_manifest(m: dict) -> str:
    """JSON text of a manifest: one line per field, one line per tensor and per file."""
    def one(v) -> str:
        return json.dumps(v, allow_nan=False)
    lines = []
    for k, v in m.items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            val = "[\n" + ",\n".join(f"  {one(x)}" for x in v) + "\n ]"
        elif isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
            val = "{\n" + ",\n".join(f"  {one(n)}: {one(x)}" for n, x in v.items()) + "\n }"
        else:
            val = one(v)
        lines.append(f" {one(k)}: {val}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


class TraceWriter:
    """Writes one trace directory. ``dtype`` is the storage type: "float32" (exact) or "float16"
    (half the size; the sites named in ``keep_float32`` and any tensor that would overflow
    float16 stay float32, so readers must honour each tensor's dtype). Extra keyword arguments
    go into the manifest as they are (they must be JSON-serializable)."""

    def __init__(self, out_dir: str, n_layer: int, n_prompt: int, tokens: list[int] | None = None,
                 steps: int | None = None, dtype: str = "float32", overwrite: bool = False,
                 keep_float32: tuple[str, ...] = KEEP_FLOAT32, **manifest):
        if tokens is not None:
            tokens = [int(t) for t in tokens]
            if steps is not None and steps != len(tokens) - int(n_prompt):
                raise TraceWriteError(f"steps={steps} but the tokens give {len(tokens) - int(n_prompt)}")
            steps = len(tokens) - int(n_prompt)
        if steps is None or int(steps) < 0:
            raise TraceWriteError("give the tokens (prompt + decode inputs) or the number of decode steps")
        if not isinstance(n_layer, int) or n_layer < 1:
            raise TraceWriteError(f"n_layer must be a positive integer, got {n_layer!r}")
        if int(n_prompt) < 1 or (tokens is not None and int(n_prompt) > len(tokens)):
            raise TraceWriteError(f"n_prompt must be at least 1 and at most the number of tokens, got {n_prompt}")
        if dtype not in STORAGE:
            raise TraceWriteError(f"storage dtype must be one of {', '.join(STORAGE)}, got {dtype!r}")
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        if os.path.exists(self.out_dir) and not overwrite:
            raise TraceWriteError(f"{self.out_dir} already exists (pass overwrite=True to replace it)")
        self.n_layer, self.tokens, self.n_prompt, self.dtype = n_layer, tokens, int(n_prompt), dtype
        self.overwrite, self.extra, self.keep_float32 = overwrite, manifest, tuple(keep_float32)
        self.n_steps = int(steps)
        self.dims: dict[str, int] = {}
        self.entries: list[dict] = []
        self.files: dict[str, dict] = {}
        self.pending: dict[int, list] = {}
        self.flushed: set[int] = set()
        self.seen: set[tuple[int, str]] = set()
        parent, base = os.path.split(self.out_dir)
        os.makedirs(parent, exist_ok=True)
        self.tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.mkdir(self.tmp)
        self.closed = False

    # -- adding tensors ---------------------------------------------------------------------
    def _check_shape(self, step: int, site: str, shape: tuple[int, ...]) -> None:
        layout = site_layout(site, self.n_layer)
        if len(shape) != len(layout):
            raise TraceWriteError(f"{step}/{site}: shape {shape} has {len(shape)} dims, "
                                  f"layout {layout} has {len(layout)}")
        T = self.n_prompt if step == 0 else 1
        fixed = {"T": T, "P": (0 if step == 0 else self.n_prompt + step - 1) + T}
        for d, n in zip(layout, shape):
            want = fixed.get(d, self.dims.get(d))
            if want is None:
                self.dims[d] = n
            elif n != want:
                raise TraceWriteError(f"{step}/{site}: shape {shape} does not fit layout {layout} "
                                      f"({d} is {want} here, got {n})")

    def add(self, step: int, site: str, array) -> None:
        """Add the tensor of ``site`` at ``step`` (any float array in the site's layout)."""
        if self.closed:
            raise TraceWriteError("the writer is closed")
        step = int(step)
        if not 0 <= step <= self.n_steps:
            raise TraceWriteError(f"step {step} out of range: the tokens give steps 0..{self.n_steps}")
        if (step, site) in self.seen:
            raise TraceWriteError(f"{step}/{site} added twice")
        if step in self.flushed:
            raise TraceWriteError(f"step {step} was already written; add each step's tensors before the next step's")
        arr = np.asarray(array)
        if arr.dtype.kind not in "fiu":
            raise TraceWriteError(f"{step}/{site}: dtype {arr.dtype} is not numeric")
        self._check_shape(step, site, tuple(int(n) for n in arr.shape))
        np_dtype, tag = STORAGE[self.dtype]
        if tag == "F16" and (site.rsplit(".", 1)[-1] in self.keep_float32
                             or bool(np.any(np.abs(arr[np.isfinite(arr)]) > _F16_MAX))):
            np_dtype, tag = STORAGE["float32"]                 # ill-conditioned or would overflow
        self.seen.add((step, site))
        for s in [s for s in self.pending if s < step]:      # earlier steps are complete
            self._flush(s)
        self.pending.setdefault(step, []).append((f"{step}/{site}", arr.astype(np_dtype), tag))

    def _flush(self, step: int) -> None:
        items = self.pending.pop(step)
        fname = f"step-{step:04d}.safetensors"
        sha = write_safetensors(os.path.join(self.tmp, fname), items, {"format": "np", "step": str(step)})
        self.files[fname] = {"bytes": os.path.getsize(os.path.join(self.tmp, fname)), "sha256": sha}
        self.entries += [{"name": n, "file": fname, "dtype": tag, "shape": list(a.shape)} for n, a, tag in items]
        self.flushed.add(step)

    # -- finishing ----------------------------------------------------------------------------
    def manifest(self) -> dict:
        m = {"format": FORMAT, "format_version": FORMAT_VERSION, "n_layer": self.n_layer,
             "tokens": self.tokens, "n_prompt": self.n_prompt, "steps": self.n_steps,
             "storage_dtype": self.dtype, "dims": dict(self.dims)}
        clash = sorted(set(self.extra) & (set(m) | {"tensors", "files"}))
        if clash:
            raise TraceWriteError(f"manifest fields {', '.join(clash)} are set by the writer itself")
        m.update(self.extra)
        m["tensors"], m["files"] = self.entries, self.files
        return m

    def close(self, tokens: list[int] | None = None, **manifest) -> str:
        """Write the remaining tensors and the manifest (``tokens`` and extra fields may be given
        here when only known at the end, e.g. greedy decoding), move the directory into place."""
        if self.closed:
            return self.out_dir
        try:
            if tokens is not None:
                tokens = [int(t) for t in tokens]
                if len(tokens) != self.n_prompt + self.n_steps:
                    raise TraceWriteError(f"{len(tokens)} tokens, expected n_prompt + steps = "
                                          f"{self.n_prompt + self.n_steps}")
                self.tokens = tokens
            if self.tokens is None:
                raise TraceWriteError("the tokens were never given")
            if not self.seen:
                raise TraceWriteError("no tensors were added")
            self.extra.update(manifest)
            for s in sorted(self.pending):
                self._flush(s)
            text = dump_manifest(self.manifest())
            path = os.path.join(self.tmp, "manifest.json")
            with open(path, "w") as f:                         # the manifest is written last
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self.closed = True
        return self.out_dir

    def _move_into_place(self) -> None:
        old = None
        if os.path.exists(self.out_dir):
            if not self.overwrite:
                raise TraceWriteError(f"{self.out_dir} already exists")
            old = f"{self.tmp}.old"
            os.rename(self.out_dir, old)
        os.rename(self.tmp, self.out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Drop everything written so far (the target directory is left untouched)."""
        self.closed = True
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
