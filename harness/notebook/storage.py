"""The drill-down's data on disk, read on demand.

* :func:`save_trace` / :func:`read_trace`: one trace as one safetensors file, its tensors read one
  site at a time when asked for (:class:`LazyTensors`);
* :func:`save_result` / :func:`load_result`: a whole comparison in a folder (``run.json`` and the
  three traces), what :meth:`~harness.notebook.run.Drilldown.save` and
  :func:`harness.notebook.run.load` use;
* :func:`open_recorded`: a recorded run (:mod:`harness.runs.store`) whose tensors are read on
  demand; :func:`load_reference`: the reference side from any of these, or from memory.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, MutableMapping

import pandas as pd
import torch

from harness.compare.comparator import Comparison, FirstDivergence
from harness.diff import DiffResult
from harness.trace import Trace

RUN_FORMAT = 1


class LazyTensors(MutableMapping):
    """``(step, site) -> tensor`` backed by safetensors files: ``names`` maps each key to
    ``(file, tensor name)``; a tensor is read (as float32) when asked for and not kept.
    Assigned tensors live in memory on top."""

    def __init__(self, names: Mapping[tuple[int, str], tuple[str, str]]):
        self.names = dict(names)
        self.extra: dict[tuple[int, str], torch.Tensor] = {}

    def __getitem__(self, key):
        if key in self.extra:
            return self.extra[key]
        path, name = self.names[key]
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            t = f.get_tensor(name)
        return t if t.dtype == torch.float32 else t.float()

    def __setitem__(self, key, value):
        self.extra[key] = value

    def __delitem__(self, key):
        if key in self.extra:
            del self.extra[key]
        else:
            del self.names[key]

    def __contains__(self, key):
        return key in self.extra or key in self.names

    def __iter__(self):
        yield from self.names
        yield from (k for k in self.extra if k not in self.names)

    def __len__(self):
        return len(self.names) + sum(1 for k in self.extra if k not in self.names)


def _tensor_name(step: int, site: str) -> str:
    return f"{step}/{site}"


def save_trace(trace: Trace, path: str | os.PathLike) -> str:
    """One safetensors file: tensors ``"{step}/{site}"``, and the trace's n_layer, tokens,
    n_prompt and meta as JSON in the file's metadata. (A folder of the shareable recorded-run
    format is ``harness.runs.store.write_trace``.)"""
    from safetensors.torch import save_file
    path = os.fspath(path)
    tensors = {_tensor_name(s, n): t.detach().float().cpu().contiguous().clone() for (s, n), t in trace.items()}
    header = dict(format=RUN_FORMAT, n_layer=trace.n_layer, tokens=list(trace.tokens), n_prompt=trace.n_prompt,
                  meta=trace.meta)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"llamadiff_trace": json.dumps(header, default=str)})
    os.replace(tmp, path)
    return path


def read_trace(path: str | os.PathLike) -> Trace:
    """A trace file written by :func:`save_trace`, its tensors read on demand."""
    from safetensors import safe_open
    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        header = json.loads((f.metadata() or {}).get("llamadiff_trace", "null") or "null")
        keys = list(f.keys())
    if header is None:
        raise ValueError(f"{path}: not a llamadiff trace file (no llamadiff_trace metadata)")
    names = {}
    for k in keys:
        step, _, site = k.partition("/")
        names[(int(step), site)] = (path, k)
    return Trace(int(header["n_layer"]), tokens=list(header["tokens"]), n_prompt=int(header["n_prompt"]),
                 meta=dict(header.get("meta") or {}), tensors=LazyTensors(names))


def is_recorded_run(obj) -> bool:
    """A recorded run record (``harness.runs.store.RecordedRun``: its ``trace`` is a Trace)."""
    return obj is not None and not isinstance(obj, Trace) and isinstance(getattr(obj, "trace", None), Trace)


def open_recorded(path: str | os.PathLike, verify: bool = False):
    """A recorded run (``harness.runs.store`` format: a folder with manifest.json and safetensors)
    as a ``harness.runs.store.RecordedRun`` whose trace reads each tensor on demand. The manifest and every
    file header are validated (:func:`harness.runs.store.load_run`) but no tensor is read; ``verify`` also checks
    the files' sha256 (reads them once)."""
    from harness.runs import store as runs
    from harness.sites import SiteFilter
    from harness.compare.tolerance import UNIT_ROUNDOFF
    rec = runs.load_run(os.fspath(path), filt=SiteFilter(steps=frozenset()), verify=verify)   # reads no tensor
    names, storages = {}, set()
    for e in rec.manifest["tensors"]:
        step, _, site = str(e["name"]).partition("/")
        names[(int(step), site)] = (os.path.join(rec.path, e["file"]), e["name"])
        storages.add(runs.STORAGE_OF_TAG[e["dtype"]])
    rec.storage = max(storages or {"float32"}, key=lambda s: UNIT_ROUNDOFF[s])
    rec.trace.meta["storage_dtype"] = rec.storage
    rec.trace.tensors = LazyTensors(names)
    return rec


