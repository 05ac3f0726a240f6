"""ctypes view of ``struct ggml_tensor``, the ggml functions the capture calls, a CUDA copy.

The layout follows ``ggml/include/ggml.h`` of the llama.cpp vendored by llama-cpp-python 0.3.36
(GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10, GGML_MAX_NAME 64). Functions are
looked up through the handle llama-cpp-python already opened (``llama_cpp.llama_cpp._lib``), so
they act on the same copy of libggml as the running context, never a second one.
"""
from __future__ import annotations

import ctypes


GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1


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


class GGMLFuncs:
    """The few ggml functions the capture needs, with their signatures set."""

    def __init__(self, lib):
        self.lib = lib
        lib.ggml_op_name.restype, lib.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
        lib.ggml_type_name.restype, lib.ggml_type_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
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


def cuda_copier(stream: int = 0):
    """``copy(dst, src, nbytes)``: a device-to-device copy through the CUDA driver API, finished
    when it returns (llama.cpp reuses a node's memory as soon as the eval callback returns).
    The driver is the one library every CUDA runtime in the process (llama.cpp's and torch's)
    shares, so pointers from either work. ``stream``: a CUstream handle (0: the legacy default)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise RuntimeError(f"cannot load the CUDA driver library libcuda.so.1: {e}") from None
    memcpy, sync = lib.cuMemcpyDtoDAsync_v2, lib.cuStreamSynchronize
    memcpy.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
    sync.argtypes = [ctypes.c_void_p]
    memcpy.restype = sync.restype = ctypes.c_int

    def copy(dst: int, src: int, nbytes: int) -> None:
        rc = memcpy(dst, src, nbytes, stream) or sync(stream)
        if rc:
            raise RuntimeError(f"CUDA device-to-device copy of {nbytes} bytes failed (CUresult {rc})")
    return copy
