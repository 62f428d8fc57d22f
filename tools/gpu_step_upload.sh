#!/usr/bin/env bash
# One device call for the packed step upload (inference/step_upload.py): the GPU tests that run
# StepBatch on CUDA (its own test, then the engine's decode graphs, piecewise graphs, hybrids,
# sleep / wake), one pytest process per file, then tools/bench_step_upload.py for an attention
# and a hybrid batch. Tables last; files under $OUT.
#   bash tools/gpu_step_upload.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for f in tests/gpu/test_step_batch_cuda.py tests/gpu/test_engine_cuda.py tests/gpu/test_hybrid_cuda.py \
         tests/gpu/test_engine_lifecycle_cuda.py; do
  n=$(basename "$f" .py)
  timeout 150 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider "$f" > "$OUT/$n.log" 2>&1
  echo "$n rc=$? $(tail -1 "$OUT/$n.log")"
done
for kind in attention hybrid; do
  flag=(); [ "$kind" = hybrid ] && flag=(--hybrid)
  timeout 120 python3 tools/bench_step_upload.py --device cuda "${flag[@]}" --output "$OUT/step_upload_$kind.json" \
    > "$OUT/bench_$kind.log" 2>&1
  echo "== bench_step_upload $kind (rc $?)"; tail -8 "$OUT/bench_$kind.log"
done
