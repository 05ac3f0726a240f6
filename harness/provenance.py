"""Where a trace came from: the llama.cpp build, its options and the machine.

:func:`llama_provenance` runs in the process that runs llama.cpp and goes into every llama.cpp
trace's meta (and from there into recorded runs' manifests, as ``engine.provenance``);
:func:`machine_provenance` describes our (PyTorch) side. :func:`numerics_differences` says, in
plain lines, what differs between two provenances in a way that moves numerics. Everything
returned is plain JSON data; a field that cannot be found is ``"?"`` or left out (unknown), never
an error.
"""
from __future__ import annotations

import ctypes
import functools
import platform
import subprocess

# The CPU features llama.cpp's system info line reports (they select ggml's CPU kernels), as
# /proc/cpuinfo names them; cpu_flags holds the ones present.
LLAMA_FEATURES = {"SSE3": "sse3", "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "AVX_VNNI": "avx_vnni",
                  "F16C": "f16c", "FMA": "fma", "BMI2": "bmi2", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
                  "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
                  "NEON": "asimd", "FP16_VA": "asimdhp", "DOTPROD": "asimddp", "MATMUL_INT8": "i8mm",
                  "SVE": "sve", "SME": "sme"}
ISA_FLAGS = tuple(LLAMA_FEATURES.values())
CPU_MODEL_NOTE = "about 1e-4 relative end to end on F32 (measured on two CPUs)"
EXTRA_BUFTS_NOTE = ("the reference ran with llama.cpp's extra buffer types (CPU weight repacking): the "
                    "tolerances were not calibrated for them, so false alarms are possible")


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str, tuple[str, ...] | None]:
    """(CPU model, the ISA_FLAGS it has); flags None where /proc/cpuinfo cannot be read."""
    model, flags = None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and flags is None:
                    have = set(value.split())
                    have.update({"sse3"} if "pni" in have else set())   # Linux calls SSE3 "pni"
                    flags = tuple(f for f in ISA_FLAGS if f in have)
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "?", flags


def _nvml() -> tuple[list[str], str] | None:
    """(GPU names, driver version) from NVML, without creating a CUDA context."""
    try:
        nv = ctypes.CDLL("libnvidia-ml.so.1")
        if nv.nvmlInit_v2() != 0:
            return None
        buf, n = ctypes.create_string_buffer(96), ctypes.c_uint(0)
        driver = buf.value.decode() if nv.nvmlSystemGetDriverVersion(buf, 96) == 0 else "?"
        names = []
        if nv.nvmlDeviceGetCount_v2(ctypes.byref(n)) == 0:
            for i in range(n.value):
                h = ctypes.c_void_p()
                if nv.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(h)) == 0 and nv.nvmlDeviceGetName(h, buf, 96) == 0:
                    names.append(buf.value.decode(errors="replace"))
        nv.nvmlShutdown()
        return names, driver
    except (OSError, AttributeError):
        return None


def _driver_fallback() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        v = ctypes.c_int(0)
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v)) == 0:
            return f"CUDA {v.value // 1000}.{v.value % 1000 // 10}"   # the driver API version only
    except (OSError, AttributeError):
        pass
    return "?"


@functools.lru_cache(maxsize=1)
def gpu_info() -> dict:
    """GPU name(s) and driver version; "?" where they cannot be found."""
    names, driver = _nvml() or ([], "?")
    if not names:
        try:
            import torch
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except Exception:   # no CUDA, or CUDA cannot be initialised in this process
            names = []
    return {"gpu_names": names or ["?"], "gpu_driver": driver if driver != "?" else _driver_fallback()}


def machine_provenance(device="cpu") -> dict:
    """This machine as it matters to our (PyTorch) side: torch, CPU, and the GPU when ``device`` is CUDA."""
    m = _machine("cuda" if str(device).startswith("cuda") else "cpu")
    return {k: list(v) if isinstance(v, list) else v for k, v in m.items()}


@functools.lru_cache(maxsize=2)
def _machine(device: str) -> dict:
    import torch
    model, flags = cpu_info()
    out = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "cpu_model": model}
    if flags is not None:
        out["cpu_flags"] = list(flags)
    if device == "cuda":
        out.update(gpu_info(), torch_cuda=str(torch.version.cuda))
    return out


def llama_provenance(lc, *, gpu: bool, options) -> dict:
    """llama.cpp's build and options (``lc``: the llama_cpp module) and the machine it runs on."""
    def call(fn):
        try:
            return fn()
        except Exception:
            return "?"
    out = {"llama_cpp_python": str(getattr(lc, "__version__", "?")),
           "llama_cpp": call(lambda: lc.llama_version().decode()),
           "system_info": call(lambda: lc.llama_print_system_info().decode().strip()),
           "backend": "cuda" if gpu else "cpu", "extra_bufts": bool(getattr(options, "extra_bufts", False)),
           "kv_type": str(options.kv_type), "flash_attn": bool(options.flash_attn)}
    out.update(machine_provenance("cuda" if gpu else "cpu"))
    return out


