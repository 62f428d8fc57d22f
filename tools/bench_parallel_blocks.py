#!/usr/bin/env python
"""Per-block cost of tensor / expert parallelism at decode and prefill token counts.

For each layout ``tp:ep`` (world = dp x tp, dp replicas run side by side), one MoE layer of
a preset's shape is built from random shards on every rank and timed block by block: the
TP all-reduce alone, the attention projections (column-parallel qkv, row-parallel output,
one all-reduce; the attention core is left out: it is per-head local), the MoE block
(replicated router, this rank's experts, one all-reduce; GPT-OSS experts included), the
routing capture (the
staging copies of every MoE layer and the block scatter, what ``routing_on="all"`` adds
to each non-leader rank) and the vocabulary-parallel logits (all-gather). CUDA: eager and
CUDA-graph replay (NCCL inside the graph), CUDA-event medians. CPU (gloo): eager only, a
smoke run. Rank 0 prints the table last and writes JSON.

    torchrun --nproc-per-node 4 tools/bench_parallel_blocks.py --model qwen3-30b-a3b-shape \\
        --layouts 1:1,2:1,2:2,4:1,4:2,4:4 --output docs/bench/parallel_blocks.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import torch
import torch.distributed as dist

from inference.config import ModelConfig
from inference.kernels.moe_grouped import moe_experts_grouped
from inference.parallel import ExpertParallelMoE, ParallelGroups, ParallelLayout, ParallelLMHead, attention_shard
from inference.parallel.layout import replicates_blocks
from inference.presets import PRESETS, get_preset, torch_dtype

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen3-30b-a3b-shape", choices=list(PRESETS))
    p.add_argument("--layouts", default="1:1,2:1,2:2", help="comma-separated tp:ep pairs (tp must divide the world)")
    p.add_argument("--tokens", default="1,8,64,256,1024", help="token counts per step")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True, help="also time CUDA-graph replay")
    p.add_argument("--output")
    return p.parse_args(argv)


def init_distributed() -> torch.device:
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if world == 1:
            dist.init_process_group("gloo" if not cuda else "nccl", store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group("nccl" if cuda else "gloo")
    return device


@torch.no_grad()
def random_(module: torch.nn.Module, seed: int) -> None:
    """Seeded 1/sqrt(fan_in) weights; the router's seed is shared so routing is replicated."""
    for name, p in module.named_parameters():
        gen = torch.Generator(device=p.device).manual_seed(0 if "router" in name else seed)
        p.copy_(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype).mul_(p.shape[-1] ** -0.5))


def time_fn(fn: Callable[[], object], iters: int, device: torch.device, graph: bool) -> float:
    """Median milliseconds of ``fn`` (eager, or replaying one CUDA graph of it)."""
    for _ in range(3):
        fn()
    run = fn
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()                                # warm up on the capture stream (NCCL communicator too)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            dist.barrier()
            t = time.perf_counter()
            run()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def build_modules(config: ModelConfig, groups: ParallelGroups, dtype: torch.dtype, device: torch.device) -> dict:
    """This rank's shards of one MoE layer's blocks and the vocabulary head, random weights."""
    kw = dict(dtype=dtype, device=device)
    attn = attention_shard(config, groups.layout, groups.tp, **kw)
    moe = ExpertParallelMoE(config, groups, **kw)
    head = ParallelLMHead(config.vocab_size, config.hidden_size, groups.tp, **kw)
    for m in (*attn.modules.values(), moe, head):
        random_(m, seed=1 + groups.coords.rank)
    if device.type == "cuda":
        moe.experts_fn = moe_experts_grouped       # sync-free: graph-capturable
    return {"attn": attn, "moe": moe, "head": head}


def block_calls(config: ModelConfig, groups: ParallelGroups, modules: dict, tokens: int) -> dict[str, Callable]:
    """One callable per block on static inputs of ``tokens`` rows (graph-capturable)."""
    attn, moe, head = modules["attn"], modules["moe"], modules["head"]
    device, dtype = head.weight.device, head.weight.dtype
    gen = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(tokens, config.hidden_size, generator=gen, device=device, dtype=dtype)
    buf = torch.zeros_like(x)                    # zeros: repeated in-place sums stay finite
    staging = torch.zeros(tokens, config.num_moe_layers, config.topk, dtype=torch.uint8, device=device)
    block_routing = torch.zeros(tokens + 1, config.num_moe_layers, config.topk, dtype=torch.uint8, device=device)
    ids = torch.randint(0, config.num_experts, (tokens, config.topk), generator=gen, device=device)
    rows = torch.arange(tokens, device=device)

    def capture() -> None:
        for j in range(config.num_moe_layers):
            staging[:, j].copy_(ids)
        block_routing.index_put_((rows,), staging)

    calls = {"all_reduce": lambda: groups.tp.all_reduce(buf), "moe": lambda: moe(x),
             "routing_capture": capture, "logits": lambda: head(x)}
    if "qkv_proj" in attn.modules:              # grouped-query attention (MLA: not timed here)
        qkv, o_proj = attn.modules["qkv_proj"], attn.modules["o_proj"]
        calls["attn_proj"] = lambda: o_proj(qkv(x)[:, :qkv.q_size])
    return calls


@torch.no_grad()
def run_layout(config: ModelConfig, tp: int, ep: int, args, dtype: torch.dtype, device: torch.device) -> list[dict]:
    layout = ParallelLayout(dist.get_world_size(), tp, ep)
    layout.validate_model(config)
    if replicates_blocks(config):     # its attention is replicated: the head-sharded blocks timed here are not its
        raise SystemExit(f"{config.name}: hybrid models split only their MoE layers; this benchmark times the "
                         "head-sharded blocks of the other models")
    groups = ParallelGroups.build(layout)
    modules = build_modules(config, groups, dtype, device)
    rows = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        for block, fn in block_calls(config, groups, modules, tokens).items():
            row = {"tp": tp, "ep": ep, "dp": layout.dp, "tokens": tokens, "block": block,
                   "eager_ms": time_fn(fn, args.iters, device, graph=False)}
            if args.graphs and device.type == "cuda":
                row["graph_ms"] = time_fn(fn, args.iters, device, graph=True)
            rows.append(row)
    del modules
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'tp':>3} {'ep':>3} {'dp':>3} {'tokens':>6} {'block':<16} {'eager ms':>9} {'graph ms':>9}"]
    for r in rows:
        graph = f"{r['graph_ms']:9.3f}" if "graph_ms" in r else f"{'-':>9}"
        lines.append(f"{r['tp']:>3} {r['ep']:>3} {r['dp']:>3} {r['tokens']:>6} {r['block']:<16} "
                     f"{r['eager_ms']:9.3f} {graph}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = init_distributed()
    config = get_preset(args.model)
    dtype = torch_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    rows = []
    for pair in args.layouts.split(","):
        tp, ep = (int(v) for v in pair.split(":"))
        rows += run_layout(config, tp, ep, args, dtype, device)
    if dist.get_rank() == 0:
        meta = {"model": config.name, "world_size": dist.get_world_size(), "dtype": str(dtype), "device": str(device),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "rows": rows}
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
        print(f"{config.name}, world {dist.get_world_size()}, {dtype}, {device.type}: per-rank median ms")
        print(table(rows))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
