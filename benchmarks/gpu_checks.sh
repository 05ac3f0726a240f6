#!/bin/bash
# The GPU-side checks, run on the GPU machine from the repository root:
#   source .device/setup.sh && bash benchmarks/gpu_checks.sh PHASE
# PHASE: calibrate | tests | reports | zoo | gate | bench | bench7b | qwen3 | recal | gputests | numerics | null05b | mdecuda |
#        mixedclean | profile | speed | long32k | long7b | long32b | kquant7b. Logs go to $OUT (or /tmp/out).
# What is left for a GPU: recal (CUDA tolerances with the mirrors, the compiled Q8_1 quantizers
# included), null05b, mdecuda. Issue 16's rows (speed, long32k, long7b, long32b) were rerun on the
# fourteenth session's final code, one H100 (benchmarks/RESULTS.md).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
F=build/fixtures
fix() { python -c "from harness.synth import default_fixture as d; print(d('$2', preset='$1', seed=0, cache_dir='$F'))"; }
run() { echo "\$ $*"; timeout "${LIMIT:-300}" "$@"; echo "[exit $?]"; }
for phase in "$@"; do case $phase in
calibrate)
  LIMIT=560 run python -m harness.calibrate --device cuda --preset tiny,tiny-qwen3,qwen2.5-0.5b,qwen3-0.6b --mixed
  cp harness/compare/tolerances.json "$OUT/tolerances.json" ;;
tests)
  run python -m pytest tests/test_gpu.py tests/test_dequant_torch.py -q -rs -p no:cacheprovider ;;
reports)
  m=$(fix qwen2.5-0.5b f16)
  run python -m harness.cli report "$m" --prompt "The quick brown fox jumps over the lazy dog" --steps 4 --device cuda
  run python -m harness.cli report "$m" --prompt "The quick brown fox jumps over the lazy dog" --steps 4 --device cuda --inject drop_qkv_bias
  run python -m harness.cli report "$(fix tiny f16)" --tokens 3,14,15,92,65,35,89,79 --steps 3 --device cuda ;;
zoo)
  run python -m harness.cli zoo "$(fix qwen2.5-0.5b f16)" --device cuda
  run python -m harness.cli zoo "$(fix qwen2.5-0.5b q4_k_m)" --device cuda ;;
gate)
  m=$(fix qwen2.5-0.5b f16)
  run python -m harness.cli record "$m" --prompt "The quick brown fox" --steps 3 --device cuda --name qwen05b-f16-cuda --out-dir "$OUT/runs"
  du -sh "$OUT/runs/qwen05b-f16-cuda"
  run python -m harness.cli gate "$OUT/runs/qwen05b-f16-cuda" --model "$m" --device cuda --junit "$OUT/junit.xml" --summary "$OUT/summary.md"
  run python -m harness.cli gate "$OUT/runs/qwen05b-f16-cuda" --model "$m" --device cuda --inject drop_qkv_bias --format markdown
  rm -rf "$OUT/runs" ;;
bench)
  LIMIT=560 run python benchmarks/bench.py --out "$OUT" ;;
qwen3)
  # issue 14 on the GPU: CUDA tolerances for qwen3 (merged into the table), the Qwen3 zoo, and
  # clean 512-token + 16-step reports of the real-shaped qwen3 and mixed-type qwen2.5 files
  LIMIT=90 run python -m pytest tests/test_gpu.py -q -p no:cacheprovider
  LIMIT=200 run python -m harness.calibrate --device cuda --preset tiny-qwen3,qwen3-0.6b
  cp harness/compare/tolerances.json "$OUT/tolerances.json"
  m=$(fix qwen3-0.6b f16)
  LIMIT=120 run python -m harness.cli zoo "$m" --device cuda --steps 3
  p=$(python -c "print(','.join(str(300 + 7 * i) for i in range(512)))")
  run python -m harness.cli report "$m" --tokens "$p" --steps 16 --device cuda --format markdown --out "$OUT/qwen3-0.6b-f16.md"
  run python -m harness.cli report "$(fix qwen3-0.6b q4_k_m)" --tokens "$p" --steps 16 --device cuda --format markdown --out "$OUT/qwen3-0.6b-q4_k_m.md"
  t=$(python -c "from harness.synth import default_fixture as d; print(d('q4_k_m', preset='qwen2.5-0.5b', seed=0, cache_dir='$F', tied=True))")
  run python -m harness.cli report "$t" --tokens "$p" --steps 16 --device cuda --format markdown --out "$OUT/qwen2.5-0.5b-tied-q4_k_m.md" ;;
