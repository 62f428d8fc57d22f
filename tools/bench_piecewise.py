"""Piecewise CUDA graphs for steps with prefill chunks: a continuous-batching workload with
piecewise graphs on and off, side by side.

The workload is what RL rollouts look like to the engine: more requests than run at once,
prompt and output lengths drawn per request, so requests keep finishing and new prompts
keep joining the running decodes (mixed steps). Without piecewise graphs every mixed step
runs eagerly (~2,000 kernel launches from Python on a 48-layer model); with them it
replays one graph per layer boundary and runs attention between them. Modes alternate
within each repetition; medians are reported, and the tokens of both modes are compared.

    python tools/bench_piecewise.py --model qwen3-30b-a3b-shape --output docs/bench/piecewise_qwen3_30b_a3b_shape_h200.json
"""

from __future__ import annotations

import argparse
import gc
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

MODES = ("piecewise", "eager")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="olmoe-1b-7b-shape", choices=list(PRESETS))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-requests", type=int, default=384)
    p.add_argument("--max-requests", type=int, default=64, help="running at once")
    p.add_argument("--prompt-len", type=int, nargs=2, default=(128, 1024), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    p.add_argument("--max-step-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--repetitions", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-requests", type=int, default=16,
                   help="an eager run of this many requests first, so no measured run pays the first kernel compiles")
    p.add_argument("--output", type=Path, default=None)
    return p.parse_args(argv)


def workload(args, vocab_size: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(3, vocab_size, size=int(rng.integers(args.prompt_len[0], args.prompt_len[1] + 1))).tolist()
               for _ in range(args.num_requests)]
    params = [SamplingParams(max_new_tokens=int(rng.integers(args.output_len[0], args.output_len[1] + 1)),
                             ignore_eos=True) for _ in range(args.num_requests)]
    return prompts, params


def engine_config(args, mode: str) -> EngineConfig:
    per_request = -(-(args.prompt_len[1] + args.output_len[1]) // args.block_size)
    return EngineConfig(block_size=args.block_size, num_kv_blocks=args.max_requests * per_request + 8,
                        max_requests=args.max_requests, max_step_tokens=args.max_step_tokens,
                        enable_prefix_caching=False, record_routing=True, cuda_graphs=True,
                        cuda_graph_max_batch=args.max_requests, piecewise_graphs=mode == "piecewise",
                        piecewise_max_tokens=args.max_step_tokens, dtype=args.dtype, device="cuda", seed=args.seed)


def step_stats(entries: list[dict]) -> dict:
    def kind(e):
        if e["prefill_requests"] and e["decode_requests"]:
            return "mixed"
        return "prefill" if e["prefill_requests"] else "decode"
    out = {}
    for name in ("mixed", "prefill", "decode"):
        steps = [e for e in entries if e["active_tokens"] and kind(e) == name]
        out[name] = {"steps": len(steps),
                     "median_step_ms": statistics.median(e["step_time_ms"] for e in steps) if steps else None,
                     "median_gpu_ms": statistics.median(e["gpu_step_ms"] for e in steps if "gpu_step_ms" in e)
                     if steps else None,
                     "median_tokens": statistics.median(e["active_tokens"] for e in steps) if steps else None,
                     "total_ms": sum(e["step_time_ms"] for e in steps)}
    out["piecewise_steps"] = sum(1 for e in entries if e.get("piecewise_graph"))
    return out


def run_mode(model, args, mode: str, prompts, params) -> dict:
    start = time.perf_counter()
    engine = LLMEngine(model, engine_config(args, mode))
    build_s = time.perf_counter() - start
    torch.cuda.synchronize()
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    wall = time.perf_counter() - start
    generated = sum(len(r.output_token_ids) for r in results)
    stats = {"wall_s": wall, "build_s": build_s, "generated_tokens": generated,
             "prompt_tokens": sum(len(p) for p in prompts), "tokens_per_s": generated / wall,
             "steps": step_stats(engine.step_log.entries), "tokens": [r.output_token_ids for r in results],
             "routing": [r.routing for r in results]}
    runner = engine._device_state().piecewise_runner
    stats["num_graphs"] = runner.num_graphs if runner is not None else 0
    engine.close()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return stats


def build_report(args, per_mode: dict[str, list[dict]]) -> dict:
    def med(mode, fn):
        values = [fn(r) for r in per_mode[mode] if fn(r) is not None]
        return statistics.median(values) if values else None
    first = {m: per_mode[m][0] for m in MODES}
    # bf16: padding changes the fused kernels' tiles and so the rounding; with random
    # weights a flipped near-tie changes the rest of a request. fp32 exactness is a GPU test.
    pairs = list(zip(first["piecewise"]["tokens"], first["eager"]["tokens"]))
    same_tokens = sum(a == b for a, b in pairs) / max(len(pairs), 1)
    same_routing = sum(np.array_equal(a, b) for a, b in zip(first["piecewise"]["routing"], first["eager"]["routing"])
                       ) / max(len(pairs), 1)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
              "dtype": args.dtype, "date": time.strftime("%Y-%m-%d"), "num_requests": args.num_requests,
              "max_requests": args.max_requests, "prompt_len": list(args.prompt_len),
              "output_len": list(args.output_len), "max_step_tokens": args.max_step_tokens,
              "repetitions": args.repetitions, "warmup_requests": args.warmup_requests,
              "requests_with_identical_tokens": same_tokens,
              "requests_with_identical_routing": same_routing,
              "modes": {}}
    for mode in MODES:
        report["modes"][mode] = {
            "tokens_per_s": med(mode, lambda r: r["tokens_per_s"]), "wall_s": med(mode, lambda r: r["wall_s"]),
            "build_s": med(mode, lambda r: r["build_s"]), "num_graphs": first[mode]["num_graphs"],
            "piecewise_steps": first[mode]["steps"]["piecewise_steps"],
            "per_repetition_tokens_per_s": [r["tokens_per_s"] for r in per_mode[mode]],
            **{f"{k}_{f}": med(mode, lambda r, k=k, f=f: r["steps"][k][f])
               for k in ("mixed", "prefill", "decode") for f in ("steps", "median_step_ms", "median_gpu_ms",
                                                                 "median_tokens", "total_ms")}}
    a, b = report["modes"]["piecewise"], report["modes"]["eager"]
    report["throughput_ratio"] = a["tokens_per_s"] / b["tokens_per_s"]
    if a["mixed_median_gpu_ms"] and b["mixed_median_gpu_ms"]:   # host step times mix two steps (async)
        report["mixed_step_ratio"] = b["mixed_median_gpu_ms"] / a["mixed_median_gpu_ms"]
    return report


def format_table(r: dict) -> str:
    rows = [f"device: {r['device']}  model: {r['model']} ({r['dtype']})  {r['num_requests']} requests, "
            f"{r['max_requests']} at once, prompt {r['prompt_len']}, output {r['output_len']}",
            f"{'mode':<10} | {'tok/s':>8} | {'mixed ms':>8} | {'mixed GPU':>9} | {'mixed n':>7} | "
            f"{'prefill ms':>10} | {'decode ms':>9} | {'graphs':>6} | {'build s':>7}"]
    for mode in MODES:
        m = r["modes"][mode]
        f = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else "n/a"   # noqa: E731
        rows.append(f"{mode:<10} | {f(m['tokens_per_s'], ',.0f'):>8} | {f(m['mixed_median_step_ms'], '.2f'):>8} | "
                    f"{f(m['mixed_median_gpu_ms'], '.2f'):>9} | {f(m['mixed_steps'], '.0f'):>7} | "
                    f"{f(m['prefill_median_step_ms'], '.2f'):>10} | {f(m['decode_median_step_ms'], '.2f'):>9} | "
                    f"{m['num_graphs']:>6} | {f(m['build_s'], '.1f'):>7}")
    rows.append(f"throughput piecewise / eager: {r['throughput_ratio']:.3f}x; mixed step eager / piecewise: "
                f"{r.get('mixed_step_ratio', float('nan')):.2f}x (GPU span); requests with identical tokens "
                f"{r['requests_with_identical_tokens']:.0%}, routing {r['requests_with_identical_routing']:.0%} (bf16)")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_piecewise needs a CUDA GPU", file=sys.stderr)
        return 2
    config = get_preset(args.model)
    model = build_model(config, seed=0, dtype=torch_dtype(args.dtype), device="cuda")
    prompts, params = workload(args, config.vocab_size)
    if args.warmup_requests > 0:
        n = min(args.warmup_requests, len(prompts))
        run_mode(model, args, "eager", prompts[:n], params[:n])
    per_mode: dict[str, list[dict]] = {m: [] for m in MODES}
    for rep in range(args.repetitions):
        for mode in (MODES if rep % 2 == 0 else MODES[::-1]):
            stats = run_mode(model, args, mode, prompts, params)
            per_mode[mode].append(stats)
            print(f"rep {rep} {mode}: {stats['tokens_per_s']:,.0f} tok/s, mixed steps "
                  f"{stats['steps']['mixed']['steps']} at {stats['steps']['mixed']['median_step_ms']} ms", flush=True)
    report = build_report(args, per_mode)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
