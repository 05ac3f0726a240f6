"""llama.cpp in a worker process, so that a crash inside it never takes the caller down.

llama.cpp can die in ways Python cannot catch: a SIGSEGV (its AMX repacking on some CPUs), a
SIGABRT from a ``GGML_ASSERT``, an out-of-memory kill. Every command and the notebook API
therefore talk to llama.cpp through :class:`IsolatedRunner`, which has the interface of
:class:`~harness.llama.runner.LlamaRunner` but runs it in a long-lived worker
(``python -m harness.llama.worker``, started on first use and reused). The worker reports the
stage it is in (load, decode step N, capture step N) before each one; when it dies, the caller
gets a :class:`LlamaCrash` (a :class:`~harness.llama.runner.LlamaError`) naming the signal, the
stage and the likely remedy, and the next call starts a fresh worker.

Tensors come back one step at a time, as each step's ``llama_decode`` finishes: host tensors
as numpy arrays through the pipe, GPU tensors (``keep_on_device``) by CUDA IPC (one handle per
storage, the views rebuilt here), so the GPU path copies nothing. ``isolate=False`` in
:class:`~harness.llama.runner.LlamaOptions` runs llama.cpp in this process instead.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection

import numpy as np
import torch

from harness.llama.runner import LlamaError, LlamaOptions, LlamaRunner
from harness.sites import SiteFilter
from harness.trace import Sink, Trace


class LlamaCrash(LlamaError):
    """The llama.cpp worker process died (signal, abort, out-of-memory kill)."""


_REMEDY = {
    "load": "the GGUF may be damaged or unsupported by this llama.cpp build",
    "context": "the context may be too large for the memory: try a shorter prompt or fewer steps",
    "decode": "try without --extra-bufts (llama.cpp's CPU weight repacking crashes on some CPUs), "
              "--kv-type f32, or a shorter prompt",
    "capture": "the eval callback failed: please report it with the command you ran",
}
_OOM = "the system probably ran out of memory: try a shorter prompt, fewer --steps or --sites"
_ASSERT = "llama.cpp's own assertion failed: the GGUF's metadata or these options are inconsistent for it"


# -- the worker side ---------------------------------------------------------------------------
class _Serve:
    """The worker's request loop: runners by id, replies and step-wise tensors on ``out``."""

    def __init__(self, inp: Connection, out: Connection):
        self.inp, self.out, self.runners, self.next_id = inp, out, {}, 0

    def stage(self, what: str) -> None:
        self.out.send(("stage", what))

    def loop(self) -> None:
        while True:
            try:
                req = self.inp.recv()
            except EOFError:
                return
            if req[0] == "exit":
                return
            try:
                self.out.send(("ok", getattr(self, "do_" + req[0])(*req[1:])))
            except Exception as e:  # noqa: BLE001 - every error goes back to the caller
                self.out.send(("error", e if isinstance(e, LlamaError) else LlamaError(f"{type(e).__name__}: {e}")))

    def do_open(self, path, options, n_ctx_needed):
        self.stage("load")
        r = LlamaRunner(path, options, n_ctx_needed, on_stage=self.stage)
        self.next_id += 1
        self.runners[self.next_id] = r
        return self.next_id, {k: getattr(r, k) for k in ("config", "weight_type", "n_vocab", "n_ctx", "n_ubatch", "meta",
                                                  "gpu")}

    def do_close(self, rid):
        r = self.runners.pop(rid, None)
        if r is not None:
            r.close()

    def do_tokenize(self, rid, text):
        return self.runners[rid].tokenize(text)

    def do_logits_plain(self, rid, prompt, steps, decode_tokens):
        return self.runners[rid].logits_plain(prompt, steps, decode_tokens)

    def do_run(self, rid, prompt, steps, decode_tokens, filt, capture):
        r, batch = self.runners[rid], _Batch(self.out)
        trace = r.run(prompt, steps, decode_tokens, sink=batch, filt=filt, capture=capture)
        batch.flush()
        return trace.tokens, trace.n_prompt, trace.meta, r.last_logits

    def do_call(self, fn, args):
        return fn(*args)