bench7b)
  LIMIT=560 run python benchmarks/bench.py --out "$OUT" --lengths '' --with-7b ;;
mdecuda)
  LIMIT=150 run python benchmarks/false_alarms.py --device cuda --out "$OUT/false_alarms_cuda_tiny.json"
  LIMIT=150 run python benchmarks/mde.py mde --device cuda --seeds 11 --regimes tiny/f32,tiny/f16,tiny/q8_0,tiny/q4_k_m,mixed --out "$OUT/mde-cuda" ;;
mixedclean)
  LIMIT=560 run python benchmarks/false_alarms.py --device cuda --presets tiny --types f32 --seeds 1 \
    --prompts-per-seed 1 --long 0 --mixed-runs 20 --mixed-seeds 2 --out "$OUT/false_alarms_cuda_mixed.json" ;;
recal)
  # every CUDA regime, with the current mirror (tolerances are the worst clean error x the safety factor)
  LIMIT=400 run python -m harness.calibrate --device cuda --fresh --preset tiny,tiny-qwen3,qwen2.5-0.5b,qwen3-0.6b --mixed
  cp harness/compare/tolerances.json "$OUT/tolerances.json" ;;
gputests)
  LIMIT=180 run python -m pytest -m gpu tests/ -q -rs -p no:cacheprovider ;;
numerics)
  # which arithmetic llama.cpp's CUDA kernels do at each weight matmul: its tensors, then candidate mirrors
  LIMIT=200 run python benchmarks/cuda_numerics.py dump --out "$OUT"
  LIMIT=60 run python benchmarks/cuda_numerics.py analyze "$OUT"/*.pt ;;
null05b)
  # CUDA logits were left without a systematic threshold (fifth session): calibrate on 151,936-word
  # rows, then clean runs of those files (none may diverge)
  LIMIT=300 run python benchmarks/mde.py null --device cuda --presets tiny,tiny-qwen3,qwen2.5-0.5b --big-types f16 --mixed
  cp harness/compare/systematic.json "$OUT/systematic.json"
  LIMIT=240 run python benchmarks/false_alarms.py --device cuda --presets qwen2.5-0.5b --types f16 --seeds 1 \
    --prompts-per-seed 20 --mixed-runs 20 --out "$OUT/false_alarms_cuda_05b.json" ;;
profile)
  LIMIT=120 run python benchmarks/profile_report.py 512
  LIMIT=150 run python benchmarks/profile_stream.py 2048 97 ;;
kquant7b)
  # the 32B-shaped row's ffn_gate flag: a 7B-shaped file of drawn k-quant blocks (is it the blocks or the shapes?)
  m=build/fixtures/qwen2.5-7b-q4_k_m-kquant-s0.gguf
  [ -f $m ] || python -c "from harness.synth import write_synthetic as w; w('$m', 'qwen2.5-7b', 'q4_k_m', kquant=True)"
  p=$(python -c "print(','.join(str(300 + 7 * i) for i in range(2048)))")
  run python -m harness.cli report "$m" --tokens "$p" --steps 8 --device cuda --format markdown --out "$OUT/kquant7b.md"
  head -c 3000 "$OUT/kquant7b.md" ;;
speed)
  LIMIT=200 run python benchmarks/bench.py --out "$OUT" --lengths 512 --steps 8 --repeats 2 ;;
long32k)
  LIMIT=380 run python benchmarks/bench.py --out "$OUT" --long 05b-32k --steps 8 --repeats 1 ;;
long7b)
  LIMIT=560 run python benchmarks/bench.py --out "$OUT" --long 7b-8k --steps 8 --repeats 1 ;;
long32b)
  df -h . ; LIMIT=560 run python benchmarks/bench.py --out "$OUT" --long 32b-2k --steps 8 --repeats 1 ;;
esac; done 2>&1 | tee -a "$OUT/log.txt"
