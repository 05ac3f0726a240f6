"""Which arithmetic does llama.cpp's CUDA build do at each weight matmul and attention product? (issue 17, lever 2a)

    python benchmarks/cuda_numerics.py dump --out DIR          # on the GPU machine: llama.cpp's own tensors
    python benchmarks/cuda_numerics.py analyze DIR/*.pt         # anywhere: candidate mirrors against them

``dump`` captures llama.cpp CUDA's tensors of one layer (blk.1) on fixtures of each weight type, at a
64-token prefill (MMQ for quantized weights, cuBLAS for F16), a 12-token prefill (MMQ / MMF) and
two decode steps (one token: MMVQ / MMVF), and saves them with the fixture's sha256. ``analyze``
recomputes every weight matmul of that layer from llama.cpp's own input with each candidate
arithmetic (harness.ours.numerics) and prints its error against llama.cpp's output: relative L2,
worst element over the output's RMS, and the share of elements equal bit for bit. The attention
products too: kq from llama.cpp's q_rope and cached k_rope (q rounded to F16 or kept float32: its
mul_mat_vec_f at GGML_PREC_F32 keeps it at one token), kqv from its attention weights and cached v
(float or half accumulation: mul_mat_vec_f at default precision accumulates in half, over the KV
cells padded to 256).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.runs.store import sha256_file  # noqa: E402

LAYER = 1
MATMULS = {"q_proj": "attn_norm", "k_proj": "attn_norm", "v_proj": "attn_norm", "attn_out": "kqv",
           "ffn_gate": "ffn_norm", "ffn_up": "ffn_norm", "ffn_out": "ffn_act"}
FIXTURES = (("tiny", "q4_k_m", None), ("tiny", "q8_0", None), ("tiny", "f16", None),
            ("qwen2.5-0.5b", "q4_k_m", True), ("qwen2.5-0.5b", "f16", None))
RUNS = ((64, 2), (12, 0))         # (prompt tokens, decode steps)
ATTN = ("q_rope", "k_rope", "v", "kq", "attn_weights", "kqv")


def dump(out: str, device: str, presets: str | None = None) -> None:
    from harness.diff import DiffRequest, capture_reference
    from harness.synth import default_fixture
    os.makedirs(out, exist_ok=True)
    for preset, wtype, tied in FIXTURES:
        if presets and preset not in presets.split(","):
            continue
        path = default_fixture(wtype, preset=preset, seed=11, tied=tied)
        saved = {"fixture": (preset, wtype, 11, tied), "sha256": sha256_file(path), "runs": []}
        for n, steps in RUNS:
            tokens = [(i * 37) % 900 + 5 for i in range(n)]
            ref = capture_reference(DiffRequest(path, tokens=tokens, steps=steps, device=device,
                                                sites=f"blk.{LAYER}.*", isolate=False))
            keep = {f"blk.{LAYER}.{k}" for k in set(MATMULS) | set(MATMULS.values()) | set(ATTN)}
            saved["runs"].append({k: v.cpu().clone() for k, v in ref.items() if k[1] in keep})
        name = os.path.join(out, f"{preset}-{wtype}.pt")
        torch.save(saved, name)
        print(name, os.path.getsize(name), "bytes", flush=True)


def _raw_weights(path: str, names) -> dict:
    from gguf import GGMLQuantizationType
    from harness.gguf.header import read_tensor_bytes, scan
    recs = {t.name: t for t in scan(path).tensors}
    return {n: (torch.from_numpy(read_tensor_bytes(path, recs[n])), GGMLQuantizationType(recs[n].type).name,
                recs[n].shape) for n in names}


def _errors(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    d = (y.double() - ref.double())
    rms = ref.double().pow(2).mean().sqrt().item() or 1.0
    return (d.norm().item() / (ref.double().norm().item() or 1.0), d.abs().max().item() / rms,
            (y == ref).double().mean().item())


def candidates(raw: torch.Tensor, qtype: str, shape) -> dict:
    """name -> f(x, w): the arithmetic candidates for one weight matmul."""
    from gguf import GGMLQuantizationType
    from harness.gguf.dequant import OFFSET_TYPES, offset_parts
    from harness.ours.numerics import CudaHalfMatMul, CudaQuantMatMul, round_q8_0
    out = {"f32": lambda x, w: x @ w.T}
    if qtype in ("F16", "BF16"):
        dt = torch.float16 if qtype == "F16" else torch.bfloat16
        out["x16"] = lambda x, w: x.to(dt).float() @ w.T
        out["x16 out16"] = lambda x, w: (x.to(dt).float() @ w.T).to(dt).float()
        if x_is_cuda(raw):
            out["gemm acc32"] = lambda x, w: (x.to(dt) @ w.to(dt).T).float()
            out["gemm acc16"] = lambda x, w: _acc16(lambda: (x.to(dt) @ w.to(dt).T).float())
        if qtype == "F16":
            out["mirror"] = CudaHalfMatMul()
        return out
    if qtype == "F32":
        return out
    out["sixth session"] = lambda x, w: round_q8_0(x) @ w.T          # its CUDA mirror: Q8_0 rounding
    parts = (lambda: offset_parts(raw, GGMLQuantizationType[qtype], shape)) if qtype in {t.name for t in OFFSET_TYPES} else None
    out["mirror"] = CudaQuantMatMul(qtype, parts)
    return out


def x_is_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def _acc16(fn):
    m = torch.backends.cuda.matmul
    if not hasattr(m, "allow_fp16_accumulation"):
        return torch.full((1,), float("nan"))
    saved, m.allow_fp16_accumulation = m.allow_fp16_accumulation, True
    try:
        return fn()
    finally:
        m.allow_fp16_accumulation = saved


def _pad_to_kv_cells(x: torch.Tensor) -> torch.Tensor:
    """x (..., P) zero-padded to llama.cpp's n_kv (harness.ours.numerics.kv_cells; unused cells hold 0)."""
    from harness.ours.numerics import kv_cells
    return torch.nn.functional.pad(x, (0, kv_cells(x.shape[-1]) - x.shape[-1]))


