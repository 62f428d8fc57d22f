#!/usr/bin/env bash
# One device call for the hybrid models (under 9 minutes): install carried wheels (fla-core,
# einops); GPU tests of the recurrent kernels and layers, of the hybrid model and of the engine
# serving hybrids (decode CUDA graphs, state-checkpoint prefix hits); the recurrent-layer
# benchmark; decode at batch 64 against the bandwidth floor (recurrent state read + written
# counted) and the routing-recording ratio (record on / off) for qwen3.5-35b-a3b-shape and
# nemotron-3-nano-30b-a3b-shape. A short table is printed last. Files under $OUT (8):
#   pytest.log state_bytes.json bench_recurrent.json decode_qwen35.json decode_nemotron.json
#   routing_qwen35.json routing_nemotron.json summary.txt
# Usage (on the GPU machine, repo root): bash tools/gpu_recurrent.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source tools/gpu_env.sh   # carried wheels, PYTHONPATH
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import importlib.util as u; print('fla importable:', u.find_spec('fla') is not None)"
timeout 160 python3 -m pytest -q -rfE -p no:cacheprovider tests/gpu/test_recurrent_cuda.py tests/inference/kernels/test_recurrent_decode.py \
  tests/gpu/test_hybrid_cuda.py tests/inference/model/test_experts.py 2>&1 | tee "$OUT/pytest.log" | tail -15
python3 tools/recurrent_state_bytes.py --json "$OUT/state_bytes.json" | tail -6
timeout 30 python3 tools/bench_recurrent.py --batch 64 --prefill-len 2048 --output "$OUT/bench_recurrent.json" 2>&1 | tail -16
declare -A SHORT=([qwen3.5-35b-a3b-shape]=qwen35 [nemotron-3-nano-30b-a3b-shape]=nemotron)
for model in qwen3.5-35b-a3b-shape nemotron-3-nano-30b-a3b-shape; do
  s=${SHORT[$model]}
  timeout 90 python3 tools/bench_decode.py --model "$model" --batch 64 --prompt-len 512 --output-len 64 \
    --prefill-requests 4 --no-hf --compare-backends "" --time-budget 60 --output "$OUT/decode_$s.json" 2>&1 | tail -6
  timeout 90 python3 tools/bench_routing.py --model "$model" --num-requests 64 --prompt-len 256 --output-len 64 \
    --repetitions 2 --modes off,gpu --output "$OUT/routing_$s.json" 2>&1 | tail -4
done
for model in qwen3.5-35b-a3b-shape nemotron-3-nano-30b-a3b-shape; do   # state pool / checkpoint memory (no weights built)
  python3 tools/run_inference.py --model "$model" --dry-run --max-requests 64 --kv-cache-memory 16GiB 2>&1 \
    | grep -E "^  (model|KV cache|state pool|state checkpoints|hybrid) "
done
python3 - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else {}
tests = (out / "pytest.log").read_text().strip().splitlines()[-1:] if (out / "pytest.log").is_file() else ["no pytest log"]
print("gpu tests:", tests[0] if tests else "?")
print(f"{'model':<32} {'step ms@64':>10} {'floor ms':>9} {'x floor':>8} {'state GiB/step':>15} {'rec ratio':>10} {'gpu-time ratio':>15}")
for s, model in (("qwen35", "qwen3.5-35b-a3b-shape"), ("nemotron", "nemotron-3-nano-30b-a3b-shape")):
    d, r = load(f"decode_{s}.json").get("batches", {}).get("64", {}), load(f"routing_{s}.json")
    f = lambda v, spec: "-" if v is None else format(v, spec)
    state = d.get("bytes_per_step", {}).get("state")
    print(f"{model:<32} {f(d.get('step_ms'), '10.2f'):>10} {f(d.get('floor_ms'), '9.2f'):>9} "
          f"{f(d.get('ratio_to_floor'), '8.2f'):>8} {f(state and state / 2**30, '15.2f'):>15} "
          f"{f(r.get('ratio_gpu_vs_off'), '10.4f'):>10} {f(r.get('gpu_time_ratio_gpu_vs_off'), '15.4f'):>15}")
print("targets: x floor <= 2 (state bytes counted), recording ratio >= 0.995")
EOF
