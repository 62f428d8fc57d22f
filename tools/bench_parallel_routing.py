#!/usr/bin/env python
"""Routing-recording overhead under a tensor / expert parallel layout (issue 13): one
replica over torchrun's ranks, recording ``off`` / ``gpu`` / ``host-sync`` in alternating
repetitions, as ``tools/bench_routing.py`` does on one process.

    python tools/bench_parallel_routing.py --model qwen3-30b-a3b-shape --output single.json
    torchrun --nproc-per-node 2 tools/bench_parallel_routing.py --model qwen3-30b-a3b-shape \\
        --tensor-parallel-size 2 --expert-parallel-size 2 --reference single.json \\
        --output docs/bench/parallel_qwen3_30b_a3b_shape_tp2_ep2_h200.json

Every rank serves the same requests (the replica's one schedule); the leader (rank 0)
measures from its step log and writes the report: top-level ``device``, ``world_size``,
``tensor_parallel_size``, ``expert_parallel_size``, ``ratio_gpu_vs_off``,
``ratio_host_sync_vs_off``, host syncs per decode step with recording on (CUDA sync debug
mode; None on CPU), the GPU idle share of decode steps, and per-request digests of tokens
and routing. With ``--reference`` (a report of the same workload, typically the single-GPU
run) it adds ``identical_to_single_gpu`` (share of requests whose tokens and routing equal
the reference's) and ``scaling_vs_reference`` (decode tok/s with recording on over the
reference's).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import orjson
import torch

from inference.engine import LLMEngine
from inference.parallel import ParallelGroups
from inference.presets import build_model, get_preset, torch_dtype
from inference.request import SamplingParams
from inference.workload import synthetic_prompts
from tools.bench_async import decode_host_syncs
from tools.bench_routing import MODES, add_workload_args, build_report, engine_config, run_mode
from tools.run_setup import distributed_context, parallel_layout


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(p)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--expert-parallel-size", type=int, default=1)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--sync-count-steps", type=int, default=8, help="decode steps watched in CUDA sync debug mode")
    p.add_argument("--reference", type=Path, default=None, help="a report of the same workload to compare with")
    return p.parse_args(argv)


def request_digest(tokens: list[int], routing: np.ndarray | None) -> str:
    """Tokens and routing ids of one request, hashed (dtype-independent: ids as int64)."""
    h = hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes())
    if routing is not None:
        h.update(np.ascontiguousarray(routing, dtype=np.int64).tobytes())
    return h.hexdigest()


def identical_share(digests: dict[str, str], reference: dict[str, str]) -> float | None:
    """Share of this run's requests whose digest equals the reference's (None without overlap)."""
    common = [r for r in digests if r in reference]
    if not common:
        return None
    return sum(digests[r] == reference[r] for r in common) / len(digests)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}, but CUDA is not available (use --device cpu)", file=sys.stderr)
        return 2
    ctx = distributed_context(args.device)
    args.device = str(ctx.device)
    args.dtype = args.dtype or ("bfloat16" if ctx.device.type == "cuda" else "float32")
    if args.cuda_graphs is None:
        args.cuda_graphs = ctx.device.type == "cuda"
    tp, ep = args.tensor_parallel_size, args.expert_parallel_size
    if ctx.world_size != tp:
        print(f"error: one replica: the world ({ctx.world_size} ranks) must equal --tensor-parallel-size {tp}",
              file=sys.stderr)
        return 2
    config = get_preset(args.model)
    groups = None
    if ctx.world_size > 1:
        groups = ParallelGroups.build(parallel_layout(ctx.world_size, tp, ep, config))
    model = build_model(config, seed=args.seed, dtype=torch_dtype(args.dtype), device=ctx.device, parallel=groups)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    prompts = synthetic_prompts(num_requests=args.num_requests, prompt_len=args.prompt_len,
                                vocab_size=config.vocab_size, seed=args.seed)
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    warm = argparse.Namespace(**{**vars(args), "num_requests": min(8, args.num_requests)})
    run_mode(model, "gpu", warm, prompts[: warm.num_requests], params)   # compiles, allocator growth
    per_mode: dict[str, list[dict]] = {m: [] for m in modes}
    last: dict[str, list] = {}
    for rep in range(args.repetitions):
        for mode in modes[rep % len(modes):] + modes[: rep % len(modes)]:
            stats, results = run_mode(model, mode, args, prompts, params)
            per_mode[mode].append(stats)
            last[mode] = results
            if ctx.rank == 0:
                print(f"rep {rep} {mode:>9}: decode {stats['decode_tokens_per_s']:,.0f} tok/s", flush=True)
    syncs = None
    if "gpu" in modes:   # every rank steps the replica's engine; CUDA only (None on CPU)
        syncs = decode_host_syncs(LLMEngine(model, engine_config(args, "gpu")), prompts[: min(8, len(prompts))],
                                  params, args.sync_count_steps)
    if ctx.rank != 0:
        return 0
    report = build_report(args, config, modes, per_mode, last)
    report = parallel_report(report, args, ctx.world_size, syncs, last)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    print(format_summary(report))
    return 0


def parallel_report(report: dict, args, world_size: int, syncs: float | None, last: dict[str, list]) -> dict:
    """``bench_routing``'s report with the layout, sync and idle figures, digests and the
    comparison with ``--reference``."""
    recorded = last.get("gpu") or last.get("host-sync") or next(iter(last.values()))
    digests = {r.request_id: request_digest(r.output_token_ids, r.routing) for r in recorded}
    idle = [s.get("gpu_idle_share") for s in report["modes"].get("gpu", {}).get("repetitions", [])]
    report = {"world_size": world_size, "tensor_parallel_size": args.tensor_parallel_size,
              "expert_parallel_size": args.expert_parallel_size, **report,
              "host_syncs_per_decode_step_recording": syncs,
              "gpu_idle_share_recording": statistics.median(idle) if idle and None not in idle else None,
              "request_digests": digests}
    if args.reference is not None:
        ref = orjson.loads(args.reference.read_bytes())
        report["reference"] = str(args.reference)
        report["identical_to_single_gpu"] = identical_share(digests, ref.get("request_digests", {}))
        mine, theirs = (r["modes"].get("gpu", {}).get("decode_tokens_per_s_median") for r in (report, ref))
        report["scaling_vs_reference"] = mine / theirs if mine and theirs else None
    return report


def format_summary(report: dict) -> str:
    from tools.bench_routing import format_table
    f = lambda v, spec: "-" if v is None else format(v, spec)
    return (format_table(report) + f"\nlayout: world {report['world_size']}, tp {report['tensor_parallel_size']}, "
            f"ep {report['expert_parallel_size']}; host syncs per decode step (recording): "
            f"{f(report['host_syncs_per_decode_step_recording'], '.2f')}; GPU idle share (recording): "
            f"{f(report['gpu_idle_share_recording'], '.4f')}; identical to reference: "
            f"{f(report.get('identical_to_single_gpu'), '.3f')}; scaling vs reference: "
            f"{f(report.get('scaling_vs_reference'), '.3f')}")


if __name__ == "__main__":
    sys.exit(main())
