"""The eval callback that copies llama.cpp's graph nodes out, kept lean because it runs per node.

llama.cpp's scheduler calls the callback for every graph node, first with ``ask=True`` ("do you
want to see this node?"), then, for the nodes we said yes to, with ``ask=False`` right after the
node is computed (each yes splits the graph and synchronizes the device there). The callback does
the least it can: the ask is a dictionary lookup on the node's (name, op); the observe copies the
node's bytes into a chunked arena (a device-to-device copy on the GPU, a memcpy on the
host; the allocator reuses node memory as soon as the callback returns) and records the node's
type, ``ne`` and ``nb``. Turning records into canonical site tensors and handing them to the sink
happens after the step's ``llama_decode`` returns (:meth:`Capture.finish_step`), or, for a sink
that ``streams`` (:class:`harness.stream.Lockstep`), right after each copy, inside the callback. Measured on an
H100 (Qwen2.5-0.5B shapes, 483 nodes per step): a callback that only says yes to those nodes
already costs ~15 us per node over a plain decode (graph split + device synchronize); this one
adds ~25 us (copy ~12 us).

Graph nodes are matched by name *and* op (``Qcur-0`` labels a MUL_MAT, an ADD, a RESHAPE and a
ROPE), see the ``llama_name``/``llama_op`` columns of :mod:`harness.sites`. ``attn_out`` (the
output projection) is an unnamed MUL_MAT (``node_<n>``): it is recognised by its weight operand,
``blk.{i}.attn_output.weight``. ``kq``/``kq_soft_max`` span every KV cell of the (padded, >= 256)
cache view; only the first P cells hold positions of this run (the cache is cleared first).
A Python exception never crosses into C: the first one is recorded, every later node is
declined, and the runner raises it after ``llama_decode``.
"""
from __future__ import annotations

import ctypes
import math
import re

import torch

from harness.llama.ggml_struct import GGML_TYPE_F16, GGML_TYPE_F32, GGMLFuncs, GGMLTensor, cuda_copier
from harness.gguf.arch import QWEN2
from harness.sites import BY_KEY, LAYER_WEIGHTS, SITES, SiteFilter, all_sites, parse_site, shape_of, site_name
from harness.trace import Sink

FLASH_MISSING = ("kq", "attn_weights")   # fused away by FLASH_ATTN_EXT
_TORCH_TYPES = {GGML_TYPE_F32: torch.float32, GGML_TYPE_F16: torch.float16}
_ITEMSIZE = {GGML_TYPE_F32: 4, GGML_TYPE_F16: 2}


def graph_node_sites(spec) -> dict[tuple[str, str | None], str]:
    """(llama.cpp graph name, op) -> site key, for an architecture's sites (``ArchSpec``)."""
    return {(name, op): key for key, (name, op) in spec.graph_names().items() if name}


_NODE_SITES = graph_node_sites(QWEN2)
_LAYER_RE = re.compile(r"^(.+)-(\d+)$")
_UNNAMED_RE = re.compile(rb"^(node_\d+)?$")
_UNNAMED_MM = object()          # classification: an unnamed MUL_MAT, identified by its weight
_REDUCED = {"ffn_inp", "ffn_norm", "ffn_gate", "ffn_up", "ffn_act", "ffn_out", "l_out", "output_norm",
            "logits"}
NOTHING = SiteFilter(steps=frozenset())


def node_site(name: str, op: str, nodes: dict | None = None) -> str | None:
    """Canonical site name of a graph node, or None; ``nodes``: :func:`graph_node_sites` of the
    model's architecture (default qwen2's)."""
    nodes = _NODE_SITES if nodes is None else nodes
    m = _LAYER_RE.match(name)
    base, layer = (m.group(1), int(m.group(2))) if m else (name, None)
    key = nodes.get((base, op)) or nodes.get((base, None))
    if key is None or BY_KEY[key].per_layer != (layer is not None):
        return None
    return site_name(key, layer)


def spec_rows_reduced(site: str, numel: int, dims: dict) -> bool:
    """Whether a last-layer/output site holds only the output row (outputs for the last token only)."""
    return parse_site(site)[1].key in _REDUCED and numel == math.prod(shape_of(site, dict(dims, T=1)))


