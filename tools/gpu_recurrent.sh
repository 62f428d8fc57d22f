#!/usr/bin/env bash
# One device call for the recurrent layers: install carried wheels (fla-core, einops), GPU
# tests of the recurrent kernels and layers and of the hybrid model (paged auto mode vs reference,
# relu^2 experts), then the benchmark (table printed last).
# Usage (on the GPU machine, repo root): bash tools/gpu_recurrent.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import importlib.util as u; print('fla importable:', u.find_spec('fla') is not None)"
python3 -m pytest -q tests/gpu/test_recurrent_cuda.py tests/inference/kernels/test_recurrent_decode.py \
  tests/gpu/test_hybrid_cuda.py tests/inference/model/test_experts.py 2>&1 | tee "$OUT/pytest_recurrent.log" | tail -15
python3 tools/recurrent_state_bytes.py --json "$OUT/recurrent_state_bytes.json" | tail -6
python3 tools/bench_recurrent.py --batch 64 --prefill-len 2048 --output "$OUT/bench_recurrent.json" 2>&1 | tee "$OUT/bench_recurrent.log" | tail -16