def system_info_flags(line: str) -> list[str]:
    """The ISA_FLAGS a llama.cpp system info line reports ("AVX2 = 1 | ...")."""
    on = {k.strip() for k, _, v in (part.partition("=") for part in line.replace(":", "|").split("|"))
          if v.strip() == "1"}
    return [f for k, f in LLAMA_FEATURES.items() if k in on]


def from_engine(engine: dict) -> dict:
    """The provenance a trace's ``engine`` section states: its recorded ``provenance``, else (runs
    recorded before it was stored, other engines' traces) what the other fields say, marked partial."""
    if isinstance(engine.get("provenance"), dict):
        return dict(engine["provenance"])
    v = engine.get("versions") if isinstance(engine.get("versions"), dict) else {}
    out = {"partial": True, "backend": engine.get("backend"), "extra_bufts": engine.get("extra_bufts"),
           "kv_type": engine.get("kv_type"), "flash_attn": engine.get("flash_attn"),
           "llama_cpp_python": v.get("llama_cpp_python"), "system_info": v.get("llama_cpp_system_info")}
    if out["system_info"]:          # what that llama.cpp build reported using
        out["cpu_flags"] = system_info_flags(out["system_info"])
    if engine.get("device_name") and engine.get("backend") == "cpu":   # the CPU model (see harness.runs.store)
        out["cpu_model"] = engine["device_name"]
    return {k: x for k, x in out.items() if x is not None}


def _onoff(x) -> str:
    return "on" if x else "off"


def numerics_differences(recorded: dict, current: dict) -> list[str]:
    """One line per difference between two provenances that moves numerics; fields unknown on
    either side are not compared."""
    r, c, out = recorded or {}, current or {}, []

    def both(k):   # known on both sides ("?" and empty are unknown) and different
        return all(d.get(k) not in (None, "?", ["?"], []) for d in (r, c)) and r[k] != c[k]
    if both("backend"):
        out.append(f"backend: recorded {r['backend']}, here {c['backend']}: different kernels, numerics differ")
    if both("extra_bufts"):
        out.append(f"llama.cpp's extra buffer types (CPU weight repacking): recorded {_onoff(r['extra_bufts'])}, "
                   f"here {_onoff(c['extra_bufts'])}: other kernels, numerics may differ; the tolerances were "
                   "calibrated with them off")
    if both("kv_type"):
        out.append(f"KV cache type: recorded {r['kv_type']}, here {c['kv_type']}: numerics differ")
    if both("flash_attn"):
        out.append(f"flash attention: recorded {_onoff(r['flash_attn'])}, here {_onoff(c['flash_attn'])}: "
                   "numerics differ (flash attention is not calibrated)")
    if "cuda" not in (r.get("backend"), c.get("backend")):
        what = [f"recorded on {r['cpu_model']!r}, here {c['cpu_model']!r}"] if both("cpu_model") else []
        if both("cpu_flags"):
            only = [sorted(set(a["cpu_flags"]) - set(b["cpu_flags"])) for a, b in ((r, c), (c, r))]
            what.append(f"kernel-selecting features only recorded: {', '.join(only[0]) or '-'}, only here: "
                        f"{', '.join(only[1]) or '-'}")
        if what:
            out.append(f"CPU: {'; '.join(what)}: llama.cpp's CPU results differ between CPU models, numerics "
                       f"may differ by {CPU_MODEL_NOTE}")
    elif both("gpu_names"):
        out.append(f"GPU: recorded on {', '.join(r['gpu_names'])}, here {', '.join(c['gpu_names'])}: "
                   "other kernels, numerics may differ")
    if both("llama_cpp_python"):
        out.append(f"llama-cpp-python: recorded {r['llama_cpp_python']}, here {c['llama_cpp_python']}: "
                   "another llama.cpp, numerics may differ")
    return out


def summary_line(meta: dict) -> str:
    """One compact line for a report header, from a trace's meta (its ``provenance``, else its own fields)."""
    p = meta.get("provenance") if isinstance(meta.get("provenance"), dict) else from_engine(meta)
    if not set(p) - {"partial", "backend", "kv_type", "flash_attn"}:
        return "reference provenance: unknown (not recorded with the trace)"
    backend = p.get("backend", "?")
    parts = [f"llama-cpp-python {p['llama_cpp_python']}"] if p.get("llama_cpp_python") else []
    parts.append(f"backend {backend}")
    if backend == "cuda":
        parts.append(f"GPU {', '.join(p.get('gpu_names') or ['?'])} (driver {p.get('gpu_driver', '?')})")
    else:
        parts.append(f"CPU {p.get('cpu_model', '?')}")
    for key, name in (("extra_bufts", "extra buffer types"), ("flash_attn", "flash attn")):
        parts.append(f"{name} {'?' if p.get(key) is None else _onoff(p[key])}")
    parts.insert(-1, f"KV {p.get('kv_type', '?')}")
    partial = " (partial: the rest was not recorded with the trace)" if p.get("partial") else ""
    return "reference provenance: " + ", ".join(parts) + partial
