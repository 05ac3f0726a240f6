"""CUDA C kernels compiled at run time (NVRTC, through ``torch.cuda._compile_kernel``) and
launched with little host time.

torch's launcher builds a new ctypes array type on every call: ~96 us of CPU per launch in a
512 + 8 report's cProfile on an H100 host (3,088 launches of our decode-step matmul mirror,
0.296 s). A report is launch-bound on a small model, so :func:`launch` calls ``cuLaunchKernel``
itself, with the array types cached. Arguments as torch's launcher takes them: a CUDA tensor
passes its data pointer, a Python int a C int, a float a C double.
"""
from __future__ import annotations

import ctypes

import torch

_ARRAYS: dict[int, type] = {}
_LIB: list = []


def compile_kernel(src: str, name: str, options: list[str] | None = None):
    """The kernel ``name`` of CUDA C ``src``, compiled for the current device (raises where NVRTC
    or the driver refuses)."""
    if options:
        return torch.cuda._compile_kernel(src, name, nvcc_options=options)
    return torch.cuda._compile_kernel(src, name)


def _driver() -> ctypes.CDLL:
    if not _LIB:
        _LIB.append(ctypes.CDLL("libcuda.so.1"))
    return _LIB[0]


def _arg(a):
    if isinstance(a, torch.Tensor):
        return ctypes.c_void_p(a.data_ptr())
    if isinstance(a, int):
        return ctypes.c_int(a)
    if isinstance(a, float):
        return ctypes.c_double(a)
    raise TypeError(f"a kernel argument of type {type(a).__name__}")


def launch(kernel, grid: tuple[int, int, int], block: tuple[int, int, int], args: list) -> None:
    """Launch a :func:`compile_kernel` kernel on the current stream of its first tensor's device."""
    vals = [_arg(a) for a in args]
    array = _ARRAYS.get(len(vals))
    if array is None:
        array = _ARRAYS[len(vals)] = ctypes.c_void_p * len(vals)
    ptrs = array(*[ctypes.addressof(v) for v in vals])
    dev = next((a.get_device() for a in args if isinstance(a, torch.Tensor)), None)
    stream = ctypes.c_void_p(torch._C._cuda_getCurrentRawStream(torch.cuda.current_device() if dev is None else dev))
    rc = _driver().cuLaunchKernel(kernel.func, grid[0], grid[1], grid[2], block[0], block[1], block[2], 0,
                                  stream, ptrs, None)
    if rc != 0:
        raise RuntimeError(f"CUDA error {rc} launching a kernel")
