#!/usr/bin/env python
"""Routing-recording overhead, side by side: ``off``, ``gpu`` (this project's recorder) and
``host-sync`` (a reimplementation of Megatron-core 0.19's per-step host copy), on one
process, one model, one workload, alternating repetitions.

    python tools/bench_routing.py --model olmoe-1b-7b-shape --output docs/bench/routing.json

Prints a table last and writes JSON (top-level ``device``, ``model``, ``ratio_gpu_vs_off``,
``ratio_host_sync_vs_off``, per-mode details).
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
from inference.workload import synthetic_prompts
from routing_replay import step_kind

MODES = ("off", "gpu", "host-sync")
PHASES = ("routing_gather_ms", "routing_store_ms", "routing_reconstruct_ms", "routing_finalize_ms")


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The model, device and synthetic workload flags the engine benchmarks share (what
    ``engine_config`` reads): OLMoE-1B-7B shape, 256 requests x (512 + 256) by default."""
    p.add_argument("--model", default="olmoe-1b-7b-shape", choices=list(PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-step-tokens", type=int, default=8192)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="JSON file")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(p)
    p.add_argument("--num-layers", type=int, default=None, help="override the preset's layer count (memory)")
    p.add_argument("--modes", default=",".join(MODES))
    return p.parse_args(argv)


def decode_stats(entries: list[dict]) -> dict:
    """Throughput and routing host time over decode-only steps (the steady state)."""
    decode = [e for e in entries if step_kind(e) == "decode"]
    step_ms = sum(e["step_time_ms"] for e in decode)
    tokens = sum(e["active_tokens"] for e in decode)
    routing = [sum(e[k] for k in PHASES) for e in decode]
    return {
        "decode_steps": len(decode),
        "decode_tokens": tokens,
        "decode_tokens_per_s": tokens / (step_ms / 1e3) if step_ms else 0.0,
        "mean_decode_step_ms": step_ms / len(decode) if decode else 0.0,
        "routing_host_ms_per_decode_step": statistics.fmean(routing) if routing else 0.0,
        "routing_share_of_decode_step": (sum(routing) / step_ms) if step_ms else 0.0,
        "phase_ms_per_decode_step": {k: statistics.fmean(e[k] for e in decode) if decode else 0.0 for k in PHASES},
        "graph_steps": sum(1 for e in decode if e["cuda_graph"]),
        "gpu_idle_share": gpu_idle_share(decode),
        "mean_gpu_forward_ms": (statistics.fmean(e["gpu_forward_ms"] for e in decode if "gpu_forward_ms" in e)
                                if any("gpu_forward_ms" in e for e in decode) else None),
    }


def gpu_idle_share(entries: list[dict]) -> float | None:
    """Share of GPU time between the first and last decode step in which the GPU ran none
    of the engine's work: idle gaps before each step over gaps plus step spans."""
    decode = [e for e in entries if step_kind(e) == "decode" and "gpu_step_ms" in e and "gpu_idle_before_ms" in e]
    if not decode:
        return None
    idle = sum(e["gpu_idle_before_ms"] for e in decode[1:])
    busy = sum(e["gpu_step_ms"] for e in decode[1:])
    return idle / (idle + busy) if idle + busy > 0 else None


def run_mode(model, mode: str, args, prompts, params) -> tuple[dict, list]:
    cfg = engine_config(args, mode)
    engine = LLMEngine(model, cfg)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = engine.generate([p.prompt_token_ids for p in prompts], params, request_ids=[p.request_id for p in prompts])
    wall = time.perf_counter() - start
    stats = decode_stats(engine.step_log.entries)
    stats["wall_s"] = wall
    stats["generated_tokens"] = sum(len(r.output_token_ids) for r in results)
    stats["preemptions"] = sum(r.num_preemptions for r in results)
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return stats, results


def engine_config(args, mode: str) -> EngineConfig:
    blocks = args.num_requests * -(-(args.prompt_len + args.output_len) // args.block_size) + 8
    return EngineConfig(block_size=args.block_size, num_kv_blocks=blocks, max_requests=args.num_requests,
                        max_step_tokens=args.max_step_tokens, enable_prefix_caching=False,
                        record_routing=mode != "off", routing_recorder="host-sync" if mode == "host-sync" else "gpu",
                        cuda_graphs=args.cuda_graphs, cuda_graph_max_batch=args.num_requests,
                        dtype=args.dtype, device=args.device, seed=args.seed)


def compare_routing(a: list, b: list) -> float:
    """Share of requests whose tokens and routing are identical in two runs."""
    same = sum(1 for x, y in zip(a, b) if x.output_token_ids == y.output_token_ids
               and x.routing is not None and y.routing is not None
               and np.array_equal(x.routing.astype(np.int64), y.routing.astype(np.int64)))
    return same / max(len(a), 1)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}, but CUDA is not available (use --device cpu); nothing measured",
              file=sys.stderr)
        return 2
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.cuda_graphs is None:
        args.cuda_graphs = args.device.startswith("cuda")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    config = get_preset(args.model)
    if args.num_layers:
        from dataclasses import replace
        n = args.num_layers
        config = replace(config, num_layers=n, dense_layers=tuple(i for i in config.dense_layers if i < n),
                         layer_types=config.layer_types[:n], mlp_types=config.mlp_types[:n])
    model = build_model(config, seed=args.seed, dtype=torch_dtype(args.dtype), device=args.device)
    prompts = synthetic_prompts(num_requests=args.num_requests, prompt_len=args.prompt_len,
                                vocab_size=config.vocab_size, seed=args.seed)
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    # Warm-up: Triton compiles and allocator growth happen outside the timed runs.
    warm = argparse.Namespace(**{**vars(args), "num_requests": min(8, args.num_requests)})
    run_mode(model, "gpu", warm, prompts[: warm.num_requests], params)
    per_mode: dict[str, list[dict]] = {m: [] for m in modes}
    last_results: dict[str, list] = {}
    for rep in range(args.repetitions):
        order = modes[rep % len(modes):] + modes[: rep % len(modes)]
        for mode in order:
            stats, results = run_mode(model, mode, args, prompts, params)
            per_mode[mode].append(stats)
            last_results[mode] = results
            print(f"rep {rep} {mode:>9}: decode {stats['decode_tokens_per_s']:,.0f} tok/s, "
                  f"routing {stats['routing_host_ms_per_decode_step']:.3f} ms/step, wall {stats['wall_s']:.1f}s",
                  flush=True)
    report = build_report(args, config, modes, per_mode, last_results)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    print(format_table(report))
    return 0


def build_report(args, config, modes, per_mode, last_results) -> dict:
    def median(mode: str, key: str) -> float:
        return statistics.median(s[key] for s in per_mode[mode])

    summary = {m: {"decode_tokens_per_s_median": median(m, "decode_tokens_per_s"),
                   "routing_host_ms_per_decode_step_median": median(m, "routing_host_ms_per_decode_step"),
                   "routing_share_of_decode_step_median": median(m, "routing_share_of_decode_step"),
                   "mean_decode_step_ms_median": median(m, "mean_decode_step_ms"),
                   "wall_s_median": median(m, "wall_s"),
                   "repetitions": per_mode[m]} for m in modes}
    off = summary.get("off", {}).get("decode_tokens_per_s_median")

    def ratio(mode: str):
        return summary[mode]["decode_tokens_per_s_median"] / off if off and mode in summary else None

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    def gpu_ratio(mode: str):
        if mode not in per_mode or "off" not in per_mode:      # a --modes subset
            return None
        times = {m: [s["mean_gpu_forward_ms"] for s in per_mode[m] if s.get("mean_gpu_forward_ms")] for m in ("off", mode)}
        if not all(times.values()):
            return None
        return statistics.median(times["off"]) / statistics.median(times[mode])

    report = {
        "device": device, "model": config.name, "dtype": args.dtype, "num_layers": config.num_layers,
        "workload": {"num_requests": args.num_requests, "prompt_len": args.prompt_len,
                     "output_len": args.output_len, "ignore_eos": True},
        "cuda_graphs": args.cuda_graphs, "repetitions": args.repetitions,
        "ratio_gpu_vs_off": ratio("gpu"), "ratio_host_sync_vs_off": ratio("host-sync"),
        # Same ratios from the GPU time of the decode forward (CUDA events): free of host jitter.
        "gpu_time_ratio_gpu_vs_off": gpu_ratio("gpu"), "gpu_time_ratio_host_sync_vs_off": gpu_ratio("host-sync"),
        "modes": summary, "torch": torch.__version__,
    }
    if "gpu" in last_results and "host-sync" in last_results:
        report["identical_routing_gpu_vs_host_sync"] = compare_routing(last_results["gpu"], last_results["host-sync"])
    return report


def format_table(report: dict) -> str:
    rows = [f"device: {report['device']}  model: {report['model']} ({report['dtype']}, cuda_graphs={report['cuda_graphs']})  "
            f"workload: {report['workload']}",
            f"{'mode':>10} | {'decode tok/s (median)':>22} | {'ratio vs off':>12} | {'routing host ms/step':>20} | {'share of step':>13} | {'step ms':>8}"]
    off = report["modes"].get("off", {}).get("decode_tokens_per_s_median")
    for mode, s in report["modes"].items():
        r = s["decode_tokens_per_s_median"] / off if off else float("nan")
        rows.append(f"{mode:>10} | {s['decode_tokens_per_s_median']:>22,.0f} | {r:>12.4f} | "
                    f"{s['routing_host_ms_per_decode_step_median']:>20.4f} | "
                    f"{100 * s['routing_share_of_decode_step_median']:>12.3f}% | {s['mean_decode_step_ms_median']:>8.2f}")
    if "identical_routing_gpu_vs_host_sync" in report:
        rows.append(f"requests with identical tokens and routing, gpu vs host-sync: "
                    f"{100 * report['identical_routing_gpu_vs_host_sync']:.1f}%")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
