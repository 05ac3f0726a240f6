"""The drop-in trace writers (writers/llamadiff_trace.h, writers/llamadiff_trace.rs) against the
Python reference writer: the C and Rust example programs of docs/trace-format.md are compiled
from the doc itself, run, and their traces must read back identical to the Python writer's.
The examples store q flat, (T, H*Dh), as engines hold it, with the dims in the manifest: the
reader reshapes it to the site's (T, H, Dh). Also: atomicity (no target folder before close,
none after a failed close), argument errors, and the float16/bfloat16 converters against numpy."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from harness.runs.store import load_run
from harness.runs.writer import TraceWriter

ROOT = Path(__file__).resolve().parent.parent
WRITERS = ROOT / "writers"
DOC = ROOT / "docs" / "trace-format.md"

# What the doc's examples write: n_layer 2, D 8, H 2, Hkv 1, Dh 4, F 16, V 32, 3 prompt tokens + 1 step.
TOKENS, N_PROMPT = [3, 14, 15, 92], 3
SITES = [("embd", "F32"), ("blk.0.q", "F16"), ("blk.1.kq", "F32"), ("blk.1.ffn_up", "BF16"), ("logits", "F32")]


def shapes(step: int) -> dict[str, tuple[int, ...]]:
    T, P = (N_PROMPT if step == 0 else 1), N_PROMPT + step
    return {"embd": (T, 8), "blk.0.q": (T, 2, 4), "blk.1.kq": (2, T, P), "blk.1.ffn_up": (T, 16), "logits": (T, 32)}


def values(step: int, s: int, shape) -> np.ndarray:
    i = np.arange(int(np.prod(shape)))
    return (((i * 37 + step * 11 + s * 5) % 64 - 32) / 16.0).astype(np.float32).reshape(shape)


def doc_example(lang: str) -> str:
    m = re.search(rf"<!-- writers-example-{lang} -->\n```{lang}\n(.*?)```", DOC.read_text(), re.S)
    assert m, f"docs/trace-format.md has no writers-example-{lang} block"
    return m.group(1)


def need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        pytest.skip(f"{tool} not found on PATH: cannot build the {tool} writer test")
    return path


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60, **kw)


def build_c(tmp: Path, src: str, name: str, cxx: bool = False) -> Path:
    (tmp / f"{name}.c").write_text(src)
    exe = tmp / name
    cmd = ([need("g++"), "-x", "c++", "-std=c++11"] if cxx else [need("gcc"), "-std=c99", "-pedantic"])
    r = run(cmd + ["-Wall", "-Wextra", "-Werror", "-O1", "-I", WRITERS, "-o", exe, tmp / f"{name}.c"])
    assert r.returncode == 0, r.stderr
    return exe


def build_rust(tmp: Path, src: str, name: str) -> Path:
    shutil.copy(WRITERS / "llamadiff_trace.rs", tmp / "llamadiff_trace.rs")
    (tmp / f"{name}.rs").write_text(src)
    exe = tmp / name
    r = run([need("rustc"), "--edition", "2021", "-o", exe, tmp / f"{name}.rs"])
    assert r.returncode == 0, r.stderr
    return exe


def python_trace(out: Path) -> Path:
    # float16 storage except the sites kept float32; ffn_up's bfloat16 values are stored as float32
    # (the Python writer does not write BF16): they read back as the same float32 values.
    with TraceWriter(out, n_layer=2, n_prompt=N_PROMPT, tokens=TOKENS, dtype="float16",
                     keep_float32=("embd", "kq", "ffn_up", "logits"), engine={"name": "python"}) as w:
        for step in (0, 1):
            for s, (site, _) in enumerate(SITES):
                w.add(step, site, values(step, s, shapes(step)[site]))
    return out


def check_same(a, b) -> None:
    assert a.trace.tokens == b.trace.tokens == TOKENS and a.trace.n_prompt == b.trace.n_prompt == N_PROMPT
    assert a.trace.n_layer == b.trace.n_layer == 2
    assert a.trace.keys() == b.trace.keys()
    for k in a.trace.keys():
        x, y = a.trace[k].numpy(), b.trace[k].numpy()
        assert x.dtype == y.dtype == np.float32 and x.shape == y.shape, k
        assert np.array_equal(x.view(np.uint32), y.view(np.uint32)), k


def test_c_cpp_rust_and_python_writers_agree(tmp_path):
    py = load_run(python_trace(tmp_path / "py-run"))
    keys = [(step, site) for step in (0, 1) for site, _ in SITES]
    assert sorted(py.trace.keys()) == sorted(keys)
    for step in (0, 1):                                    # the reference holds the intended values
        for s, (site, _) in enumerate(SITES):
            assert np.array_equal(py.trace[step, site].numpy(), values(step, s, shapes(step)[site]))

    outs = {}
    c_exe = build_c(tmp_path, doc_example("c"), "example_c")
    cxx_exe = build_c(tmp_path, doc_example("c"), "example_cxx", cxx=True)
    rust_exe = build_rust(tmp_path, doc_example("rust"), "example_rust")
    for name, exe in (("c", c_exe), ("cxx", cxx_exe), ("rust", rust_exe)):
        out = tmp_path / f"{name}-run"
        r = run([exe, out])
        assert r.returncode == 0, r.stderr
        outs[name] = out
        run_ = load_run(out)
        check_same(py, run_)
        dtypes = {e["name"]: e["dtype"] for e in run_.manifest["tensors"]}
        assert dtypes == {f"{step}/{site}": dict(SITES)[site] for step, site in keys}
        flat = {e["name"]: e["shape"] for e in run_.manifest["tensors"] if e["name"].endswith("blk.0.q")}
        assert flat == {"0/blk.0.q": [3, 8], "1/blk.0.q": [1, 8]}     # stored flat, read as (T, H, Dh)
        assert run_.manifest["dims"] == {"H": 2, "Hkv": 1, "Dh": 4}
    for f in ("step-0000.safetensors", "step-0001.safetensors"):
        data = {(outs[n] / f).read_bytes() for n in outs}
        assert len(data) == 1, f"{f} differs between the C, C++ and Rust writers"
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


ATOMIC_C = r"""
#define LLAMADIFF_TRACE_IMPLEMENTATION
#include "llamadiff_trace.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int main(int argc, char **argv) {
    const int32_t tokens[2] = {1, 2};
    const int64_t shape[2] = {1, 4};
    const float x[4] = {1, 2, 3, 4};
    char line[16];
    ldt_trace *t;
    if (strcmp(argv[2], "conv") == 0) {             /* converters: one line per argument */
        for (int i = 3; i < argc; ++i) {
            float v = strtof(argv[i], NULL);
            printf("%u %u\n", (unsigned)ldt_f32_to_f16(v), (unsigned)ldt_f32_to_bf16(v));
        }
        return 0;
    }
    t = ldt_open(argv[1], 1, tokens, 2, 1, "atomic");
    if (!t) return 3;
    if (strcmp(argv[2], "errors") == 0) {
        int bad = !ldt_add(t, 2, "embd", shape, 2, LDT_F32, x)          /* step out of range */
                + !ldt_add(t, 0, "blk.1.q", shape, 2, LDT_F32, x)       /* layer >= n_layer */
                + !ldt_add(t, 0, "em\"bd", shape, 2, LDT_F32, x)        /* not a site name */
                + !ldt_add(t, 0, "embd", shape, 0, LDT_F32, x);         /* no dims */
        if (bad) return 4;
        return ldt_close(t) == 0 ? 5 : 0;             /* nothing added: close must fail */
    }
    if (ldt_add(t, 0, "embd", shape, 2, LDT_F32, x) || !ldt_add(t, 0, "embd", shape, 2, LDT_F32, x)) return 6;
    if (strcmp(argv[2], "wait") == 0) {               /* added: let the test look, then close */
        printf("added\n");
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin)) return 7;
    } else if (strcmp(argv[2], "clash") == 0) {       /* someone else creates the target meanwhile */
        mkdir(argv[1], 0755);
    }
    return ldt_close(t);
}
"""

ATOMIC_RS = r"""
#[path = "llamadiff_trace.rs"]
mod llamadiff_trace;
use llamadiff_trace::{f32_to_bf16, f32_to_f16, Trace};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a[2] == "conv" {
        for v in &a[3..] {
            let v: f32 = v.parse().unwrap();
            println!("{} {}", f32_to_f16(v), f32_to_bf16(v));
        }
        return;
    }
    let mut t = Trace::new(&a[1], 1, &[1, 2], 1, "atomic").unwrap();
    assert!(t.add_f32(2, "embd", &[1, 4], &[1.0; 4]).is_err());
    assert!(t.add_f32(0, "blk.1.q", &[1, 4], &[1.0; 4]).is_err());
    assert!(t.add_f32(0, "embd", &[1, 5], &[1.0; 4]).is_err());
    t.add_f32(0, "embd", &[1, 4], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    assert!(t.add_f32(0, "embd", &[1, 4], &[1.0; 4]).is_err());
    if a[2] == "clash" {
        std::fs::create_dir(&a[1]).unwrap();
    }
    std::process::exit(if t.close().is_ok() { 0 } else { 1 });
}
"""

TRICKY = [0.0, -0.0, 1.0, 65504.0, 65520.0, 1e6, 6.1e-5, 5.96e-8, 2.98e-8, 3e-8, 1e-10, 1.00048828125,
          1.000732421875, 3.14159, -2.71828, 1.0039062, 1.0078125, 3.4e38, float("inf"), float("-inf")]


def expected_bits(v: float) -> tuple[int, int]:
    f = np.float32(v)
    u = int(np.array([f]).view(np.uint32)[0])
    bf = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 if (u & 0x7FFFFFFF) <= 0x7F800000 else (u >> 16) | 0x40
    with np.errstate(over="ignore"):
        return int(np.array([f]).astype(np.float16).view(np.uint16)[0]), bf & 0xFFFF


@pytest.mark.parametrize("lang", ["c", "rust"])
def test_writer_atomicity_errors_and_converters(tmp_path, lang):
    exe = build_c(tmp_path, ATOMIC_C, "atomic") if lang == "c" else build_rust(tmp_path, ATOMIC_RS, "atomic")
    hidden = lambda: [p for p in os.listdir(tmp_path) if p.startswith(".")]   # noqa: E731

    # converters agree with numpy (float16: numpy's rounding; bfloat16: round to nearest even)
    r = run([exe, tmp_path / "unused", "conv"] + [repr(v) for v in TRICKY])
    assert r.returncode == 0, r.stderr
    got = [tuple(int(x) for x in line.split()) for line in r.stdout.split("\n") if line]
    assert got == [expected_bits(v) for v in TRICKY]

    # a failed close (the target appeared meanwhile) leaves the target untouched and no temporary folder
    out = tmp_path / "clash-run"
    r = run([exe, out, "clash"])
    assert r.returncode != 0
    assert out.is_dir() and os.listdir(out) == [] and hidden() == []

    if lang == "c":
        # invalid adds fail and leave the trace usable; closing with nothing added fails, writes nothing
        out = tmp_path / "errors-run"
        r = run([exe, out, "errors"])
        assert r.returncode == 0, (r.returncode, r.stderr)
        assert not out.exists() and hidden() == []
        # the target does not exist before close
        out = tmp_path / "wait-run"
        p = subprocess.Popen([str(exe), str(out), "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "added"
            assert not out.exists() and hidden() == []
            p.stdin.write("go\n")
            p.stdin.flush()
            assert p.wait(timeout=30) == 0
        finally:
            p.kill() if p.poll() is None else None
    else:
        out = tmp_path / "wait-run"
        r = run([exe, out, "ok"])
        assert r.returncode == 0, r.stderr
    got = load_run(out)
    assert got.trace.tokens == [1, 2] and got.trace.keys() == [(0, "embd")]
    assert got.trace[0, "embd"].tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert hidden() == []


DEVICE_CU = r"""
#define LLAMADIFF_TRACE_IMPLEMENTATION
#include "llamadiff_trace.h"
#include <stdio.h>
int main(int argc, char **argv) {
    const int32_t tokens[2] = {1, 2};
    const int64_t shape[2] = {1, 4};
    float host[4] = {1.5f, -2.0f, 3.25f, 4.0f}, *dev;
    ldt_trace *t;
    if (cudaMalloc((void **)&dev, sizeof host) != cudaSuccess) { printf("no gpu\n"); return 0; }
    cudaMemcpy(dev, host, sizeof host, cudaMemcpyHostToDevice);
    t = ldt_open(argv[1], 1, tokens, 2, 1, "cuda");
    if (!t || ldt_add_device(t, 0, "embd", shape, 2, LDT_F32, dev)) return 1;
    cudaFree(dev);
    return ldt_close(t);
}
"""


@pytest.mark.gpu
def test_cuda_device_pointer(tmp_path):
    """ldt_add_device (nvcc build): skipped without nvcc or without a GPU."""
    src, exe = tmp_path / "device.cu", tmp_path / "device"
    src.write_text(DEVICE_CU)
    r = run([need("nvcc"), "-I", WRITERS, "-o", exe, src])
    assert r.returncode == 0, r.stderr
    out = tmp_path / "dev-run"
    r = run([exe, out])
    if "no gpu" in r.stdout:
        pytest.skip("no CUDA GPU: ldt_add_device compiled but not run")
    assert r.returncode == 0, r.stderr
    assert load_run(out).trace[0, "embd"].tolist() == [[1.5, -2.0, 3.25, 4.0]]


def test_flat_projections_reshaped_on_load(tmp_path):
    """An engine's flat (T, n_head*head_dim) projections read as the site layout (T, H, Dh) when
    the manifest states H/Hkv and Dh; without the dims they are refused as before."""
    from harness.runs.store import RunError, load_tensor
    from harness.runs.writer import dump_manifest, write_safetensors

    ref = load_run(python_trace(tmp_path / "py-run"))
    q = {step: values(step, 1, shapes(step)["blk.0.q"]) for step in (0, 1)}

    def flat_trace(out: Path, dims: dict | None) -> Path:
        out.mkdir()
        tensors = []
        for step in (0, 1):
            a = q[step].reshape(q[step].shape[0], -1)                     # (T, H*Dh) = (T, 8)
            write_safetensors(str(out / f"s{step}.safetensors"), [(f"{step}/blk.0.q", a, "F32")])
            tensors.append({"name": f"{step}/blk.0.q", "file": f"s{step}.safetensors", "dtype": "F32",
                            "shape": list(a.shape)})
        m = {"format_version": 1, "n_layer": 2, "tokens": TOKENS, "n_prompt": N_PROMPT, "tensors": tensors}
        if dims:
            m["dims"] = dims
        (out / "manifest.json").write_text(dump_manifest(m))
        return out

    got = load_run(flat_trace(tmp_path / "flat", {"H": 2, "Hkv": 1, "Dh": 4}))
    for step in (0, 1):
        assert tuple(got.trace[step, "blk.0.q"].shape) == shapes(step)["blk.0.q"]
        assert torch_equal(got.trace[step, "blk.0.q"], ref.trace[step, "blk.0.q"])
        assert torch_equal(load_tensor(tmp_path / "flat", step, "blk.0.q"), ref.trace[step, "blk.0.q"])
    with pytest.raises(RunError, match="does not fit the layout"):
        load_run(flat_trace(tmp_path / "flat-nodims", None))


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())
