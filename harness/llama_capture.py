"""The eval callback that copies llama.cpp's graph nodes out, kept lean because it runs per node.

llama.cpp's scheduler calls the callback for every graph node, first with ``ask=True`` ("do you
want to see this node?"), then, for the nodes we said yes to, with ``ask=False`` right after the
node is computed (each yes splits the graph and synchronizes the device there). The callback does
the least it can: the ask is a dictionary lookup on the node's (name, op); the observe copies the
node's bytes into a buffer of their own (a device-to-device copy on the GPU, a memcpy on the
host; the allocator reuses node memory as soon as the callback returns) and records the node's
type, ``ne`` and ``nb``. Turning records into canonical site tensors and handing them to the sink
happens after the step's ``llama_decode`` returns (:meth:`Capture.finish_step`). Measured on an
H100 (Qwen2.5-0.5B shapes, 483 nodes per step): splitting and synchronizing alone costs ~6 us
per observed node; the previous callback, which built a torch tensor per node inside the
callback, cost ~100 us.

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

from .ggml_struct import GGML_TYPE_F16, GGML_TYPE_F32, GGMLFuncs, GGMLTensor, cuda_copier
from .sites import SITES, BY_KEY, SiteFilter, all_sites, parse_site, shape_of, site_name
from .trace import Sink

FLASH_MISSING = ("kq", "attn_weights")   # fused away by FLASH_ATTN_EXT
_TORCH_TYPES = {GGML_TYPE_F32: torch.float32, GGML_TYPE_F16: torch.float16}
_NODE_SITES: dict[tuple[str, str | None], str] = {
    (s.llama_name, s.llama_op): s.key for s in SITES if s.llama_name}
_LAYER_RE = re.compile(r"^(.+)-(\d+)$")
_UNNAMED_RE = re.compile(rb"^(node_\d+)?$")
_UNNAMED_MM = object()          # classification: an unnamed MUL_MAT, identified by its weight
_REDUCED = {"ffn_inp", "ffn_norm", "ffn_gate", "ffn_up", "ffn_act", "ffn_out", "l_out", "output_norm",
            "logits"}
NOTHING = SiteFilter(steps=frozenset())


def node_site(name: str, op: str) -> str | None:
    """Canonical site name of a graph node, or None."""
    m = _LAYER_RE.match(name)
    base, layer = (m.group(1), int(m.group(2))) if m else (name, None)
    key = _NODE_SITES.get((base, op)) or _NODE_SITES.get((base, None))
    if key is None or BY_KEY[key].per_layer != (layer is not None):
        return None
    return site_name(key, layer)


def spec_rows_reduced(site: str, numel: int, dims: dict) -> bool:
    """Whether a last-layer/output site holds only the output row (outputs for the last token only)."""
    return parse_site(site)[1].key in _REDUCED and numel == math.prod(shape_of(site, dict(dims, T=1)))


class Capture:
    """The eval callback and its per-run state."""

    def __init__(self, g: GGMLFuncs, cfg, lc, on_device: bool = False):
        self.g, self.cfg, self.on_device = g, cfg, on_device
        self.cb = lc.ggml_backend_sched_eval_callback(self._callback)  # keep alive with the runner
        self._kinds: dict[tuple[bytes, int], object] = {}    # (name, op) -> site | _UNNAMED_MM | None
        self._host_buffers: dict[int, bool] = {}
        self._weights = {f"blk.{i}.attn_output.weight".encode(): site_name("attn_out", i)
                         for i in range(cfg.n_layer)}
        self._copy = None
        self.start(NOTHING, lambda *a: None)

    def start(self, filt: SiteFilter, sink: Sink) -> None:
        self.filt, self.sink = filt, sink
        self.step, self.dims = 0, self.cfg.dims()
        self.captured: set[tuple[int, str]] = set()
        self.records: list[tuple] = []
        self.want: frozenset[str] = frozenset()
        self.asked: str | None = None
        self.error: BaseException | None = None
        self.error_node = ""
        if self.on_device and self._copy is None:
            self._copy = cuda_copier(torch.cuda.current_stream().cuda_stream)

    def begin_step(self, step: int, T: int, P: int) -> None:
        self.step, self.dims = step, self.cfg.dims(T, P)
        self.records = []
        self.want = frozenset(n for n in all_sites(self.cfg.n_layer) if self.filt.wants(step, n))

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
        return node_site(t.name.decode(errors="replace"), op)

    def _observe(self, addr) -> bool:
        t = GGMLTensor.from_address(addr)
        dtype = _TORCH_TYPES.get(t.type)
        if dtype is None:
            raise TypeError(f"tensor {t.name.decode()!r} has type "
                            f"{self.g.lib.ggml_type_name(t.type).decode()}, expected F32 or F16")
        if not t.buffer or not t.data:
            raise ValueError(f"tensor {t.name.decode()!r} has no backend buffer")
        nbytes = self.g.lib.ggml_nbytes(addr)
        host = self._host_buffers.get(t.buffer)
        if host is None:
            host = self._host_buffers[t.buffer] = bool(self.g.lib.ggml_backend_buffer_is_host(t.buffer))
        device = "cuda" if self.on_device and not host else "cpu"
        buf = torch.empty(-(-nbytes // dtype.itemsize), dtype=dtype, device=device)
        if device == "cuda":
            self._copy(buf.data_ptr(), t.data, nbytes)
        elif host:
            ctypes.memmove(buf.data_ptr(), t.data, nbytes)
        else:
            self.g.lib.ggml_backend_tensor_get(addr, buf.data_ptr(), 0, nbytes)
        self.records.append((self.asked, t.name, buf, tuple(t.ne), tuple(t.nb)))
        return True

    # -- after llama_decode ----------------------------------------------------------------------
    def finish_step(self) -> None:
        """Hand the step's copies to the sink as canonical float32 tensors (on the GPU when
        ``on_device``: nodes llama.cpp kept on the host, the embedding lookup, join them)."""
        records, self.records = self.records, []
        for site, node, buf, ne, nb in records:
            try:
                size = tuple(reversed(ne))
                stride = tuple(s // buf.element_size() for s in reversed(nb))
                x = buf.as_strided(size, stride).float()
                if self.on_device and not x.is_cuda:
                    x = x.cuda()
                self._emit(site, x)
            except Exception as e:
                self.error, self.error_node = e, f"{node.decode(errors='replace')} ({site})"
                return

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