class _Batch:
    """A sink that sends one step's tensors at a time."""

    def __init__(self, out: Connection):
        self.out, self.items, self.step = out, [], None

    def __call__(self, step, site, x):
        if step != self.step:
            self.flush()
            self.step = step
        self.items.append(((step, site), x))

    def flush(self):
        if self.items:
            self.out.send(("tensors", _pack(dict(self.items))))
            self.items = []

    def batch_done(self, step, pos0, tokens):
        """After each llama_decode (a step, or a micro-batch of the prefill): its tensors, then
        the marker, so that the caller can compare them and free them before the next batch."""
        self.flush()
        self.out.send(("batch", (step, pos0, list(tokens))))


def _pack(tensors: dict) -> tuple:
    """Tensors for the pipe: host ones as numpy arrays; CUDA ones as views of a few shared
    storages, since each CUDA IPC handle costs ~0.1-0.3 ms: a storage several tensors view (a
    capture arena chunk) is shared as it is, tensors alone in their storage are copied into one
    flat buffer first."""
    host, by_storage = {}, {}
    for key, x in tensors.items():
        if x.is_cuda:
            by_storage.setdefault(x.untyped_storage().data_ptr(), []).append((key, x))
        else:
            host[key] = x.contiguous().numpy()
    views, storages, loose = {}, [], []
    for group in by_storage.values():
        if len(group) == 1:
            loose.extend(group)
            continue
        x0 = group[0][1]
        storages.append(torch.empty(0, dtype=torch.uint8, device=x0.device).set_(x0.untyped_storage()))
        for key, x in group:
            views[key] = (len(storages) - 1, x.dtype, x.storage_offset(), tuple(x.shape), x.stride())
    if loose:
        parts, off = [], 0
        for key, x in loose:
            pad = -off % 16
            if pad:
                parts.append(torch.zeros(pad, dtype=torch.uint8, device=x.device))
            x = x.contiguous()
            views[key] = (len(storages), x.dtype, (off + pad) // x.element_size(), tuple(x.shape), x.stride())
            parts.append(x.reshape(-1).view(torch.uint8))
            off += pad + parts[-1].numel()
        storages.append(torch.cat(parts))
    return host, views, storages


def _unpack(packed: tuple) -> dict:
    host, views, storages = packed
    out = {k: torch.from_numpy(v) for k, v in host.items()}
    for key, (i, dtype, off, shape, stride) in views.items():
        base = storages[i]
        out[key] = torch.empty(0, dtype=dtype, device=base.device).set_(base.untyped_storage(), off, shape, stride)
    return out


def main(fd_in: int, fd_out: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the caller decides what an interrupt does
    import faulthandler
    faulthandler.enable()                             # a crash's Python stack goes to the log file
    torch.set_num_threads(1)                          # llama.cpp has its own threads
    import torch.multiprocessing as _mp  # noqa: F401 - registers the CUDA tensor reductions (IPC handles)
    _Serve(Connection(fd_in, writable=False), Connection(fd_out, readable=False)).loop()


# -- the caller side ---------------------------------------------------------------------------
class Worker:
    """One worker process and its pipes. Requests are serialized by a lock."""

    def __init__(self):
        import torch.multiprocessing as _mp  # noqa: F401 - CUDA tensor reductions for the replies
        c_in, w_out = os.pipe()
        w_in, c_out = os.pipe()
        self.log = tempfile.TemporaryFile(prefix="llamadiff-worker-")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, GGML_NO_BACKTRACE="1",      # no gdb attach on GGML_ASSERT
                   PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "harness.llama.worker", str(w_in), str(w_out)], pass_fds=(w_in, w_out),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log, env=env,
            start_new_session=True)
        os.close(w_in)
        os.close(w_out)
        self.send, self.recv = Connection(c_out, readable=False), Connection(c_in, writable=False)
        self.lock = threading.RLock()
        self.stage = "start"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def request(self, *req, on_tensors=None, on_batch=None, what: str = ""):
        """Send one request; hand streamed tensors to ``on_tensors``; return the reply. Anything
        that interrupts a request half-way (a crash, Ctrl-C, an error in ``on_tensors``) ends
        this worker: its pipe is no longer in step; the next call starts a fresh one."""
        with self.lock:
            try:
                self.send.send(req)
                while True:
                    kind, body = self._next()
                    if kind == "stage":
                        self.stage = body
                    elif kind == "tensors":
                        if on_tensors is not None:
                            on_tensors(_unpack(body))
                    elif kind == "batch":
                        if on_batch is not None:
                            on_batch(*body)
                    else:
                        break
            except (BrokenPipeError, EOFError, ConnectionResetError):
                self.kill()
                raise self.crash(what) from None
            except BaseException:
                self.kill()
                raise
        if kind == "error":
            raise body          # a clean error from the worker (bad token, unloadable GGUF...)
        return body

    def _next(self):
        while not self.recv.poll(0.2):
            if not self.alive():
                raise EOFError
        return self.recv.recv()

    def crash(self, what: str) -> LlamaCrash:
        rc = self.proc.wait()
        try:
            sig = signal.Signals(-rc).name if rc < 0 else f"exit code {rc}"
        except ValueError:
            sig = f"signal {-rc}"
        told = self._last_log_line()
        remedy = _OOM if rc == -signal.SIGKILL else _ASSERT if "GGML_ASSERT" in told \
            else _REMEDY.get(self.stage.split(" ")[0], "")
        return LlamaCrash(f"llama.cpp crashed ({sig}) at {self.stage}{' of ' + what if what else ''}"
                          f"{': ' + told if told else ''}; {remedy}".rstrip("; "))

    def _last_log_line(self) -> str:
        """llama.cpp's own last word (a GGML_ASSERT or error line) from the worker's stderr."""
        try:
            self.log.seek(0)
            lines = self.log.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        said = [ln.strip() for ln in lines if "GGML_ASSERT" in ln] or \
            [ln.strip() for ln in lines if "error" in ln.lower()
             and not ln.startswith("Fatal Python") and not ln.lstrip().startswith("File ")]   # not stack lines
        return re.sub(r"^\S*/", "", said[-1])[:200] if said else ""      # no build path

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        for c in (self.send, self.recv):
            c.close()

    def close(self) -> None:
        if self.alive():
            try:
                self.send.send(("exit",))
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        self.log.close()


