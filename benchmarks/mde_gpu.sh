#!/bin/bash
# Issue 17 on the GPU machine: the CUDA null of the systematic statistics, the CUDA MDE table
# (before/after, from one run), and the false alarms on fresh clean runs. From the repo root:
#   source .device/setup.sh && bash benchmarks/mde_gpu.sh      (logs and results in $OUT)
# Each step writes as it goes: a time limit keeps what is done.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
run() { echo "\$ $*"; timeout "${LIMIT:-300}" "$@"; echo "[exit $?]"; }
{
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
LIMIT=${NULL_LIMIT:-70} run python benchmarks/mde.py null --device cuda --presets tiny,tiny-qwen3
cp harness/compare/systematic.json "$OUT/systematic.json"
LIMIT=${MDE_LIMIT:-50} run python benchmarks/mde.py mde --device cuda --seeds 11 \
  --regimes tiny/f32,tiny/f16,tiny/q8_0,tiny/q4_k_m --out "$OUT/mde-cuda"
LIMIT=${CLEAN_LIMIT:-50} run python benchmarks/mde.py clean --device cuda --runs 20 --big-runs 3 --big-seed 11 \
  --regimes tiny/f32,tiny/f16,tiny/q8_0,tiny/q4_k_m,qwen2.5-0.5b/f16,mixed --out "$OUT/clean-cuda.json"
} 2>&1 | tee -a "$OUT/log.txt"
