"""ctypes view of ``struct ggml_tensor`` and copies of graph tensors into numpy.

The layout follows ``ggml/include/ggml.h`` of the llama.cpp vendored by llama-cpp-python 0.3.36
(GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10, GGML_MAX_NAME 64). Functions are
looked up through the handle llama-cpp-python already opened (``llama_cpp.llama_cpp._lib``), so
they act on the same copy of libggml as the running context, never a second one.
"""
from __future__ import annotations

import ctypes

import numpy as np

GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16 = 0, 1, 30
_NP_TYPES = {GGML_TYPE_F32: np.float32, GGML_TYPE_F16: np.float16}


class GGMLTensor(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def tensor_at(addr: int) -> GGMLTensor:
    """The tensor at ``addr`` (no copy: reads live memory)."""
    return GGMLTensor.from_address(addr)


class GGMLFuncs:
    """The few ggml functions the capture needs, with their signatures set."""

    def __init__(self, lib):
        self.lib = lib
        lib.ggml_op_name.restype, lib.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
        lib.ggml_type_name.restype, lib.ggml_type_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
        lib.ggml_nbytes.restype, lib.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
        lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
        lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_tensor_get.restype = None
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                                ctypes.c_size_t]
        self._op_names: dict[int, str] = {}

    def op_name(self, op: int) -> str:
        name = self._op_names.get(op)
        if name is None:
            name = self._op_names[op] = self.lib.ggml_op_name(op).decode()
        return name

    def to_numpy(self, addr: int, t: GGMLTensor | None = None) -> np.ndarray:
        """A float32 copy of the tensor at ``addr``, numpy shape = reversed ``ne`` (4-D), honouring
        the byte strides ``nb`` (views and permutes are read as they are laid out)."""
        t = t or tensor_at(addr)
        dtype = _NP_TYPES.get(t.type)
        if dtype is None:
            raise TypeError(f"tensor {t.name.decode()!r} has type "
                            f"{self.lib.ggml_type_name(t.type).decode()}, expected F32 or F16")
        if not t.buffer or not t.data:
            raise ValueError(f"tensor {t.name.decode()!r} has no backend buffer")
        nbytes = self.lib.ggml_nbytes(addr)
        raw = np.empty(nbytes, dtype=np.uint8)
        self.lib.ggml_backend_tensor_get(addr, raw.ctypes.data, 0, nbytes)
        shape = tuple(int(n) for n in reversed(t.ne))
        strides = tuple(int(s) for s in reversed(t.nb))
        view = np.lib.stride_tricks.as_strided(raw.view(dtype), shape=shape, strides=strides)
        return np.array(view, dtype=np.float32)   # copy, contiguous


def gpu_device_names(lib) -> list[str]:
    """Descriptions of the GPU devices the ggml backend registry knows (empty on a CPU build)."""
    lib.ggml_backend_dev_count.restype, lib.ggml_backend_dev_count.argtypes = ctypes.c_size_t, []
    lib.ggml_backend_dev_get.restype, lib.ggml_backend_dev_get.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    lib.ggml_backend_dev_type.restype, lib.ggml_backend_dev_type.argtypes = ctypes.c_int, [ctypes.c_void_p]
    lib.ggml_backend_dev_description.restype = ctypes.c_char_p
    lib.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    names = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        if dev and lib.ggml_backend_dev_type(dev) == 1:   # GGML_BACKEND_DEVICE_TYPE_GPU
            names.append((lib.ggml_backend_dev_description(dev) or b"?").decode(errors="replace"))
    return names


class _DeviceArray:
    """A CUDA pointer dressed with ``__cuda_array_interface__`` so torch can view it without a copy."""

    def __init__(self, t: GGMLTensor, typestr: str):
        self.__cuda_array_interface__ = {
            "shape": tuple(int(n) for n in reversed(t.ne)), "typestr": typestr,
            "strides": tuple(int(s) for s in reversed(t.nb)), "data": (int(t.data), False), "version": 3}


def to_torch_device(funcs: GGMLFuncs, addr: int, t: GGMLTensor | None = None):
    """A float32 torch copy, made on the GPU, of a tensor living in a CUDA buffer (None when the
    tensor is in host memory). The copy is finished before returning: llama.cpp may reuse the
    buffer as soon as the eval callback returns."""
    import torch
    t = t or tensor_at(addr)
    if not t.buffer or not t.data or funcs.lib.ggml_backend_buffer_is_host(t.buffer):
        return None
    typestr = {GGML_TYPE_F32: "<f4", GGML_TYPE_F16: "<f2"}.get(t.type)
    if typestr is None:
        raise TypeError(f"tensor {t.name.decode()!r} has type "
                        f"{funcs.lib.ggml_type_name(t.type).decode()}, expected F32 or F16")
    view = torch.as_tensor(_DeviceArray(t, typestr), device="cuda")
    out = view.to(torch.float32, copy=True).contiguous()
    torch.cuda.current_stream().synchronize()
    return out