_WORKER: Worker | None = None
_WORKER_LOCK = threading.Lock()


def worker() -> Worker:
    """The shared worker process, (re)started when there is none or the last one died."""
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None or not _WORKER.alive():
            if _WORKER is not None:
                _WORKER.kill()
            _WORKER = Worker()
        return _WORKER


def stop_worker() -> None:
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is not None:
            _WORKER.close()
            _WORKER = None


def run_isolated(fn, *args):
    """Call the module-level function ``fn(*args)`` in the worker process; its result comes back
    pickled. A crash raises :class:`LlamaCrash`."""
    return worker().request("call", fn, args, what=getattr(fn, "__name__", ""))


class IsolatedRunner:
    """:class:`~harness.llama.runner.LlamaRunner`'s interface, with llama.cpp in the worker."""

    def __init__(self, gguf_path, options: LlamaOptions | None = None, n_ctx_needed: int = 512):
        self.path, self.options = os.fspath(gguf_path), options or LlamaOptions()
        self.what = os.path.basename(self.path)
        self.w = worker()
        self.rid, attrs = self.w.request("open", self.path, self.options, n_ctx_needed, what=self.what)
        for k, v in attrs.items():
            setattr(self, k, v)
        self.last_logits: list[np.ndarray] = []

    def _ask(self, *req, on_tensors=None, on_batch=None):
        if self.rid is None or self.w is not worker_if_alive():
            raise LlamaError(f"{self.what}: the llama.cpp worker of this runner is gone (closed or crashed)")
        try:
            return self.w.request(req[0], self.rid, *req[1:], on_tensors=on_tensors, on_batch=on_batch,
                                  what=self.what)
        except LlamaCrash:
            self.rid = None
            raise

    def tokenize(self, text: str) -> list[int]:
        return self._ask("tokenize", text)

    def run(self, prompt, steps: int = 0, decode_tokens=None, sink: Sink | None = None,
            filt: SiteFilter | None = None, capture: bool = True) -> Trace:
        if self.options.ubatch and capture and not hasattr(sink, "batch_done"):
            raise LlamaError("a micro-batched run hands each batch's tensors over as it comes: give a sink "
                             "with a batch_done(step, pos0, tokens) method (a Trace would keep only the last batch)")
        trace = Trace(self.config.n_layer)
        out = sink or trace

        def hand(tensors):
            for (step, site), x in tensors.items():
                out(step, site, x)
        tokens, n_prompt, meta, self.last_logits = self._ask(
            "run", list(prompt), steps, decode_tokens, filt, capture, on_tensors=hand,
            on_batch=getattr(sink, "batch_done", None))
        trace.tokens, trace.n_prompt, trace.meta = tokens, n_prompt, dict(meta, isolated=True)
        return trace

    def logits_plain(self, prompt, steps: int = 0, decode_tokens=None) -> list[np.ndarray]:
        return self._ask("logits_plain", list(prompt), steps, decode_tokens)

    def close(self) -> None:
        if self.rid is not None and self.w.alive():
            try:
                self.w.request("close", self.rid, what=self.what)
            except LlamaError:
                pass
        self.rid = None

    def __enter__(self) -> "IsolatedRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def worker_if_alive() -> Worker | None:
    return _WORKER if _WORKER is not None and _WORKER.alive() else None


