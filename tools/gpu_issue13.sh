#!/usr/bin/env bash
# Issue 13 on a multi-GPU machine (nvidia-h200-x2 or larger), one stage per device call (each under 9.5 min).
#   bash tools/gpu_issue13.sh tests    # NCCL correctness: parallel blocks + engine (+ hybrid cases), CUDA-graph decode
#   bash tools/gpu_issue13.sh routing  # recording off / gpu / host-sync, 1 GPU vs TP=2 and EP=2 (Qwen3-30B-A3B shape)
#   bash tools/gpu_issue13.sh big      # models that do not fit one GPU in bf16, TP x EP, recording on
# JSON and logs under $OUT; the routing stage writes parallel_<model>_<layout>_<gpu>.json (the issue's fields).
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-./out-gpu}; mkdir -p "$OUT"
source tools/gpu_env.sh   # carried wheels, PYTHONPATH
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
gpus=$(nvidia-smi -L | wc -l)
case "${1:-tests}" in
tests)
  for f in tests/gpu/test_parallel_nccl.py tests/gpu/test_engine_parallel_nccl.py; do
    n=$(basename "$f" .py)
    timeout 270 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider "$f" > "$OUT/$n.log" 2>&1
    echo "$n rc=$? $(tail -1 "$OUT/$n.log")"
  done
  ;;
routing)
  W=(--model qwen3-30b-a3b-shape --num-requests 64 --prompt-len 256 --output-len 64 --repetitions 2)
  timeout 150 python3 tools/bench_parallel_routing.py "${W[@]}" --output "$OUT/parallel_qwen3_30b_a3b_shape_tp1_ep1_h200.json" \
    > "$OUT/routing_tp1.log" 2>&1; echo "tp1 rc $?"; tail -3 "$OUT/routing_tp1.log"
  for layout in 2:1 2:2; do
    IFS=: read -r tp ep <<< "$layout"
    timeout 170 torchrun --standalone --nproc-per-node "$tp" tools/bench_parallel_routing.py "${W[@]}" \
      --tensor-parallel-size "$tp" --expert-parallel-size "$ep" --reference "$OUT/parallel_qwen3_30b_a3b_shape_tp1_ep1_h200.json" \
      --output "$OUT/parallel_qwen3_30b_a3b_shape_tp${tp}_ep${ep}_h200.json" > "$OUT/routing_tp${tp}_ep${ep}.log" 2>&1
    echo "tp$tp ep$ep rc $?"; tail -8 "$OUT/routing_tp${tp}_ep${ep}.log"
  done
  ;;
big)
  # Qwen3-Next-80B-A3B shape (hybrid; 148 GiB of bf16 weights: 75.7 GiB per rank at TP = EP = 2).
  A=(--dtype bfloat16 --record-routing --ignore-eos --num-requests 32 --prompt-len 512 --output-len 64
     --shared-prefix-len 256 --max-requests 32 --kv-cache-memory 16GiB --overwrite)
  python3 tools/run_inference.py --model qwen3-next-80b-a3b-shape --tensor-parallel-size 2 --expert-parallel-size 2 \
    --dry-run "${A[@]}" --output-dir "$OUT/qwen3_next_dry" 2>&1 | tail -12
  timeout 240 torchrun --standalone --nproc-per-node 2 tools/run_inference.py --model qwen3-next-80b-a3b-shape \
    --tensor-parallel-size 2 --expert-parallel-size 2 "${A[@]}" --output-dir "$OUT/qwen3_next_tp2_ep2" \
    > "$OUT/qwen3_next_tp2_ep2.log" 2>&1; echo "qwen3-next tp2 ep2 rc $?"; tail -10 "$OUT/qwen3_next_tp2_ep2.log"
  # GLM-4.5-Air shape (about 200 GB of bf16 weights: 99.6 GiB per rank at TP = EP = 2).
  timeout 240 torchrun --standalone --nproc-per-node 2 tools/run_inference.py --model glm-4.5-air-shape \
    --tensor-parallel-size 2 --expert-parallel-size 2 "${A[@]}" --output-dir "$OUT/glm_air_tp2_ep2" \
    > "$OUT/glm_air_tp2_ep2.log" 2>&1; echo "glm-4.5-air tp2 ep2 rc $?"; tail -10 "$OUT/glm_air_tp2_ep2.log"
  ;;
*) echo "usage: $0 tests|routing|big" >&2; exit 2 ;;
esac