def load_reference(source, lazy_run: bool = False):
    """The reference side from a :class:`Trace` (as is), a Drilldown/DiffResult (its ``ref``), a trace
    file (:func:`save_trace`), a saved run folder (:meth:`~harness.notebook.run.Drilldown.save`: its ``ref.safetensors``) or
    a recorded reference run folder (``harness.runs.store``; returned as its lazy Trace, or with
    ``lazy_run`` as the ``RecordedRun`` record from :func:`open_recorded`)."""
    if isinstance(source, Trace):
        return source
    if is_recorded_run(source):
        return source if lazy_run else source.trace
    if isinstance(getattr(source, "ref", None), Trace):
        return source.ref
    path = os.fspath(source)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "run.json")):
        return read_trace(os.path.join(path, "ref.safetensors"))
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return read_trace(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.json")) or \
            os.path.basename(path) == "manifest.json":
        rec = open_recorded(path)
        return rec if lazy_run else rec.trace
    raise FileNotFoundError(f"{path}: not a trace file, a saved run folder or a recorded reference run")


def save_result(path: str | os.PathLike, result: DiffResult, gguf: str | None, report: dict) -> str:
    """Write a comparison to folder ``path``: ``run.json`` (``report``, the JSON report, plus what
    :func:`load_result` needs) and ``ref``/``ours``/``local`` ``.safetensors`` traces. Returns the folder."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    for name in ("ref", "ours", "local"):
        trace = getattr(result, name)
        if trace is not None:
            save_trace(trace, os.path.join(path, f"{name}.safetensors"))
    doc = dict(llamadiff_run=RUN_FORMAT, gguf=os.path.abspath(gguf) if gguf else None,
               has_local=result.local is not None, report=report)
    tmp = os.path.join(path, ".run.json.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
    os.replace(tmp, os.path.join(path, "run.json"))
    return path


def load_result(path: str | os.PathLike) -> tuple[DiffResult, str | None]:
    """A comparison written by :func:`save_result`, and its GGUF, without running anything: the table
    and verdict from ``run.json``, the traces read on demand."""
    path = os.fspath(path)
    with open(os.path.join(path, "run.json")) as f:
        doc = json.load(f)
    if doc.get("llamadiff_run") != RUN_FORMAT:
        raise ValueError(f"{path}: not a llamadiff run folder (format {doc.get('llamadiff_run')!r})")
    rep = doc["report"]
    table = _table_from_records(rep["table"])
    first = None
    fd = rep.get("first_divergence")
    if fd:
        rows = {(int(r["step"]), r["site"]): r for r in table.to_dict("records")}
        first = FirstDivergence(int(fd["step"]), fd["layer"], fd["site"], fd["kind"],
                                rows.get((int(fd["step"]), fd["site"]), fd["row"]), list(fd.get("inputs") or []),
                                fd["explanation"], [tuple(x) for x in fd.get("also_failing_locally") or []])
    e2e = rep.get("first_end_to_end_failure")
    cmp = Comparison(table, pd.DataFrame(rep.get("logits") or []), pd.DataFrame(rep.get("logit_spikes") or []),
                     first, tuple(e2e) if e2e else None, rep.get("meta") or {})
    traces = {n: read_trace(os.path.join(path, f"{n}.safetensors"))
              if os.path.isfile(os.path.join(path, f"{n}.safetensors")) else None for n in ("ref", "ours", "local")}
    return DiffResult(cmp, traces["ref"], traces["ours"], traces["local"]), doc.get("gguf")


_FLOAT_COLS = ("layer", "max_abs", "rel_l2", "max_norm", "cosine", "ours", "ref", "tol_rel", "tol_max",
               "local_rel_l2", "local_max_norm", "local_ours", "local_ref", "local_tol_rel", "local_tol_max",
               "sys_slope", "sys_z_slope", "sys_offset", "sys_z_offset", "sys_chan", "sys_z_chan", "sys_score")


def _table_from_records(records: list[dict]) -> pd.DataFrame:
    """Undo the JSON report's encoding of the table (tuples as lists, inf as "inf", NaN as null)."""
    t = pd.DataFrame(records)
    if t.empty:
        return t
    for col in ("shape", "worst_index"):
        if col in t:
            t[col] = t[col].map(lambda v: tuple(v) if isinstance(v, list) else v)
    for col in _FLOAT_COLS:
        if col in t:
            t[col] = pd.to_numeric(t[col].map(lambda v: float(v) if isinstance(v, str) else v), errors="coerce")
    if "local_passed" in t:
        col = t["local_passed"]
        t["local_passed"] = col.astype(bool) if col.notna().all() else col.map(
            lambda v: pd.NA if v is None or pd.isna(v) else bool(v)).astype(object)
    return t
