"""A fast GGUF header scanner: metadata and tensor records without materializing big arrays.

gguf-py's ``GGUFReader`` builds numpy views for every element of every array (151,936 tokens
and as many merges in a Qwen2.5 file): 5-15 s before a single weight is read. This scanner walks
the same bytes (format: github.com/ggml-org/ggml docs/gguf.md) and keeps string arrays as counts
unless asked, so a 0.5B header scans in well under a second. It returns plain records.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
            12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
       7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9


class HeaderError(ValueError):
    """The header cannot be parsed; the message says where."""


@dataclass
class TensorRecord:
    name: str
    ne: tuple[int, ...]          # ggml order (fastest dimension first)
    type: int                    # GGMLQuantizationType value
    offset: int                  # absolute byte offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy/torch order."""
        return tuple(reversed(self.ne))


@dataclass
class Header:
    version: int
    fields: dict = field(default_factory=dict)     # key -> value; string arrays -> ArrayCount unless kept
    tensors: list[TensorRecord] = field(default_factory=list)


@dataclass(frozen=True)
class ArrayCount:
    """A string array that was skipped: only its length is kept."""
    n: int

    def __len__(self) -> int:
        return self.n


class _Cursor:
    def __init__(self, buf, pos: int = 0):
        self.buf, self.pos = buf, pos

    def take(self, fmt: str):
        try:
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise HeaderError(f"header ends early at byte {self.pos}") from None
        self.pos += struct.calcsize(fmt)
        return v

    def string(self, keep: bool = True):
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise HeaderError(f"string of {n} bytes at byte {self.pos} runs past the end of the file")
        s = bytes(self.buf[self.pos:self.pos + n]) if keep else None
        self.pos += n
        return s.decode("utf-8", "replace") if keep else None

    def value(self, vtype: int, keep_strings: bool):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype != ARRAY:
            raise HeaderError(f"unknown value type {vtype} at byte {self.pos}")
        etype, n = self.take("<I"), self.take("<Q")
        if etype in _NP:
            size = np.dtype(_NP[etype]).itemsize * n
            if self.pos + size > len(self.buf):
                raise HeaderError(f"array of {n} items at byte {self.pos} runs past the end of the file")
            arr = np.frombuffer(self.buf, dtype=_NP[etype], count=n, offset=self.pos).copy()
            self.pos += size
            return arr
        if etype == STRING:
            items = [self.string(keep_strings) for _ in range(n)]
            return items if keep_strings else ArrayCount(n)
        return [self.value(etype, keep_strings) for _ in range(n)]


def _nbytes(ne: tuple[int, ...], qtype: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    except (ValueError, KeyError):
        raise HeaderError(f"unknown tensor type {qtype}") from None
    n = 1
    for d in ne[1:]:
        n *= d
    return ne[0] // block * size * n if ne else 0


def scan(path: str, keep_strings: tuple[str, ...] = ()) -> Header:
    """Parse the header of ``path``; string arrays whose key is in ``keep_strings`` are decoded."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise HeaderError("empty file")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        c = _Cursor(buf, 4)
        hdr = Header(version=c.take("<I"))
        n_tensors, n_kv = c.take("<Q"), c.take("<Q")
        for _ in range(n_kv):
            key = c.string()
            hdr.fields[key] = c.value(c.take("<I"), key in keep_strings)
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            nd = c.take("<I")
            ne = tuple(c.take("<Q") for _ in range(nd))
            infos.append((name, ne, c.take("<I"), c.take("<Q")))
        align = int(hdr.fields.get("general.alignment", 32))
        start = -(-c.pos // align) * align
        hdr.tensors = [TensorRecord(n, ne, t, start + off, _nbytes(ne, t)) for n, ne, t, off in infos]
        return hdr
    finally:
        buf.close()


def read_tensor_bytes(path: str, rec: TensorRecord) -> np.ndarray:
    """The raw bytes of one tensor as uint8 (rows, bytes per row), read without a memory map."""
    out = np.empty(rec.nbytes, dtype=np.uint8)
    with open(path, "rb") as f:
        f.seek(rec.offset)
        got = f.readinto(memoryview(out))
    if got != rec.nbytes:
        raise HeaderError(f"tensor {rec.name} is truncated ({got} of {rec.nbytes} bytes)")
    rows = 1
    for d in rec.ne[1:]:
        rows *= d
    return out.reshape(rows, -1) if rows else out
