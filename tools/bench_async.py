#!/usr/bin/env python
"""Asynchronous vs synchronous scheduling, with each routing recorder, side by side: one
process, one model and workload, modes alternating within each repetition.

    python tools/bench_async.py --model olmoe-1b-7b-shape --output docs/bench/async_olmoe_1b_7b_shape_h200.json

Modes: {sync, async} x {off, gpu, host-sync}. Per mode (medians over repetitions): decode
tok/s, GPU idle share of decode steps (CUDA events around each step's whole GPU work,
against the GPU time between steps), routing host ms per decode step, and host syncs per
steady-state decode step (counted in a separate, untimed run with sync debug mode "warn").
Prints a table last; writes JSON with top-level ``device``, ``syncs_per_decode_step_gpu``,
``gpu_idle_share_gpu``, ``ratio_gpu_vs_off``, ``ratio_host_sync_vs_off`` (async mode) and
``speedup_async_vs_sync`` (recording off).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import torch

from inference.engine import LLMEngine
from inference.presets import build_model, get_preset, torch_dtype
from inference.request import SamplingParams
from inference.workload import synthetic_prompts
from routing_replay import step_kind
from tools.bench_routing import add_workload_args, decode_stats, engine_config, gpu_idle_share

RECORDERS = ("off", "gpu", "host-sync")
SCHEDULING = ("sync", "async")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(p)
    p.add_argument("--recorders", default=",".join(RECORDERS))
    p.add_argument("--sync-count-steps", type=int, default=16, help="decode steps watched for host syncs")
    return p.parse_args(argv)


def _engine(model, args, recorder: str, scheduling: str) -> LLMEngine:
    config = dataclasses.replace(engine_config(args, recorder), async_scheduling=scheduling == "async")
    return LLMEngine(model, config)


def _release(engine: LLMEngine) -> None:
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_mode(model, args, recorder: str, scheduling: str, prompts, params) -> dict:
    engine = _engine(model, args, recorder, scheduling)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = engine.generate([p.prompt_token_ids for p in prompts], params,
                              request_ids=[p.request_id for p in prompts])
    wall = time.perf_counter() - start
    entries = engine.step_log.entries
    stats = decode_stats(entries)
    stats.update(wall_s=wall, gpu_idle_share=gpu_idle_share(entries),
                 generated_tokens=sum(len(r.output_token_ids) for r in results),
                 tokens=[r.output_token_ids for r in results[:16]])
    _release(engine)
    return stats


def count_syncs(model, args, recorder: str, scheduling: str, prompts, params) -> float | None:
    """Host syncs per decode step over a steady-state decode stretch (untimed run; None on
    CPU, where there is nothing to count)."""
    engine = _engine(model, args, recorder, scheduling)
    syncs = decode_host_syncs(engine, prompts, params, args.sync_count_steps)
    _release(engine)
    return syncs


def decode_host_syncs(engine: LLMEngine, prompts, params, steps: int) -> float | None:
    """Serve ``prompts`` on ``engine`` and count host syncs per step (CUDA sync debug mode)
    over ``steps`` decode steps, starting two steps after the first decode step; None on
    CPU, where nothing is served. The requests are served to completion."""
    if engine.device.type != "cuda":
        return None
    for p in prompts:
        engine.add_request(p.prompt_token_ids, params, request_id=p.request_id)
    while engine.has_unfinished() and (not engine.step_log.entries
                                        or step_kind(engine.step_log.entries[-1]) != "decode"):
        engine.step()
    for _ in range(2):
        engine.step()
    counted = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            while counted < steps and engine.has_unfinished():
                engine.step()
                counted += 1
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    while engine.has_unfinished():
        engine.step()
    return syncs / max(counted, 1)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.cuda_graphs is None:
        args.cuda_graphs = args.device.startswith("cuda")
    recorders = [m.strip() for m in args.recorders.split(",") if m.strip()]
    modes = [(s, r) for r in recorders for s in SCHEDULING]
    config = get_preset(args.model)
    model = build_model(config, seed=args.seed, dtype=torch_dtype(args.dtype), device=args.device)
    prompts = synthetic_prompts(num_requests=args.num_requests, prompt_len=args.prompt_len,
                                vocab_size=config.vocab_size, seed=args.seed)
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    warm = argparse.Namespace(**{**vars(args), "num_requests": min(8, args.num_requests)})
    run_mode(model, warm, "gpu", "async", prompts[: warm.num_requests], params)   # Triton JIT, allocator
    per_mode: dict[tuple[str, str], list[dict]] = {m: [] for m in modes}
    for rep in range(args.repetitions):
        order = modes[rep % len(modes):] + modes[: rep % len(modes)]
        for mode in order:
            stats = run_mode(model, args, mode[1], mode[0], prompts, params)
            per_mode[mode].append(stats)
            idle = stats["gpu_idle_share"]
            print(f"rep {rep} {mode[0]:>5} {mode[1]:>9}: decode {stats['decode_tokens_per_s']:,.0f} tok/s, "
                  f"step {stats['mean_decode_step_ms']:.2f} ms, gpu idle "
                  f"{'-' if idle is None else f'{100 * idle:.2f}%'}, wall {stats['wall_s']:.1f}s", flush=True)
    syncs = {mode: count_syncs(model, args, mode[1], mode[0], prompts[:64], params) for mode in modes}
    report = build_report(args, config, modes, per_mode, syncs)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    print(format_table(report))
    return 0


def build_report(args, config, modes, per_mode, syncs) -> dict:
    def median(mode, key):
        values = [s[key] for s in per_mode[mode] if s.get(key) is not None]
        return statistics.median(values) if values else None

    summary = {f"{s}/{r}": {"decode_tokens_per_s_median": median((s, r), "decode_tokens_per_s"),
                            "mean_decode_step_ms_median": median((s, r), "mean_decode_step_ms"),
                            "gpu_idle_share_median": median((s, r), "gpu_idle_share"),
                            "routing_host_ms_per_decode_step_median": median((s, r), "routing_host_ms_per_decode_step"),
                            "syncs_per_decode_step": syncs[(s, r)],
                            "repetitions": [{k: v for k, v in st.items() if k != "tokens"} for st in per_mode[(s, r)]]}
               for s, r in modes}

    def tps(key):
        return summary.get(key, {}).get("decode_tokens_per_s_median")

    def ratio(a, b):
        return tps(a) / tps(b) if tps(a) and tps(b) else None

    same_tokens = all(per_mode[m][-1]["tokens"] == per_mode[modes[0]][-1]["tokens"] for m in modes)
    return {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "model": config.name, "dtype": args.dtype, "cuda_graphs": args.cuda_graphs,
        "workload": {"num_requests": args.num_requests, "prompt_len": args.prompt_len,
                     "output_len": args.output_len, "ignore_eos": True},
        "repetitions": args.repetitions,
        "syncs_per_decode_step_gpu": summary.get("async/gpu", {}).get("syncs_per_decode_step"),
        "gpu_idle_share_gpu": summary.get("async/gpu", {}).get("gpu_idle_share_median"),
        "ratio_gpu_vs_off": ratio("async/gpu", "async/off"),
        "ratio_host_sync_vs_off": ratio("async/host-sync", "async/off"),
        "speedup_async_vs_sync": ratio("async/off", "sync/off"),
        "identical_tokens_across_modes": same_tokens,
        "modes": summary, "torch": torch.__version__,
    }


def format_table(report: dict) -> str:
    rows = [f"device: {report['device']}  model: {report['model']} ({report['dtype']}, cuda_graphs="
            f"{report['cuda_graphs']})  workload: {report['workload']}",
            f"{'mode':>16} | {'decode tok/s':>12} | {'step ms':>8} | {'GPU idle':>8} | {'syncs/step':>10} | "
            f"{'routing host ms':>15}"]
    for name, s in report["modes"].items():
        idle, syncs = s["gpu_idle_share_median"], s["syncs_per_decode_step"]
        rows.append(f"{name:>16} | {s['decode_tokens_per_s_median']:>12,.0f} | {s['mean_decode_step_ms_median']:>8.2f} | "
                    f"{'-' if idle is None else f'{100 * idle:.2f}%':>8} | {'-' if syncs is None else f'{syncs:.2f}':>10} | "
                    f"{s['routing_host_ms_per_decode_step_median']:>15.4f}")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    rows.append(f"async: gpu/off {fmt(report['ratio_gpu_vs_off'])}, host-sync/off {fmt(report['ratio_host_sync_vs_off'])}; "
                f"off: async/sync {fmt(report['speedup_async_vs_sync'])}; identical tokens across modes: "
                f"{report['identical_tokens_across_modes']}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
