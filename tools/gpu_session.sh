#!/usr/bin/env bash
# One device call: install carried wheels, GPU tests, kernel checks, then benchmarks.
# Usage (on the GPU machine, repo root): bash tools/gpu_session.sh [quick|full|routing|final|checkpoint|qwen]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source tools/gpu_env.sh   # carried wheels, PYTHONPATH
mode=${1:-quick}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "$mode" = quick ]; then
  python3 -m pytest -q -x tests/gpu tests/routing_replay/test_recorder.py 2>&1 | tail -15
  python3 tools/bench_routing.py --model olmoe-1b-7b-shape --num-requests 64 --prompt-len 128 --output-len 64 \
      --repetitions 1 --output "$OUT/bench_quick.json" 2>&1 | tail -12
elif [ "$mode" = full ]; then
  python3 tools/bench_decode.py --model olmoe-1b-7b-shape --batch 64 --output "$OUT/bench_decode_olmoe.json" 2>&1 | tee "$OUT/bench_decode_olmoe.log" | tail -14
elif [ "$mode" = routing ]; then
  python3 tools/bench_routing.py --model olmoe-1b-7b-shape --repetitions 5 --output "$OUT/bench_routing_olmoe.json" 2>&1 | tee "$OUT/bench_routing_olmoe.log" | tail -9
elif [ "$mode" = final ]; then
  python3 -m pytest -q tests/gpu tests/inference/kernels tests/routing_replay/test_recorder.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -3
  run=/tmp/run_olmoe
  python3 tools/run_inference.py --model olmoe-1b-7b-shape --num-requests 128 --prompt-len 256 --output-len 128 \
      --shared-prefix-len 64 --record-routing --ignore-eos --kv-cache-memory 16GiB --output-dir $run 2>&1 | tail -8
  python3 -c "from routing_replay.run_dir_schema import validate_run_dir; p = validate_run_dir('$run'); print('validate_run_dir:', p[:5] or 'ok'); assert not p"
  python3 tools/analyze_step_details.py $run/step_details.json --json "$OUT/analysis_olmoe.json" --plot-dir /tmp/plots 2>&1 | tail -12
  cp $run/step_details.json "$OUT/step_details_olmoe.json"; cp /tmp/plots/phase_share.png "$OUT/" 2>/dev/null
  python3 tools/bench_routing.py --model olmoe-1b-7b-shape --repetitions 5 --output "$OUT/bench_routing_olmoe.json" 2>&1 | tee "$OUT/bench_routing_olmoe.log" | tail -8
elif [ "$mode" = checkpoint ]; then
  python3 -m pytest -q tests/gpu/test_resume_cuda.py 2>&1 | tail -5
  python3 tools/bench_checkpoint.py --repetitions 3 2>&1 | tee "$OUT/bench_checkpoint_olmoe.log" | tail -6
  cp docs/bench/checkpoint_*.json "$OUT/" 2>/dev/null
elif [ "$mode" = qwen ]; then
  python3 tools/bench_routing.py --model qwen3-30b-a3b-shape --num-requests 128 --output "$OUT/bench_routing_qwen3.json" 2>&1 | tee "$OUT/bench_routing_qwen3.log" | tail -9
fi