def open_runner(gguf_path, options: LlamaOptions | None = None, n_ctx_needed: int = 512):
    """A runner for ``gguf_path``: in the worker process unless ``options.isolate`` is off."""
    options = options or LlamaOptions()
    cls = IsolatedRunner if options.isolate else LlamaRunner
    return cls(gguf_path, options, n_ctx_needed)


def _prompt_tokens(runner, prompt: list[int] | str) -> list[int]:
    return runner.tokenize(prompt) if isinstance(prompt, str) else list(prompt)


def n_ctx_needed(prompt: list[int] | str, steps: int) -> int:
    """Context cells for a prompt plus ``steps``; a text prompt's bytes bound its token count
    (byte-level BPE)."""
    n = len(prompt.encode()) + 8 if isinstance(prompt, str) else len(prompt)
    return max(n + max(steps, 0), 1)


def capture(gguf_path, prompt: list[int] | str, steps: int = 0, options: LlamaOptions | None = None,
            filt: SiteFilter | None = None, sink: Sink | None = None,
            decode_tokens: list[int] | None = None) -> Trace:
    """One-shot: load, run (prefill + ``steps`` decodes) capturing ``filt``'s sites, free."""
    with open_runner(gguf_path, options, n_ctx_needed(prompt, steps)) as r:
        return r.run(_prompt_tokens(r, prompt), steps, decode_tokens, sink=sink, filt=filt)


def observer_check(gguf_path, prompt: list[int] | str, steps: int = 3,
                   options: LlamaOptions | None = None) -> dict:
    """Does observing change the computation? Runs the capturing context (every site copied out,
    then dropped) and a second context without any eval callback on the same tokens, and
    compares each step's last-row logits."""
    with open_runner(gguf_path, options, n_ctx_needed(prompt, steps)) as r:
        prompt = _prompt_tokens(r, prompt)
        trace = r.run(prompt, steps, sink=lambda *a: None)
        observed = r.last_logits
        plain = r.logits_plain(prompt, steps, decode_tokens=trace.tokens[len(prompt):])
    diffs = [float(np.abs(a - b).max()) for a, b in zip(observed, plain)]
    return {"tokens": trace.tokens, "n_prompt": len(prompt), "max_abs_diff": diffs,
            "identical": all(d == 0.0 for d in diffs),
            "method": "capturing eval callback vs a context without callback, same model and tokens"}


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
