"""Access to llama-cpp-python: one import point with a clear error, and quiet logging."""
from __future__ import annotations

import ctypes


class LlamaUnavailable(RuntimeError):
    """llama-cpp-python cannot be imported; the message says how to get it."""


_quiet_cb = None


def llama():
    """The ``llama_cpp`` module, with llama.cpp's own logging silenced and the backend initialised."""
    try:
        import llama_cpp
    except Exception as e:  # ImportError, or OSError from a broken shared library
        raise LlamaUnavailable(f"llama-cpp-python is not usable ({type(e).__name__}: {e}); "
                               "install it with 'pip install llama-cpp-python==0.3.36'") from None
    global _quiet_cb
    if _quiet_cb is None:
        _quiet_cb = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_quiet_cb, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
    return llama_cpp


def versions() -> dict:
    """llama-cpp-python's version and, where the library reports it, llama.cpp's build info."""
    lc = llama()
    info = {"llama_cpp_python": lc.__version__}
    try:
        info["llama_cpp_system_info"] = lc.llama_print_system_info().decode()
    except Exception:
        pass
    return info


def has_gpu_offload() -> bool:
    return bool(llama().llama_supports_gpu_offload())