def attention_candidates() -> dict:
    """site -> {name: f(q, K, V, weights, group) -> tensor}: kq (H, T, P) and kqv (T, H, Dh)."""
    from harness.ours.numerics import mmvf_half

    def kq(round_q: bool):
        def f(q, K, V, w, g):
            q = q.half().float() if round_q else q
            return torch.einsum("thd,phd->htp", q, K.half().float().repeat_interleave(g, dim=1))
        return f

    def kqv_float(q, K, V, w, g):
        return torch.einsum("htp,phd->thd", w.half().float(), V.half().float().repeat_interleave(g, dim=1))

    def kqv_half_acc(q, K, V, w, g):          # one token only: per head, mmvf_half over the n_kv cells
        if w.shape[1] != 1:
            return None
        Vh = V.half().float().repeat_interleave(g, dim=1)                    # (P, H, Dh)
        rows = [mmvf_half(_pad_to_kv_cells(w[h]), _pad_to_kv_cells(Vh[:, h, :].T)) for h in range(w.shape[0])]
        return torch.stack(rows, dim=1)                                      # (1, H, Dh)

    def kqv_cublas16(q, K, V, w, g):         # cuBLAS with F16 compute and an F16 result (default precision)
        if w.device.type != "cuda":
            return None
        Vh = V.half().repeat_interleave(g, dim=1).permute(1, 0, 2)           # (H, P, Dh)
        return _acc16(lambda: torch.bmm(w.half(), Vh).float()).permute(1, 0, 2)
    return {"kq": {"q f16": kq(True), "q f32": kq(False)},
            "kqv": {"w f16, float acc": kqv_float, "w f16, float acc, f16 result": lambda *a: kqv_float(*a).half().float(),
                    "w f16, half acc (mmvf)": kqv_half_acc, "cuBLAS f16 compute": kqv_cublas16}}


def analyze_attention(run: dict, step: int, device: str) -> None:
    L = f"blk.{LAYER}."
    if any((step, L + k) not in run for k in ATTN):
        return
    steps = sorted(s for s, k in run if k == L + "k_rope" and s <= step)
    K = torch.cat([run[(s, L + "k_rope")] for s in steps]).to(device)
    V = torch.cat([run[(s, L + "v")] for s in steps]).to(device)
    q, w = run[(step, L + "q_rope")].to(device), run[(step, L + "attn_weights")].to(device)
    g = q.shape[1] // K.shape[1]
    for site, cands in attention_candidates().items():
        ref = run[(step, L + site)].to(device)
        for name, fn in cands.items():
            y = fn(q, K, V, w, g)
            if y is not None:
                e = _errors(y.reshape(ref.shape), ref)
                print(f"| {site} | F16 cache | {q.shape[0]} | {name} | {e[0]:.2e} | {e[1]:.2e} | {e[2]:.3f} |")


def analyze(files, device: str) -> None:
    from gguf import GGMLQuantizationType
    from harness.gguf.dequant import dequantize
    from harness.sites import LAYER_WEIGHTS
    from harness.synth import default_fixture
    for f in files:
        saved = torch.load(f)
        preset, wtype, seed, tied = saved["fixture"]
        path = default_fixture(wtype, preset=preset, seed=seed, tied=tied)
        if sha256_file(path) != saved["sha256"]:
            print(f"{f}: the fixture here differs from the dumped one (sha256); skipped")
            continue
        names = {k: f"blk.{LAYER}.{LAYER_WEIGHTS[k]}" for k in MATMULS}
        raw = _raw_weights(path, names.values())
        print(f"\n## {preset}/{wtype}")
        print("| site | type | T | candidate | rel_l2 | max/rms | equal |\n|---|---|---|---|---|---|---|")
        for run in saved["runs"]:
            steps = sorted({s for s, _ in run})
            for step in steps[:2]:
                for site, src in MATMULS.items():
                    key_in, key_out = (step, f"blk.{LAYER}.{src}"), (step, f"blk.{LAYER}.{site}")
                    if key_in not in run or key_out not in run:
                        continue
                    b, qtype, shape = raw[names[site]]
                    x = run[key_in].to(device).reshape(run[key_in].shape[0], -1)
                    ref = run[key_out].to(device).reshape(x.shape[0], -1)
                    w = dequantize(b.to(device), GGMLQuantizationType[qtype], shape)
                    for name, fn in candidates(b.to(device), qtype, shape).items():
                        y = fn(x, w)
                        if y is None:
                            continue
                        e = _errors(y, ref)
                        print(f"| {site} | {qtype} | {x.shape[0]} | {name} | {e[0]:.2e} | {e[1]:.2e} | {e[2]:.3f} |")
                analyze_attention(run, step, device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cmd", choices=("dump", "analyze"))
    p.add_argument("files", nargs="*")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    p.add_argument("--presets", help="dump only these presets (comma-separated)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.cmd == "dump":
        dump(a.out, a.device, a.presets)
    else:
        analyze(a.files, a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
