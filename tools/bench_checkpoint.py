#!/usr/bin/env python
"""Checkpointing overhead: decode step time with run checkpoints off and on, side by side
(one process, one model, one workload, alternating repetitions), routing recorded in all.

    python tools/bench_checkpoint.py                      # CUDA: OLMoE-1B-7B shape, 256 requests
    python tools/bench_checkpoint.py --device cpu         # CPU: tiny-moe, small workload

Requests get staggered output lengths so they finish throughout decoding and checkpoints
overlap decode steps (with equal lengths they would all land after the last step). Modes:
``off`` (no writer), ``default`` (the CLI's checkpoint policy) and ``every-1`` (a shard per
finished request, the worst case). The target: ``default`` within 0.5% of ``off`` in mean
decode step time. Prints a table last and writes docs/bench/checkpoint_<model>_<gpu>.json.
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.presets import PRESETS, build_model, get_preset, torch_dtype
from inference.request import SamplingParams
from inference.run_outputs import routing_meta_for
from inference.run_writer import CheckpointPolicy, CheckpointWriter
from inference.workload import synthetic_prompts
from tools.bench_routing import decode_stats
from tools.serve_loop import serve_requests

MODES = {"off": None, "default": CheckpointPolicy(), "every-1": CheckpointPolicy(every_requests=1)}
TARGET = 0.005
ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="exit status: 0 measured; 2 usage error (nothing measured)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--model", default=None, choices=list(PRESETS), help="default: olmoe-1b-7b-shape on CUDA, tiny-moe on CPU")
    p.add_argument("--num-requests", type=int, default=None, help="default: 256 on CUDA, 32 on CPU")
    p.add_argument("--max-requests", type=int, default=None, help="running at once (default: all on CUDA, 8 on CPU)")
    p.add_argument("--prompt-len", type=int, default=None, help="default: 512 on CUDA, 16 on CPU")
    p.add_argument("--output-len", type=int, default=None, help="longest output (default: 256 on CUDA, 32 on CPU)")
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--output", help="JSON file (default: docs/bench/checkpoint_<model>_<gpu>.json)")
    args = p.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    for name, gpu, cpu in (("model", "olmoe-1b-7b-shape", "tiny-moe"), ("num_requests", 256, 32),
                           ("prompt_len", 512, 16), ("output_len", 256, 32), ("dtype", "bfloat16", "float32")):
        if getattr(args, name) is None:
            setattr(args, name, gpu if on_cuda else cpu)
    args.max_requests = args.max_requests or (args.num_requests if on_cuda else 8)
    unknown = [m for m in args.modes.split(",") if m not in MODES]
    if unknown or args.repetitions < 1 or args.num_requests < 1:
        p.error(f"--modes must be a subset of {','.join(MODES)}; --repetitions, --num-requests >= 1")
    if on_cuda and not torch.cuda.is_available():
        p.error(f"--device {args.device}, but CUDA is not available (use --device cpu)")
    return args


def run_mode(model, mode: str, args, prompts, params, workdir: Path) -> dict:
    blocks = args.max_requests * -(-(args.prompt_len + args.output_len) // 16) + 8
    config = EngineConfig(block_size=16, num_kv_blocks=blocks, max_requests=args.max_requests, max_step_tokens=8192,
                          enable_prefix_caching=False, record_routing=True, cuda_graphs=args.device.startswith("cuda"),
                          cuda_graph_max_batch=args.max_requests, dtype=args.dtype, device=args.device)
    engine = LLMEngine(model, config)
    policy = MODES[mode]
    writer = (CheckpointWriter(workdir / f"{mode}-{time.monotonic_ns()}", attempt=1, rank=0, policy=policy,
                               routing_meta=routing_meta_for(engine.model_config, 16)) if policy else None)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    stats = serve_requests(engine, prompts, lambda spec: params[spec.request_id],
                           writer.submit if writer else (lambda result: None), lambda: False)
    if writer is not None:
        writer.close()
    wall = time.perf_counter() - start
    out = decode_stats(engine.step_log.entries)
    out.update(wall_s=wall, generated_tokens=stats.output_tokens, finished=stats.finished,
               committed=writer.num_committed if writer else 0)
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def build_report(args, per_mode: dict[str, list[dict]], device: str) -> dict:
    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in per_mode[mode])

    summary = {m: {"mean_decode_step_ms_median": median(m, "mean_decode_step_ms"),
                   "decode_tokens_per_s_median": median(m, "decode_tokens_per_s"),
                   "wall_s_median": median(m, "wall_s"), "repetitions": runs} for m, runs in per_mode.items()}
    off = summary.get("off", {}).get("mean_decode_step_ms_median")
    for mode, s in summary.items():
        s["step_time_vs_off"] = (s["mean_decode_step_ms_median"] / off - 1.0) if off else None
    default = summary.get("default", {}).get("step_time_vs_off")
    return {"device": device, "model": args.model, "dtype": args.dtype, "torch": torch.__version__,
            "workload": {"num_requests": args.num_requests, "max_requests": args.max_requests,
                         "prompt_len": args.prompt_len, "output_len_max": args.output_len, "staggered": True},
            "default_policy": {"every_requests": CheckpointPolicy().every_requests,
                               "every_seconds": CheckpointPolicy().every_seconds},
            "target_step_time_increase": TARGET, "default_within_target": None if default is None else default < TARGET,
            "modes": summary}


def format_table(report: dict) -> str:
    rows = [f"device: {report['device']}  model: {report['model']} ({report['dtype']})  workload: {report['workload']}",
            f"{'mode':>8} | {'decode step ms (median)':>23} | {'vs off':>8} | {'decode tok/s':>12} | {'committed':>9}"]
    for mode, s in report["modes"].items():
        delta = s["step_time_vs_off"]
        committed = s["repetitions"][-1]["committed"]
        rows.append(f"{mode:>8} | {s['mean_decode_step_ms_median']:>23.4f} | "
                    f"{'' if delta is None else f'{100 * delta:+.2f}%':>8} | {s['decode_tokens_per_s_median']:>12,.0f} | "
                    f"{committed:>9}")
    if report["default_within_target"] is not None:
        rows.append(f"default checkpointing within {100 * TARGET:.1f}% of off: "
                    f"{'yes' if report['default_within_target'] else 'NO'}")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = get_preset(args.model)
    model = build_model(config, seed=0, dtype=torch_dtype(args.dtype), device=args.device)
    prompts = synthetic_prompts(num_requests=args.num_requests, prompt_len=args.prompt_len,
                                vocab_size=config.vocab_size, seed=0)
    half = max(1, args.output_len // 2)
    params = {p.request_id: SamplingParams(max_new_tokens=half + (i * (args.output_len - half)) // args.num_requests,
                                           ignore_eos=True) for i, p in enumerate(prompts)}
    modes = args.modes.split(",")
    per_mode: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint-") as tmp:
        run_mode(model, modes[0], argparse.Namespace(**{**vars(args), "output_len": 4}), prompts[:4],
                 params, Path(tmp))   # warm-up: kernels, allocator, graph capture paths
        for rep in range(args.repetitions):
            for mode in (modes if rep % 2 == 0 else modes[::-1]):
                per_mode[mode].append(run_mode(model, mode, args, prompts, params, Path(tmp)))
                print(f"rep {rep} {mode}: {per_mode[mode][-1]['mean_decode_step_ms']:.4f} ms/decode step",
                      file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report = build_report(args, per_mode, device)
    slug = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
    output = Path(args.output) if args.output else ROOT / "docs" / "bench" / f"checkpoint_{args.model}_{slug}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