class Arena:
    """Bump allocation of copy destinations in large chunks (one allocation per chunk instead
    of one per node). The tensors handed out are views, which keep their chunk alive; a chunk is
    filled across steps and runs (never rewritten), so at most one chunk is slack. A node over
    ``OWN`` bytes gets a chunk of its own: in a shared chunk, a view of any small neighbour would
    keep its copy alive after it is converted (an attention-score node is sliced to P positions)."""
    CHUNK = 32 << 20
    OWN = 1 << 20

    def __init__(self, device: str):
        self.device, self.chunk, self.used = device, None, 0

    def take(self, nbytes: int) -> tuple[torch.Tensor, int, int]:
        """(chunk, byte offset, address) of ``nbytes`` fresh bytes, 256-byte aligned."""
        size = -(-nbytes // 256) * 256
        if size > self.OWN:
            chunk = torch.empty(size, dtype=torch.uint8, device=self.device)
            return chunk, 0, chunk.data_ptr()
        if self.chunk is None or self.used + size > self.CHUNK:
            self.chunk, self.used = torch.empty(self.CHUNK, dtype=torch.uint8, device=self.device), 0
            self.base = self.chunk.data_ptr()
        off, self.used = self.used, self.used + size
        return self.chunk, off, self.base + off


def _view(chunk: torch.Tensor, off: int, dtype: torch.dtype, ne, nb) -> torch.Tensor:
    """The copied node as a tensor shaped like reversed ``ne``, honouring its byte strides."""
    el = dtype.itemsize
    size, stride = tuple(reversed(ne)), tuple(b // el for b in reversed(nb))
    return chunk.view(dtype).as_strided(size, stride, off // el)


class Capture:
    """The eval callback and its per-run state."""

    def __init__(self, g: GGMLFuncs, cfg, lc, on_device: bool = False):
        self.g, self.cfg, self.on_device = g, cfg, on_device
        self._nodes = graph_node_sites(cfg.spec)
        self.cb = lc.ggml_backend_sched_eval_callback(self._callback)  # keep alive with the runner
        self._kinds: dict[tuple[bytes, int], object] = {}    # (name, op) -> site | _UNNAMED_MM | None
        self._host_buffers: dict[int, bool] = {}
        self._weights = {f"blk.{i}.{LAYER_WEIGHTS['attn_out']}".encode(): site_name("attn_out", i)
                         for i in range(cfg.n_layer)}
        self._copy = None
        self.dry = False          # observe the wanted nodes (llama.cpp synchronises at each), copy nothing
        self._gpu, self._cpu = Arena("cuda"), Arena("cpu")
        self.start(NOTHING, lambda *a: None)

    def start(self, filt: SiteFilter, sink: Sink, streaming: bool = False) -> None:
        """A run capturing ``filt``'s sites into ``sink``; ``streaming``: each node reaches the
        sink inside the eval callback, right after its copy (the sink may run a layer of our
        model there, before llama.cpp computes the next node), instead of after llama_decode."""
        self.filt, self.sink, self.streaming = filt, sink, streaming
        self.sink_error: BaseException | None = None     # raised by the sink (not by the capture)
        self.step, self.dims = 0, self.cfg.dims()
        self.captured: set[tuple[int, str]] = set()
        self.records: list[tuple] = []
        self.batch_seen: set[str] = set()
        self.want: frozenset[str] = frozenset()
        self.asked: str | None = None
        self.error: BaseException | None = None
        self.error_node = ""
        if self.on_device and self._copy is None:
            self._copy = cuda_copier(torch.cuda.current_stream().cuda_stream)

    def begin_step(self, step: int, T: int, P: int) -> None:
        """Before each llama_decode: a step, or one micro-batch of it (T tokens, P positions)."""
        self.step, self.dims = step, self.cfg.dims(T, P)
        self.records = []
        self.batch_seen: set[str] = set()
        self.want = frozenset(n for n in all_sites(self.cfg.n_layer, self.cfg.spec.sites) if self.filt.wants(step, n))
        self._layouts = {}
        for spec in SITES:       # per site kind: shape, contiguous strides, numel, no slicing needed
            shape = tuple(self.dims[d] for d in spec.layout)
            strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
            self._layouts[spec.key] = (shape, strides, math.prod(shape), spec.key not in FLASH_MISSING)

    # -- inside llama_decode: one call per node, keep it short ---------------------------------
    def _callback(self, addr, ask, _user) -> bool:
        if self.error is not None:
            return False
        try:
            return self._ask(addr) if ask else self._observe(addr)
        except BaseException as e:  # noqa: BLE001 - nothing may cross the ctypes boundary
            self.error = e
            try:
                self.error_node = GGMLTensor.from_address(addr).name.decode(errors="replace")
            except Exception:
                pass
            return False

    def _ask(self, addr) -> bool:
        t = GGMLTensor.from_address(addr)
        key = (t.name, t.op)
        site = self._kinds.get(key, False)
        if site is False:
            site = self._kinds[key] = self._classify(t)
        if site is _UNNAMED_MM:
            site = self._weights.get(GGMLTensor.from_address(t.src[0]).name) if t.src[0] else None
        if site is None or site not in self.want:
            return False
        self.asked = site
        return True

    def _classify(self, t: GGMLTensor):
        op = self.g.op_name(t.op)
        if op == "MUL_MAT" and _UNNAMED_RE.match(t.name):
            return _UNNAMED_MM
        return node_site(t.name.decode(errors="replace"), op, self._nodes)

    def _observe(self, addr) -> bool:
        if self.dry:
            return True
        t = GGMLTensor.from_address(addr)
        el = _ITEMSIZE.get(t.type)
        if el is None:
            raise TypeError(f"tensor {t.name.decode()!r} has type "
                            f"{self.g.lib.ggml_type_name(t.type).decode()}, expected F32 or F16")
        buffer, data, ne, nb = t.buffer, t.data, t.ne[:], t.nb[:]
        if not buffer or not data:
            raise ValueError(f"tensor {t.name.decode()!r} has no backend buffer")
        nbytes = el + sum((n - 1) * b for n, b in zip(ne, nb))      # ggml_nbytes of F32/F16
        host = self._host_buffers.get(buffer)
        if host is None:
            host = self._host_buffers[buffer] = bool(self.g.lib.ggml_backend_buffer_is_host(buffer))
        on_gpu = self.on_device and not host
        chunk, off, ptr = (self._gpu if on_gpu else self._cpu).take(nbytes)
        if on_gpu:
            self._copy(ptr, data, nbytes)
        elif host:
            ctypes.memmove(ptr, data, nbytes)
        else:
            self.g.lib.ggml_backend_tensor_get(addr, ptr, 0, nbytes)
        self.records.append((self.asked, t.name, chunk, off, t.type, ne, nb))
        if self.streaming:
            self.finish_step()
        return True

    # -- after llama_decode ----------------------------------------------------------------------
    def finish_step(self) -> None:
        """Hand the step's copies to the sink as canonical float32 tensors (on the GPU when
        ``on_device``: nodes llama.cpp kept on the host, the embedding lookup, join them). Each
        record is dropped once converted, so a node copied into its own chunk (an attention-score
        node) is freed as soon as its canonical copy exists: the batch is held once, not twice."""
        records, self.records = self.records, []
        typed: dict[int, torch.Tensor] = {}
        for i in range(len(records)):
            (site, node, chunk, off, typ, ne, nb), records[i] = records[i], None
            try:
                x = self._fast_view(site, chunk, off, typ, ne, nb, typed)
                if x is None:
                    x = _view(chunk, off, _TORCH_TYPES[typ], ne, nb).float()
                    if self.on_device and not x.is_cuda:
                        x = x.cuda()
                    x = self._canonical(site, x)
                self._emit(site, x)
            except Exception as e:
                self.error, self.error_node = e, f"{node.decode(errors='replace')} ({site})"
                return

    def _fast_view(self, site, chunk, off, typ, ne, nb, typed) -> torch.Tensor | None:
        """The common case in one view op: a contiguous F32 node, already on the right device,
        holding exactly the site's elements. None otherwise (the general path handles it)."""
        shape, strides, numel, plain = self._layouts[parse_site(site)[1].key]
        if (typ != GGML_TYPE_F32 or not plain or ne[0] * ne[1] * ne[2] * ne[3] != numel
                or nb[0] != 4 or nb[1] != 4 * ne[0] or nb[2] != nb[1] * ne[1] or nb[3] != nb[2] * ne[2]
                or (self.on_device and not chunk.is_cuda)):
            return None
        base = typed.get(id(chunk))
        if base is None:
            base = typed[id(chunk)] = chunk.view(torch.float32)
        return base.as_strided(shape, strides, off // 4)

    def _canonical(self, site: str, arr: torch.Tensor) -> torch.Tensor:
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
        return arr.contiguous().reshape(shape)

    def _emit(self, site: str, x: torch.Tensor) -> None:
        if site in self.batch_seen:
            raise ValueError(f"{site} computed twice in one batch (the batch was split into several graphs)")
        self.batch_seen.add(site)
        self.captured.add((self.step, site))
        try:
            self.sink(self.step, site, x)
        except BaseException as e:
            self.sink_error = e         # e.g. our model, run by the sink, out of memory: not the capture's
            raise
