"""Serving a run's requests with progress, writing its files and the end-of-run summary."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

from inference.engine import LLMEngine
from inference.progress import ProgressBar
from inference.request import RequestResult
from inference.run_outputs import merge_rank_outputs, write_run_outputs
from inference.workload import PromptSpec
from tools.run_setup import DistributedContext

log = logging.getLogger("run_inference")


def serve_and_report(engine: LLMEngine, args: argparse.Namespace, dist: DistributedContext,
                     specs: Sequence[PromptSpec], my_specs: Sequence[PromptSpec],
                     params_for: Callable) -> int:
    index_of = {s.request_id: i for i, s in enumerate(specs)}
    progress = ProgressBar(len(my_specs), enabled=args.progress if dist.is_main else False)

    def on_result(result: RequestResult) -> None:
        progress.update(requests=1, tokens=len(result.output_token_ids))
        if result.finish_reason == "error":
            log.warning("%s", result.error)

    start = time.perf_counter()
    results = engine.generate([s.prompt_token_ids for s in my_specs],
                              [params_for(args, s, index_of[s.request_id]) for s in my_specs],
                              request_ids=[s.request_id for s in my_specs], on_result=on_result,
                              routing_starts=[s.routing_start for s in my_specs])
    wall = time.perf_counter() - start
    progress.close()
    files: list[Path] = []
    if args.output_dir:
        out = Path(args.output_dir)
        extra = {"rank": dist.rank, "world_size": dist.world_size, "workload": _workload_meta(args, len(specs))}
        shard = out / f"rank{dist.rank}" if dist.world_size > 1 else out
        files = write_run_outputs(shard, results, engine, extra)
        dist.barrier()
        if dist.world_size > 1 and dist.is_main:
            files = merge_rank_outputs(out, dist.world_size, [s.request_id for s in specs])
    if dist.is_main:
        print(summarize(engine, results, wall, files, dist.world_size))
    dist.barrier()
    return 0


def _workload_meta(args: argparse.Namespace, num_requests: int) -> dict:
    if args.prompts_file:
        return {"prompts_file": str(args.prompts_file), "num_requests": num_requests}
    return {"num_requests": num_requests, "prompt_len": args.prompt_len, "output_len": args.output_len,
            "shared_prefix_len": args.shared_prefix_len}


def summarize(engine: LLMEngine, results: Sequence[RequestResult], wall_s: float,
              files: Sequence[Path], world_size: int) -> str:
    """End-of-run summary of this rank's work (and where the merged files went)."""
    ok = [r for r in results if r.finish_reason != "error"]
    prompt_tokens = sum(len(r.prompt_token_ids) for r in ok)
    gen_tokens = sum(len(r.output_token_ids) for r in ok)
    summary = engine.step_log.summary()
    lines = [
        "run summary" + (f" (rank 0 of {world_size}; files merged over all ranks)" if world_size > 1 else ""),
        f"  requests        {len(ok)} finished, {len(results) - len(ok)} failed",
        f"  tokens          {prompt_tokens} prompt, {gen_tokens} generated, "
        f"{sum(r.num_cached_tokens for r in ok)} prompt tokens from prefix cache",
        f"  wall time       {wall_s:.2f} s over {summary.get('num_steps', 0)} steps",
        f"  throughput      {gen_tokens / max(wall_s, 1e-9):,.1f} generated tok/s, "
        f"{(prompt_tokens + gen_tokens) / max(wall_s, 1e-9):,.1f} total tok/s",
    ]
    if engine.recorder is not None:
        share = summary.get("routing_share", 0.0) or 0.0
        lines.append(f"  routing         recorded for {sum(r.routing is not None for r in ok)} requests; "
                     f"recorder host time {100 * share:.2f}% of step time")
    preempted = sum(r.num_preemptions for r in ok)
    if preempted:
        lines.append(f"  preemptions     {preempted}")
    if files:
        lines.append(f"  files           {', '.join(str(f) for f in files)}")
    return "\n".join(lines)
