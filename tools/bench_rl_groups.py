#!/usr/bin/env python
"""RL groups (several samples of each prompt, submitted together) with the prefix cache on and
off, alternating repetitions in one process.

With the cache on, the first copy of a prompt computes it and the copies admitted behind it,
in the same step too, hit its blocks (``SequenceCache.commit_scheduled``). Off, every copy
computes the whole prompt, which is what copies admitted in the same step did before blocks
were hashed at schedule time. Reported per mode: prompt tokens computed, prefill and wall
time, generated tok/s, and whether tokens, log-probs and routing equal across the modes
(seeded sampling at temperature 1, recording on).

    python tools/bench_rl_groups.py --model olmoe-1b-7b-shape --output docs/bench/rl_groups_olmoe_1b_7b_shape_h200.json
    OMP_NUM_THREADS=1 python tools/bench_rl_groups.py --model tiny-moe --device cpu --num-prompts 8 --group-size 8 \\
        --prompt-len 384 --output-len 16 --output docs/bench/rl_groups_tiny_moe_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import orjson
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.presets import PRESETS, build_model, get_preset, torch_dtype
from inference.request import SamplingParams
from inference.workload import synthetic_prompts
from routing_replay import step_kind

MODES = ("cached", "uncached")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="olmoe-1b-7b-shape", choices=list(PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-step-tokens", type=int, default=8192)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def engine_config(args, mode: str) -> EngineConfig:
    requests = args.num_prompts * args.group_size
    blocks = requests * -(-(args.prompt_len + args.output_len) // args.block_size) + 8
    cuda = args.device.startswith("cuda")
    return EngineConfig(block_size=args.block_size, num_kv_blocks=blocks, max_requests=requests,
                        max_step_tokens=args.max_step_tokens, enable_prefix_caching=mode == "cached",
                        record_routing=True, cuda_graphs=cuda, cuda_graph_max_batch=min(requests, 512),
                        dtype=args.dtype, device=args.device)


def serve(model, args, mode: str, prompts: list[list[int]], warm_up: list[list[int]]) -> tuple[dict, list]:
    """One engine serving ``warm_up`` (other prompts: graphs and kernels ready, nothing cached
    that the measured run could hit), then ``prompts``, timed."""
    params = [SamplingParams(max_new_tokens=args.output_len, ignore_eos=True, temperature=1.0, seed=i)
              for i in range(len(prompts))]
    with LLMEngine(model, engine_config(args, mode)) as engine:
        engine.generate(warm_up, params[: len(warm_up)])
        first = len(engine.step_log.entries)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        results = engine.generate(prompts, params)
        wall = time.perf_counter() - start
        entries = engine.step_log.entries[first:]
    prefill = [e for e in entries if step_kind(e) != "decode"]
    generated = sum(len(r.output_token_ids) for r in results)
    return {"wall_s": wall, "prompt_tokens_computed": sum(e["prefill_tokens"] for e in entries),
            "cached_tokens": sum(r.num_cached_tokens for r in results),
            "prefill_steps": len(prefill), "prefill_step_ms": sum(e["step_time_ms"] for e in prefill),
            "generated_tokens_per_s": generated / wall}, results


def same_outputs(a: list, b: list) -> dict:
    tokens = all(x.output_token_ids == y.output_token_ids for x, y in zip(a, b))
    logprobs = max((float(np.max(np.abs(np.subtract(x.output_logprobs, y.output_logprobs)))) for x, y in zip(a, b)),
                   default=0.0)
    routing = all(np.array_equal(x.routing, y.routing) for x, y in zip(a, b))
    return {"identical_tokens": tokens, "identical_routing": routing, "max_logprob_difference": logprobs}


def main(argv=None) -> int:
    args = parse_args(argv)
    config = get_preset(args.model)
    model = build_model(config, seed=0, dtype=torch_dtype(args.dtype), device=args.device)
    specs = synthetic_prompts(num_requests=args.num_prompts, prompt_len=args.prompt_len,
                              vocab_size=config.vocab_size, seed=1)
    prompts = [s.prompt_token_ids for s in specs for _ in range(args.group_size)]
    other = synthetic_prompts(num_requests=1, prompt_len=args.prompt_len, vocab_size=config.vocab_size, seed=2)
    warm_up = [other[0].prompt_token_ids] * args.group_size
    runs = {mode: [] for mode in MODES}
    last = {}
    for _ in range(args.repetitions):
        for mode in MODES:                       # alternated
            stats, last[mode] = serve(model, args, mode, prompts, warm_up)
            runs[mode].append(stats)
    med = {mode: {k: statistics.median(r[k] for r in reps) for k in reps[0]} for mode, reps in runs.items()}
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "model": args.model, "dtype": args.dtype,
              "num_prompts": args.num_prompts, "group_size": args.group_size, "prompt_len": args.prompt_len,
              "output_len": args.output_len, "max_step_tokens": args.max_step_tokens,
              "repetitions": args.repetitions, "medians": med, "runs": runs,
              "speedup_wall": med["uncached"]["wall_s"] / med["cached"]["wall_s"],
              "prompt_tokens_ratio": med["cached"]["prompt_tokens_computed"] / med["uncached"]["prompt_tokens_computed"],
              **same_outputs(last["cached"], last["uncached"]), "command": " ".join(sys.argv)}
    print(format_table(report))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return 0


def format_table(r: dict) -> str:
    lines = [f"{r['model']} on {r['device']} ({r['dtype']}): {r['num_prompts']} prompts x {r['group_size']} samples, "
             f"prompt {r['prompt_len']}, output {r['output_len']}, medians of {r['repetitions']}",
             "| mode | prompt tokens computed | cached tokens | prefill steps | prefill ms | wall s | gen tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for mode, m in r["medians"].items():
        lines.append(f"| {mode} | {m['prompt_tokens_computed']:,.0f} | {m['cached_tokens']:,.0f} | "
                     f"{m['prefill_steps']:.0f} | {m['prefill_step_ms']:,.1f} | {m['wall_s']:.2f} | "
                     f"{m['generated_tokens_per_s']:,.0f} |")
    lines.append(f"wall: uncached / cached {r['speedup_wall']:.2f}x; prompt tokens computed cached / uncached "
                 f"{r['prompt_tokens_ratio']:.3f}; identical tokens {r['identical_tokens']}, routing "
                 f"{r['identical_routing']}, max log-prob difference {r['max_logprob_difference']:.2e}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
