#!/usr/bin/env bash
# Issue 10 in ONE device call (<= 8 minutes): GPU tests of the new kernels (MLA decode, sinks
# + windows in paged decode / prefill) and of the new families through the CUDA engine, then
# Moonlight-16B-A3B-shape decode at batch 64 against its bandwidth floor (latent KV counted)
# with the recording ratio (record on / off), and GPT-OSS-20B-shape if time is left.
# JSON and logs go under $OUT (default ./out-gpu); a short table is printed last.
# Usage (repo root, on the GPU machine): OUT=/path bash tools/gpu_issue10.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-./out-gpu}; mkdir -p "$OUT"
source tools/gpu_env.sh   # carried wheels, PYTHONPATH
start=$SECONDS
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

# 1. GPU tests (interpreter cases are CPU-side and already run in CI).
timeout 270 python3 -m pytest -q -k "not interpreter" \
  tests/inference/kernels/test_mla_decode.py tests/inference/kernels/test_paged_decode.py \
  tests/inference/kernels/test_prefill_attention.py tests/inference/model/test_experts.py \
  tests/gpu/test_families_cuda.py tests/gpu/test_engine_cuda.py \
  > "$OUT/pytest_gpu_issue10.log" 2>&1
echo "pytest exit $? after $((SECONDS - start)) s"; tail -n 25 "$OUT/pytest_gpu_issue10.log"

# 2. Moonlight-16B-A3B shape: decode at batch 64 vs the floor, recording ratio.
timeout 300 python3 tools/bench_families.py --model moonlight-16b-a3b-shape --batch 64 --prompt-len 512 \
  --output-len 128 --repetitions 2 --output "$OUT/bench_moonlight.json" > "$OUT/bench_moonlight.log" 2>&1
echo "moonlight bench exit $? after $((SECONDS - start)) s"; tail -n 3 "$OUT/bench_moonlight.log"

# 3. GPT-OSS-20B shape, only if the budget allows (one repetition per mode).
left=$((470 - (SECONDS - start)))
if [ "$left" -gt 120 ]; then
  timeout "$left" python3 tools/bench_families.py --model gpt-oss-20b-shape --batch 64 --prompt-len 512 \
    --output-len 128 --repetitions 1 --output "$OUT/bench_gpt_oss.json" > "$OUT/bench_gpt_oss.log" 2>&1
  echo "gpt-oss bench exit $? after $((SECONDS - start)) s"; tail -n 3 "$OUT/bench_gpt_oss.log"
else
  echo "gpt-oss bench skipped: ${left}s left"
fi

# Summary table (last).
python3 - "$OUT" <<'PY'
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
log = (out / "pytest_gpu_issue10.log").read_text() if (out / "pytest_gpu_issue10.log").exists() else ""
summary = [l for l in log.splitlines() if re.search(r"\d+ (passed|failed)", l)]
print("\n== issue 10 on", next((json.loads(p.read_text())["device"] for p in out.glob("bench_*.json")), "GPU"), "==")
print(f"{'GPU tests':<28} | {summary[-1].strip() if summary else 'no pytest summary (see log)'}")
print(f"{'model':<28} | {'step ms':>8} | {'floor ms':>8} | {'ratio':>6} (<=2) | {'rec on/off':>10} (>=0.995) | tokens same")
for name in ("bench_moonlight.json", "bench_gpt_oss.json"):
    p = out / name
    if not p.exists():
        print(f"{name:<28} | missing (see {name[:-5]}.log)")
        continue
    r = json.loads(p.read_text())
    f = lambda key, width, digits: f"{r[key]:>{width}.{digits}f}" if isinstance(r.get(key), (int, float)) else f"{'n/a':>{width}}"
    print(f"{r['model']:<28} | {f('measured_step_ms_record_on', 8, 2)} | {f('floor_step_ms', 8, 2)} | "
          f"{f('ratio_to_floor', 6, 2)}      | {f('recording_ratio', 10, 4)}           | {r['tokens_identical_record_on_off']}")
PY
