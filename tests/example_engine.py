"""The example C engine (examples/qwen2_engine.c) for tests: its planted bugs and a gcc build."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "examples" / "qwen2_engine.c"

# --bug NAME -> the first wrong op it makes (step, layer, site); layer None for the global sites
BUGS = {
    "no_qkv_bias": (0, 0, "blk.0.q"),
    "kv_pos_stuck": (1, 0, "blk.0.q_rope"),
    "lm_head_transposed": (0, None, "logits"),
    "q_wrong_lane": (0, 0, "blk.0.kq"),
}


def build(out: Path) -> Path:
    """Compile the engine to ``out`` with gcc (skips the test when gcc is missing)."""
    gcc = shutil.which("gcc")
    if not gcc:
        pytest.skip("gcc not found on PATH: cannot build examples/qwen2_engine.c")
    r = subprocess.run([gcc, "-std=c99", "-O2", "-o", str(out), str(SRC), "-lm"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return out
