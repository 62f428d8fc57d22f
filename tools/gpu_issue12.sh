#!/usr/bin/env bash
# Issue 12 in ONE device call on a 2- or 4-GPU machine (nvidia-h200-x2 / -x4, <= 9.5 min):
#  1. NCCL correctness: the parallel blocks (tests/gpu/test_parallel_nccl.py) and the whole
#     engine + CLI under torchrun (tests/gpu/test_engine_parallel_nccl.py: TP=2, EP=2, TP2xEP2,
#     TP x DP, CUDA-graph decode with NCCL captured, fp32, equal to the single-GPU engine);
#  2. serving throughput per layout through the real CLI (olmoe-1b-7b-shape, bf16, recording
#     on, CUDA graphs, async scheduling), tokens compared with the 1-GPU run;
#  3. per-block TP/EP costs (bench_parallel_blocks, Qwen3-30B-A3B shape) if time is left.
# Logs, JSON and run directories go under $OUT (default ./out-gpu); a short table is printed last.
# Usage (repo root, on the GPU machine): OUT=/path bash tools/gpu_issue12.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-./out-gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
start=$SECONDS
left() { echo $((560 - (SECONDS - start))); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
gpus=$(nvidia-smi -L | wc -l)

# 1. NCCL correctness.
timeout 290 python3 -m pytest -q -x tests/gpu/test_parallel_nccl.py tests/gpu/test_engine_parallel_nccl.py \
  > "$OUT/pytest_gpu_issue12.log" 2>&1
echo "pytest exit $? after $((SECONDS - start)) s"; tail -n 15 "$OUT/pytest_gpu_issue12.log"

# 2. Serving per layout (tp:ep:processes), each bounded; the 1-GPU run first (the token reference).
layouts="1:1:1 2:1:2 2:2:2"; [ "$gpus" -ge 4 ] && layouts="$layouts 4:1:4 4:4:4 2:2:4"
for layout in $layouts; do
  IFS=: read -r tp ep nproc <<< "$layout"
  [ "$nproc" -gt "$gpus" ] && continue
  budget=$(left); [ "$budget" -gt 110 ] && budget=110
  if [ "$budget" -lt 40 ]; then echo "serve $layout skipped: $(left)s left"; continue; fi
  timeout "$budget" torchrun --standalone --nproc-per-node "$nproc" tools/run_inference.py \
    --model olmoe-1b-7b-shape --dtype bfloat16 --record-routing --ignore-eos --num-requests 128 --prompt-len 256 \
    --output-len 128 --shared-prefix-len 64 --max-requests 64 --max-step-tokens 2048 --kv-cache-memory 16GiB \
    --tensor-parallel-size "$tp" --expert-parallel-size "$ep" --overwrite --output-dir "$OUT/serve_tp${tp}_ep${ep}_n${nproc}" \
    > "$OUT/serve_tp${tp}_ep${ep}_n${nproc}.log" 2>&1
  echo "serve tp=$tp ep=$ep procs=$nproc exit $? after $((SECONDS - start)) s"
done

# 3. Per-block costs, if time is left.
budget=$(left)
if [ "$budget" -gt 90 ]; then
  blocks="1:1,2:1,2:2"; [ "$gpus" -ge 4 ] && blocks="1:1,2:1,2:2,4:1,4:2,4:4"
  timeout "$budget" torchrun --nproc-per-node "$gpus" tools/bench_parallel_blocks.py --model qwen3-30b-a3b-shape \
    --layouts "$blocks" --tokens 1,64,1024 --output "$OUT/bench_parallel_qwen3.json" > "$OUT/bench_parallel_qwen3.log" 2>&1
  echo "block bench exit $? after $((SECONDS - start)) s"
else
  echo "block bench skipped: ${budget}s left"
fi

# Summary table (last).
python3 - "$OUT" <<'PY'
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
log = (out / "pytest_gpu_issue12.log").read_text() if (out / "pytest_gpu_issue12.log").exists() else ""
summary = [l for l in log.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", l)]
print("\n== issue 12 ==")
print(f"NCCL checks (blocks, engine, CLI): {summary[-1].strip() if summary else 'no pytest summary (see log)'}")

def results(d):
    p = d / "results.jsonl"
    return {r["id"]: r["output_token_ids"] for r in map(json.loads, p.read_text().splitlines())} if p.exists() else None

runs = sorted(out.glob("serve_tp*_ep*_n*.log"))
ref = results(out / "serve_tp1_ep1_n1")
print("\nserving olmoe-1b-7b-shape bf16, 128 requests x 128 tokens, recording on (tokens vs the 1-GPU run)")
print(f"{'layout':<16}{'gen tok/s':>11}{'total tok/s':>13}{'routing %':>11}{'same tokens':>13}  status")
for logf in runs:
    name = logf.stem
    text = logf.read_text()
    tp, ep, n = re.match(r"serve_tp(\d+)_ep(\d+)_n(\d+)", name).groups()
    thr = re.search(r"throughput\s+([\d,.]+) generated tok/s, ([\d,.]+) total", text)
    share = re.search(r"recorder host time ([\d.]+)%", text)
    got = results(out / name)
    same = "-"
    if got and ref:
        same = f"{sum(got[k] == ref.get(k) for k in got)}/{len(got)}"
    status = "ok" if thr else (text.strip().splitlines() or ["no output"])[-1][:60]
    print(f"{f'tp{tp} ep{ep} x{n}':<16}{thr.group(1) if thr else '-':>11}{thr.group(2) if thr else '-':>13}"
          f"{share.group(1) if share else '-':>11}{same:>13}  {status}")
p = out / "bench_parallel_qwen3.json"
if p.exists():
    r = json.loads(p.read_text())
    layouts = sorted({(x["tp"], x["ep"]) for x in r["rows"]})
    print(f"\n{r['model']} ({r['gpu']}, {r['dtype']}), per-block graph ms (eager if no graph) per tp:ep")
    print(f"{'tokens':>6} {'block':<16}" + "".join(f"{f'{t}:{e}':>9}" for t, e in layouts))
    cells = {(x["tokens"], x["block"], x["tp"], x["ep"]): x.get("graph_ms", x["eager_ms"]) for x in r["rows"]}
    for tokens, block in sorted({(x["tokens"], x["block"]) for x in r["rows"]}):
        vals = [cells.get((tokens, block, t, e)) for t, e in layouts]
        print(f"{tokens:>6} {block:<16}" + "".join(f"{v:9.3f}" if v is not None else f"{'-':>9}" for v in vals))
PY
