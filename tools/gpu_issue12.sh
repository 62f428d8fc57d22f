#!/usr/bin/env bash
# Issue 12 building blocks in ONE device call on a 4-GPU machine (nvidia-h200-x4, <= 8 min):
# the multi-rank checks under NCCL (2 and 4 GPUs, fp32, equal to the single-GPU model, replicated
# outputs bit-identical across a replica), then the per-block TP/EP costs (bf16, eager and CUDA
# graph with NCCL captured) for the Qwen3-30B-A3B shape and, if time is left, the GPT-OSS-20B shape.
# JSON and logs go under $OUT (default ./out-gpu); a short table is printed last.
# Usage (repo root, on the GPU machine): OUT=/path bash tools/gpu_issue12.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-./out-gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
start=$SECONDS
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
gpus=$(nvidia-smi -L | wc -l)

# 1. NCCL correctness (the CPU gloo checks, one rank per GPU).
timeout 200 python3 -m pytest -q tests/gpu/test_parallel_nccl.py > "$OUT/pytest_gpu_issue12.log" 2>&1
echo "pytest exit $? after $((SECONDS - start)) s"; tail -n 15 "$OUT/pytest_gpu_issue12.log"

# 2. Per-block costs: every layout the GPUs allow, decode and prefill token counts.
layouts="1:1,2:1,2:2"; [ "$gpus" -ge 4 ] && layouts="1:1,2:1,2:2,4:1,4:2,4:4"
timeout 200 torchrun --nproc-per-node "$gpus" tools/bench_parallel_blocks.py --model qwen3-30b-a3b-shape \
  --layouts "$layouts" --tokens 1,8,64,256,1024 --output "$OUT/bench_parallel_qwen3.json" \
  > "$OUT/bench_parallel_qwen3.log" 2>&1
echo "qwen3 bench exit $? after $((SECONDS - start)) s"
left=$((440 - (SECONDS - start)))
if [ "$left" -gt 90 ]; then
  timeout "$left" torchrun --nproc-per-node "$gpus" tools/bench_parallel_blocks.py --model gpt-oss-20b-shape \
    --layouts "$layouts" --tokens 1,64,1024 --output "$OUT/bench_parallel_gpt_oss.json" \
    > "$OUT/bench_parallel_gpt_oss.log" 2>&1
  echo "gpt-oss bench exit $? after $((SECONDS - start)) s"
else
  echo "gpt-oss bench skipped: ${left}s left"
fi

# Summary table (last): per model, token count and block, graph ms per layout.
python3 - "$OUT" <<'PY'
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
log = (out / "pytest_gpu_issue12.log").read_text() if (out / "pytest_gpu_issue12.log").exists() else ""
summary = [l for l in log.splitlines() if re.search(r"\d+ (passed|failed|skipped)", l)]
print("\n== issue 12 ==")
print(f"NCCL checks: {summary[-1].strip() if summary else 'no pytest summary (see log)'}")
for name in ("bench_parallel_qwen3.json", "bench_parallel_gpt_oss.json"):
    p = out / name
    if not p.exists():
        print(f"{name}: missing (see {name[:-5]}.log)")
        continue
    r = json.loads(p.read_text())
    layouts = sorted({(x["tp"], x["ep"]) for x in r["rows"]})
    print(f"\n{r['model']} ({r['gpu']}, {r['dtype']}), graph ms (eager if no graph) per tp:ep")
    print(f"{'tokens':>6} {'block':<16}" + "".join(f"{f'{t}:{e}':>9}" for t, e in layouts))
    cells = {(x["tokens"], x["block"], x["tp"], x["ep"]): x.get("graph_ms", x["eager_ms"]) for x in r["rows"]}
    for tokens, block in sorted({(x["tokens"], x["block"]) for x in r["rows"]}):
        vals = [cells.get((tokens, block, t, e)) for t, e in layouts]
        print(f"{tokens:>6} {block:<16}" + "".join(f"{v:9.3f}" if v is not None else f"{'-':>9}" for v in vals))
PY
