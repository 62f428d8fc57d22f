#!/usr/bin/env bash
# The skinny GEMM for the attention projections (inference/kernels/skinny_linear.py,
# EngineConfig.skinny_linear_max_tokens) on a GPU: not run on one yet. Each stage fits one
# device call (under 9 minutes); files under $OUT.
#   bash tools/gpu_skinny_linear.sh tests   # kernel + engine GPU tests, one pytest process per file
#   bash tools/gpu_skinny_linear.sh tune    # tools/tune_skinny_linear.py, 240 s budget (rows 1 first)
#   bash tools/gpu_skinny_linear.sh bench   # bench_decode batch 1 / 16, both shapes: kernel off (0) vs on (16)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source tools/gpu_env.sh   # carried wheels, PYTHONPATH
case "${1:-tests}" in
tests)
  for f in tests/inference/kernels/test_skinny_linear.py tests/gpu/test_skinny_linear_cuda.py \
           tests/inference/model/test_skinny_linear_wiring.py tests/tools/test_tune_skinny_linear.py; do
    n=$(basename "$f" .py)
    timeout 150 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider "$f" > "$OUT/$n.log" 2>&1
    echo "$n rc=$? $(tail -1 "$OUT/$n.log")"
  done
  ;;
tune)
  timeout 300 python3 tools/tune_skinny_linear.py --time-budget 240 --output "$OUT/skinny_linear_tuning.json" \
    > "$OUT/tune_skinny.log" 2>&1
  echo "tune_skinny_linear rc $?"; tail -30 "$OUT/tune_skinny.log"
  ;;
bench)
  for v in 0 16; do
    timeout 260 python3 tools/bench_decode.py --skinny-linear-max-tokens "$v" \
      --models olmoe-1b-7b-shape,qwen3-30b-a3b-shape --batches 1,16 --output-len 32 --prefill-requests 0 --no-hf \
      --compare-backends '' --time-budget 220 --output-dir "$OUT/skinny_$v" > "$OUT/bench_skinny_$v.log" 2>&1
    echo "== skinny_linear_max_tokens $v (rc $?)"
    grep -A3 "batch   step ms" "$OUT/bench_skinny_$v.log" | head -12
    grep -E "attention projections +[0-9]" "$OUT/bench_skinny_$v.log" | head -4
  done
  ;;
*) echo "usage: $0 tests|tune|bench" >&2; exit 2 ;;
esac
