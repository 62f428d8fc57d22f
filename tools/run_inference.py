#!/usr/bin/env python
"""Generate rollouts with the MoE inference engine, optionally recording routing.

    torchrun --nproc-per-node 1 tools/run_inference.py --record-routing --output-dir OUT

Plain ``python tools/run_inference.py ...`` works too. With more than one torchrun process
each rank serves its share of the requests (data parallel) and rank 0 merges the outputs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from inference.config import DTYPES, EngineConfig
from inference.presets import DEFAULT_PRESET, PRESETS
from inference.workload import PromptsFileError
from tools.run_report import serve_and_report
from tools.run_setup import (build_engine, describe_memory_plan, distributed_context, load_prompts,
                             model_source, parse_memory_size, sampling_params_for)

log = logging.getLogger("run_inference")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_inference.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_PRESET, choices=list(PRESETS),
                   help="built-in preset (random seeded weights; *-shape presets copy real models' shapes)")
    g.add_argument("--hf-checkpoint", metavar="DIR", help="local HF checkpoint (config.json + safetensors) instead of a preset")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weights/KV dtype (default: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--seed", type=int, default=0, help="seed for weights, synthetic prompts and sampling")
    g = p.add_argument_group("workload (a prompts file, or a synthetic workload)")
    g.add_argument("--prompts-file", metavar="JSONL", help='one JSON object per line: {"id": ..., "prompt_token_ids": [...]} or {"id": ..., "prompt": "text"} '
                        '(text needs --hf-checkpoint with a tokenizer); optional "max_new_tokens", "routing_start"')
    g.add_argument("--num-requests", type=int, default=8, help="synthetic: number of requests")
    g.add_argument("--prompt-len", type=int, default=32, help="synthetic: prompt tokens per request")
    g.add_argument("--output-len", type=int, default=32, help="synthetic: tokens to generate per request")
    g.add_argument("--shared-prefix-len", type=int, default=0, help="synthetic: leading tokens common to all prompts (prefix reuse)")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=None, help="generation limit per request (default: --output-len)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = disabled")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = disabled")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS (benchmarks)")
    g = p.add_argument_group("engine")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="usable KV blocks (default 1024, or from --kv-cache-memory)")
    g.add_argument("--kv-cache-memory", metavar="SIZE", help="KV cache size instead of --num-kv-blocks, e.g. 512MiB, 8GiB")
    g.add_argument("--max-requests", type=int, default=64, help="requests running at once")
    g.add_argument("--max-step-tokens", type=int, default=512, help="token budget per step (decodes + prefill chunks)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse KV (and routing) of identical full-block prefixes")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA-graph decode (default: on when running on CUDA)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule and prepare step N+1 while the GPU runs step N; sampled tokens reach the next "
                        "step on the device (default: on when running on CUDA)")
    g = p.add_argument_group("routing recording")
    g.add_argument("--record-routing", action="store_true",
                   help="record every token's top-k experts per MoE layer (routing.npz, routing_meta.json)")
    g = p.add_argument_group("output and logging")
    g.add_argument("--output-dir", metavar="DIR", help="write results.jsonl, step_details.json (and routing files) here")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: on when stderr is a terminal)")
    g.add_argument("--dry-run", action="store_true", help="validate the configuration, print the memory plan, generate nothing")
    return p


def engine_config_from_args(args: argparse.Namespace, model_config, device: torch.device) -> EngineConfig:
    num_blocks = args.num_kv_blocks
    if args.kv_cache_memory:
        from inference.kv_cache import KVCache
        from inference.presets import torch_dtype
        per_block = KVCache.bytes_per_block(model_config, args.block_size, torch_dtype(args.dtype))
        num_blocks = parse_memory_size(args.kv_cache_memory) // per_block
        if num_blocks < 1:
            raise ValueError(f"--kv-cache-memory {args.kv_cache_memory} holds no block of {per_block} bytes")
    cuda_graphs = device.type == "cuda" if args.cuda_graphs is None else args.cuda_graphs
    if cuda_graphs and device.type != "cuda":
        raise ValueError("--cuda-graphs needs a CUDA device (use --no-cuda-graphs on CPU)")
    return EngineConfig(block_size=args.block_size, num_kv_blocks=num_blocks or 1024, max_requests=args.max_requests,
                        max_step_tokens=args.max_step_tokens, enable_prefix_caching=args.enable_prefix_caching,
                        record_routing=args.record_routing, cuda_graphs=cuda_graphs, dtype=args.dtype,
                        device=str(device), seed=args.seed, async_scheduling=args.async_scheduling)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("num_requests", "prompt_len", "output_len", "block_size", "max_requests", "max_step_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("num_kv_blocks", "max_new_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.shared_prefix_len < 0 or args.shared_prefix_len > args.prompt_len:
        parser.error(f"--shared-prefix-len must be in [0, --prompt-len={args.prompt_len}], got {args.shared_prefix_len}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        parser.error(f"--top-k must be >= 0 (0 = disabled), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.num_kv_blocks is not None and args.kv_cache_memory:
        parser.error("give --num-kv-blocks or --kv-cache-memory, not both")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    dist = distributed_context(args.device)
    if args.dtype is None:
        args.dtype = "bfloat16" if dist.device.type == "cuda" else "float32"
    try:
        model_config, model_loader = model_source(args)
        engine_config = engine_config_from_args(args, model_config, dist.device)
        specs = load_prompts(args, model_config)
    except (ValueError, PromptsFileError, FileNotFoundError) as exc:
        parser.error(str(exc))
    if args.dry_run:
        print(describe_memory_plan(model_config, engine_config, num_requests=len(specs)))
        return 0
    my_specs = specs[dist.rank::dist.world_size]
    try:
        engine = build_engine(model_loader, engine_config, dist.device)
    except ValueError as exc:
        parser.error(str(exc))
    return serve_and_report(engine, args, dist, specs, my_specs, sampling_params_for)


if __name__ == "__main__":
    sys.exit(main())
