#!/usr/bin/env bash
# Staged device calls for issue 14: first validate what has not run on a GPU yet (the tests
# stage runs every GPU test file of the CUDA path, the batched sampler's and the one-copy
# step upload's included), then measure. Each stage fits one device call (under 9 minutes);
# files under $OUT.
# A device machine goes back 30 s after a call ends: send the calls back to back (each stops
# itself under LIMIT seconds, default 560). Stop 23 ran `measure` and the sampler's work; the
# next session starts with `sampling` (the fused sampler's GPU tests after the review's two
# fixes, its benchmark on LM-like and flat rows, the engine A/B), then `kernels` / `prefill`.
#   bash tools/gpu_next_session.sh validate  # the GPU tests that did not run yet on the H200 (stop 22 ran the rest),
#                                            # the hybrid engine tests, tools/bench_sampler.py, then (time left)
#                                            # the step-upload and RL-group benchmarks
#   bash tools/gpu_next_session.sh measure   # bench_decode with sampling temperature 1 (both shapes, 1/16/64/256,
#                                            # host stages, timelines, 8k prefill), then batch 1 skinny GEMM off vs on
#   bash tools/gpu_next_session.sh kernels   # third call: MHA decode attention, element-wise vs tl.dot path (quick
#                                            # sweep, OLMoE 1/16/64/256), the prefill attention tuner, then OLMoE
#                                            # decode at 64 / 256 with the engine's MHA path off vs on (mha-dot)
#   bash tools/gpu_next_session.sh tests   # GPU tests, one pytest process per file (a crash poisons only its own)
#   bash tools/gpu_next_session.sh hybrid  # the hybrid-model GPU tests alone (they need over two minutes)
#   bash tools/gpu_next_session.sh bench   # decode batch 1 / 16: small MoE path off vs on, K/V write off vs on
#   bash tools/gpu_next_session.sh tune    # tools/tune_paged_decode.py --quick, then the small-MoE crossover
#   bash tools/gpu_next_session.sh prefill # Qwen3-30B-A3B 8k prefill step by component, vs each matmul's FLOP floor
#   bash tools/gpu_next_session.sh attn    # prefill / decode attention GPU tests, then tools/tune_prefill_attention.py --quick
#   bash tools/gpu_next_session.sh decode  # tools/bench_decode.py, both shapes, batches 1 / 16 / 64 / 256 + 8k prefill
#                                          # (further arguments go to bench_decode.py)
#   bash tools/gpu_next_session.sh mha     # full paged-decode sweep (warps x stages too) of OLMoE's MHA shape at 64 / 256
#   bash tools/gpu_next_session.sh sampling  # the fused sampling kernel: its GPU tests, tools/bench_sampler.py on
#                                            # LM-like and flat rows, then OLMoE decode, fused vs torch sampler
#   bash tools/gpu_next_session.sh upload    # the one-copy step upload: StepBatch + lifecycle GPU tests, then
#                                            # tools/bench_step_upload.py for an attention and a hybrid batch
#   bash tools/gpu_next_session.sh groups    # tools/bench_rl_groups.py: 32 prompts x 8 samples, prefix cache on / off
#                                            # (after the three calls above, if device time is left)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source tools/gpu_env.sh   # carried wheels, PYTHONPATH
LIMIT=${LIMIT:-560}; END=$((SECONDS+LIMIT))
# At most 8 files come back from $OUT: everything goes back as one archive.
pack() { (cd "$OUT" && tar czf /tmp/session.tgz --exclude=session.tgz . && find . -mindepth 1 -delete && mv /tmp/session.tgz .); }
trap pack EXIT
budget() { local b=$1 l; l=$(( END - SECONDS - 5 )); [ "$l" -lt "$b" ] && b=$l; echo "$b"; }
run_test() {  # run_test SECONDS FILE [pytest args]: one pytest process, cut at the call's deadline
  local b f n t0=$SECONDS; b=$(budget "$1"); f=$2; shift 2; n=$(basename "$f" .py)
  if [ "$b" -lt 10 ]; then echo "SKIP $n (deadline)"; return; fi
  timeout "$b" python3 -m pytest -q -rfE --tb=short -p no:cacheprovider "$f" "$@" > "$OUT/$n.log" 2>&1
  echo "$n rc=$? $((SECONDS-t0))s $(tail -1 "$OUT/$n.log")"
}
run_cmd() {  # run_cmd SECONDS NAME COMMAND...: output in $OUT/NAME.log, cut at the call's deadline
  local b n t0=$SECONDS; b=$(budget "$1"); n=$2; shift 2
  if [ "$b" -lt 10 ]; then echo "SKIP $n (deadline)"; return; fi
  timeout "$b" "$@" > "$OUT/$n.log" 2>&1; echo "== $n rc=$? $((SECONDS-t0))s"
}
stage=${1:-tests}
case "$stage" in
validate)
  # Kernel files without their interpreter tests: CI runs those on CPU, the GPU's minutes go to CUDA.
  for f in tests/gpu/test_sampler_cuda.py tests/inference/kernels/test_mla_decode.py tests/gpu/test_families_cuda.py \
           tests/inference/kernels/test_prefill_attention.py tests/gpu/test_skinny_linear_cuda.py \
           tests/inference/kernels/test_skinny_linear.py tests/gpu/test_engine_lifecycle_cuda.py; do
    [ -f "$f" ] && run_test 150 "$f" -k "not interpreter"
  done
  run_test 90 tests/inference/kernels/test_paged_decode.py -k gpu   # the MHA tl.dot path (use_dot)
  run_test 170 tests/gpu/test_hybrid_cuda.py -k engine
  run_cmd 80 bench_sampler python3 tools/bench_sampler.py --device cuda --repetitions 5 --output "$OUT/sampler_h200.json"
  tail -30 "$OUT/bench_sampler.log" 2>/dev/null
  # With time left before the deadline (each is skipped otherwise): the step upload and RL groups.
  run_cmd 60 bench_upload python3 tools/bench_step_upload.py --device cuda --output "$OUT/step_upload_attention.json"
  tail -8 "$OUT/bench_upload.log" 2>/dev/null
  run_cmd 120 rl_groups python3 tools/bench_rl_groups.py --model olmoe-1b-7b-shape --num-prompts 16 --group-size 8 \
    --prompt-len 1024 --output-len 64 --repetitions 2 --output "$OUT/rl_groups_olmoe_1b_7b_shape_h200.json"
  tail -6 "$OUT/rl_groups.log" 2>/dev/null
  for f in "$OUT"/*.log; do [ -f "$f" ] && grep -q -E "^(FAILED|ERROR)" "$f" && { echo "--- $f"; grep -E "^(FAILED|ERROR)" "$f" | head -8; }; done
  ;;
kernels)
  run_cmd 200 tune_mha python3 tools/tune_paged_decode.py --quick --models olmoe-1b-7b --batches 1,16,64,256 \
    --contexts 544,4096 --time-budget 170 --output "$OUT/paged_decode_mha_dot_h200.json"
  tail -8 "$OUT/tune_mha.log"
  run_cmd 230 tune_prefill python3 tools/tune_prefill_attention.py --quick --time-budget 200 \
    --output "$OUT/prefill_attention_tuning.json"
  tail -9 "$OUT/tune_prefill.log"
  run_cmd 150 mha_dot python3 tools/bench_decode.py --models olmoe-1b-7b-shape --batches 64,256 --output-len 32 \
    --prefill-requests 0 --profile-batches '' --no-hf --compare-backends '' --compare-small-ops mha-dot \
    --time-budget 120 --output "$OUT/decode_olmoe_mha_dot_h200.json"
  grep -A4 "batch   step ms" "$OUT/mha_dot.log" | head -12
  ;;
measure)
  run_cmd 400 decode python3 tools/bench_decode.py --no-hf --compare-backends '' --output-len 64 --time-budget 360 \
    --profile-batches 1,64 --timeline-batches 1,64 --prefill-requests 12 --profile-prefill --sampling temperature \
    --output-dir "$OUT/decode" "${@:2}"
  if grep -q -- "--skinny-linear-max-tokens" tools/bench_decode.py; then
    for v in 0 16; do
      run_cmd 70 "skinny_$v" python3 tools/bench_decode.py --skinny-linear-max-tokens "$v" \
        --models olmoe-1b-7b-shape,qwen3-30b-a3b-shape --batches 1 --output-len 32 --prefill-requests 0 --no-hf \
        --compare-backends '' --profile-batches '' --time-budget 50 --output-dir "$OUT/skinny_$v"
      grep -A2 "batch   step ms" "$OUT/skinny_$v.log" | head -6
    done
  fi
  sed -n '/=== summary ===/,$p' "$OUT/decode.log" | grep -v "^      " | head -70
  ;;
tests)
  for f in tests/inference/kernels/test_paged_decode.py tests/inference/kernels/test_norm_rotary_kv_write.py \
           tests/inference/kernels/test_norm_rotary.py tests/gpu/test_fused_small_ops_cuda.py \
           tests/inference/kernels/test_fused_moe_small.py tests/inference/kernels/test_fused_moe.py \
           tests/inference/kernels/test_mla_decode.py tests/gpu/test_engine_cuda.py tests/gpu/test_families_cuda.py \
           tests/gpu/test_sampler_cuda.py tests/inference/sampling/test_sampler_ties.py tests/gpu/test_step_batch_cuda.py \
           tests/inference/kernels/test_sample_triton.py; do
    n=$(basename "$f" .py)
    timeout 150 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider "$f" > "$OUT/$n.log" 2>&1
    echo "$n rc=$? $(tail -1 "$OUT/$n.log")"
  done
  ;;
bench)
  for v in 0 ''; do
    tag=${v:-on}; flag=(); [ -n "$v" ] && flag=(--small-moe-max-tokens "$v")
    timeout 240 python3 tools/bench_decode.py "${flag[@]}" \
      --models olmoe-1b-7b-shape,qwen3-30b-a3b-shape --batches 1,16 --profile-batches 1 --output-len 32 \
      --prefill-requests 0 --no-hf --compare-backends '' --compare-small-ops no-kv-write --time-budget 200 \
      --output-dir "$OUT/small_moe_$tag" > "$OUT/bench_$tag.log" 2>&1
    echo "== small MoE path $tag (rc $?)"; grep -A3 "batch   step ms" "$OUT/bench_$tag.log" | head -12
  done
  ;;
tune)
  timeout 300 python3 tools/tune_paged_decode.py --quick --time-budget 240 --output "$OUT/paged_decode_tuning.json" \
    > "$OUT/tune_paged.log" 2>&1; echo "tune_paged_decode rc $?"; tail -26 "$OUT/tune_paged.log"
  timeout 200 python3 tools/tune_fused_moe.py --small-only --shapes olmoe-1b-7b,qwen3-30b-a3b --time-budget 150 \
    --report "$OUT/fused_moe_small_h200.json" > "$OUT/tune_small.log" 2>&1; echo "tune small rc $?"; tail -14 "$OUT/tune_small.log"
  mkdir -p "$OUT/configs"; i=0; for f in inference/kernels/configs/fused_moe/*.json; do cp "$f" "$OUT/configs/cfg_$i.json"; echo "cfg_$i.json <- $f" >> "$OUT/configs/names.txt"; i=$((i+1)); done
  ;;
prefill)
  for m in qwen3-30b-a3b-shape olmoe-1b-7b-shape; do
    timeout 200 python3 tools/bench_decode.py --model "$m" --batches 1 --profile-batches 1 --output-len 8 \
      --prefill-requests 12 --profile-prefill --no-hf --compare-backends '' --time-budget 150 \
      --output "$OUT/prefill_$m.json" > "$OUT/prefill_$m.log" 2>&1
    echo "== $m (rc $?)"; sed -n '/^prefill/,$p' "$OUT/prefill_$m.log" | head -16
  done
  ;;
attn)
  for f in tests/inference/kernels/test_prefill_attention.py tests/inference/kernels/test_paged_decode.py \
           tests/gpu/test_engine_cuda.py; do
    n=$(basename "$f" .py)
    timeout 240 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider "$f" > "$OUT/$n.log" 2>&1
    echo "$n rc=$? $(tail -1 "$OUT/$n.log")"
  done
  timeout 420 python3 tools/tune_prefill_attention.py --quick --time-budget 300 \
    --output "$OUT/prefill_attention_tuning.json" > "$OUT/tune_prefill.log" 2>&1
  echo "tune_prefill_attention rc $?"; tail -9 "$OUT/tune_prefill.log"
  ;;
decode)
  timeout 400 python3 tools/bench_decode.py --no-hf --compare-backends '' --output-len 64 --time-budget 360 \
    --profile-batches 1,64 --timeline-batches 1,64 --prefill-requests 12 --profile-prefill --output-dir "$OUT/decode" \
    "${@:2}" > "$OUT/decode.log" 2>&1
  echo "bench_decode rc $?"; sed -n '/=== summary ===/,$p' "$OUT/decode.log" | grep -v "^      " | head -60
  ;;
mha)
  timeout 420 python3 tools/tune_paged_decode.py --models olmoe-1b-7b --batches 64,256 --contexts 544,4096 \
    --time-budget 360 --output "$OUT/paged_decode_mha_tuning.json" > "$OUT/tune_mha.log" 2>&1
  echo "tune_paged_decode rc $?"; tail -6 "$OUT/tune_mha.log"
  ;;
sampling)
  for f in tests/inference/kernels/test_sample_triton.py tests/gpu/test_sampler_cuda.py \
           tests/inference/sampling/test_sampler_ties.py; do
    run_test 120 "$f" -k "not interpreter"
  done
  for l in peaked gaussian; do      # LM-like rows (the candidates path) and flat rows (the whole-row search)
    run_cmd 100 "sampler_$l" python3 tools/bench_sampler.py --device cuda --logits "$l" --vocab 151936 \
      --workloads temperature,top-p,top-k+top-p --repetitions 5 --output "$OUT/sampler_$l.json"
    tail -12 "$OUT/sampler_$l.log" 2>/dev/null
  done
  for s in temperature top-p; do    # the engine with the fused sampler vs the torch ops
    run_cmd 90 "decode_$s" python3 tools/bench_decode.py --sampling "$s" --models olmoe-1b-7b-shape --batches 1,64,256 \
      --output-len 48 --prefill-requests 0 --profile-batches '' --no-hf --compare-backends '' \
      --compare-small-ops torch-sampler --time-budget 70 --output "$OUT/decode_sampling_$s.json"
    grep -A4 "batch   step ms" "$OUT/decode_$s.log" 2>/dev/null | head -6
  done
  ;;
hybrid)
  timeout 420 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/gpu/test_hybrid_cuda.py \
    > "$OUT/test_hybrid_cuda.log" 2>&1; echo "test_hybrid_cuda rc=$? $(tail -1 "$OUT/test_hybrid_cuda.log")"
  ;;
upload)
  for f in tests/gpu/test_step_batch_cuda.py tests/gpu/test_engine_lifecycle_cuda.py; do
    n=$(basename "$f" .py)
    timeout 150 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider "$f" > "$OUT/$n.log" 2>&1
    echo "$n rc=$? $(tail -1 "$OUT/$n.log")"
  done
  for kind in attention hybrid; do
    flag=(); [ "$kind" = hybrid ] && flag=(--hybrid)
    timeout 120 python3 tools/bench_step_upload.py --device cuda "${flag[@]}" --output "$OUT/step_upload_$kind.json" \
      > "$OUT/bench_upload_$kind.log" 2>&1
    echo "== bench_step_upload $kind (rc $?)"; tail -8 "$OUT/bench_upload_$kind.log"
  done
  ;;
groups)
  timeout 400 python3 tools/bench_rl_groups.py --model olmoe-1b-7b-shape --num-prompts 32 --group-size 8 \
    --prompt-len 1024 --output-len 128 --repetitions 3 --output "$OUT/rl_groups_olmoe_1b_7b_shape_h200.json" \
    > "$OUT/rl_groups.log" 2>&1; echo "bench_rl_groups rc $?"; tail -6 "$OUT/rl_groups.log"
  ;;
*) echo "usage: $0 validate|measure|kernels|tests|hybrid|bench|tune|prefill|attn|decode|mha|sampling|upload|groups" >&2; exit 2 ;;
esac
