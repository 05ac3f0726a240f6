"""Time the one-token F16 matmul emulation (harness.ours.numerics.mmvf_half), optionally against an
older version of the module, and check both give the same bits:

    git show 3bb71dd:harness/ours/numerics.py > /tmp/numerics_old.py
    python benchmarks/mmvf_cost.py [--against /tmp/numerics_old.py] [--device cpu|cuda]
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness.ours import numerics  # noqa: E402

SHAPES = ((896, 896), (4864, 896), (896, 4864), (96, 18944))   # 0.5B q/o, ffn_up, ffn_down; a 7B-wide slice


def median_ms(f, x, w, repeats: int) -> tuple[float, torch.Tensor]:
    y = f(x, w)
    ts = []
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = f(x, w)
        if x.is_cuda:
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3, y


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", help="an older harness/ours/numerics.py to time and compare with")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    old = None
    if args.against:
        spec = importlib.util.spec_from_file_location("numerics_old", args.against)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    g = torch.Generator().manual_seed(0)
    for rows, ncols in SHAPES:
        w = (torch.randn(rows, ncols, generator=g) * 0.05).half().float().to(args.device)
        x = torch.randn(1, ncols, generator=g).to(args.device)
        ms, y = median_ms(numerics.mmvf_half, x, w, args.repeats)
        line = f"{rows} x {ncols}: {ms:.1f} ms"
        if old is not None:
            ms_old, y_old = median_ms(old.mmvf_half, x, w, args.repeats)
            line += f" (older {ms_old:.1f} ms, same bits: {torch.equal(y, y_old)})"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
