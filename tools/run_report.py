"""Serving a run's requests with checkpoints, finishing its directory (consolidation on
completion, a resumable state on interruption), the end-of-run summary and the exit code.

Exit codes (also in ``run_inference.py --help`` and the README):
  0    every request finished
  1    the run stopped on an error after work began (e.g. a checkpoint could not be
       written); everything checkpointed before it is valid: fix the cause, then --resume
  2    usage or configuration error, found before any work
  3    every request was served but some failed (finish_reason "error"); all else written
  130  interrupted by SIGINT, 143 by SIGTERM: valid partial output, continue with --resume
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from inference.engine import LLMEngine
from inference.progress import ProgressBar
from inference.request import RequestResult, SamplingParams
from inference.run_outputs import consolidate_run, routing_meta_for, run_meta, write_step_details
from inference.run_writer import CheckpointError, CheckpointPolicy, CheckpointWriter
from inference.stop_strings import cut_at_stop
from inference.workload import PromptSpec
from routing_replay.outputs import load_results
from routing_replay.run_dir_schema import STEP_DETAILS_FILE
from tools.interrupts import InterruptGuard
from tools.output_dir import finish_complete_run, set_status
from tools.run_setup import DistributedContext
from tools.serve_loop import ServeStats, serve_requests

log = logging.getLogger("run_inference")

EXIT_OK, EXIT_RUNTIME_ERROR, EXIT_USAGE, EXIT_SOME_FAILED = 0, 1, 2, 3


@dataclass(frozen=True)
class RunPlan:
    """One replica's share of a run (every rank of a tensor-parallel replica holds the same).
    Invariant: ``my_specs`` is ``inference.workload.replica_share(remaining, dp_rank,
    dp_size)`` (``remaining[dp_rank::dp_size]`` without RL groups; a group stays on one
    replica) where ``remaining`` are the workload's specs minus the ``num_done`` already on
    disk."""

    specs: Sequence[PromptSpec]           # the whole workload, input order
    my_specs: Sequence[PromptSpec]
    num_done: int
    attempt: int
    out_dir: Path | None
    output_text: Callable[[list[int]], str] | None = None   # --output-text: generated tokens -> text
    include_stop_str_in_output: bool = False   # output_text keeps the stop string that ended a request


def serve_and_report(engine: LLMEngine, args: argparse.Namespace, dist: DistributedContext, plan: RunPlan,
                     params_for: Callable[[PromptSpec], SamplingParams], guard: InterruptGuard) -> int:
    """Serve this rank's requests, finish the directory, print the summary; the exit code."""
    writer = _open_writer(engine, args, dist, plan)
    single = dist.dp_size == 1
    total = len(plan.my_specs) + (plan.num_done if single else 0)
    progress = ProgressBar(total, enabled=args.progress if dist.is_main else False,
                           done_before=plan.num_done if single else 0)
    sink = writer.submit if writer is not None else (lambda result: None)
    start = time.perf_counter()
    try:
        stats = serve_requests(engine, plan.my_specs, params_for, sink, _stop_condition(engine, guard), progress,
                               done_before=plan.num_done if single else 0)
        if writer is not None:
            writer.close()
    except CheckpointError as exc:
        progress.close()
        log.error("%s", exc)
        committed = writer.num_committed if writer is not None else 0
        log.error("%d requests of this attempt are safely on disk in %s; fix the cause and run the same "
                  "command with --resume to serve the rest", committed, plan.out_dir)
        return EXIT_RUNTIME_ERROR
    except BaseException:
        if writer is not None:   # an unexpected error: still commit every request that finished
            _close_quietly(writer)
        raise
    progress.close()
    wall = time.perf_counter() - start
    try:
        files = _finish_directory(engine, args, dist, plan, stats, interrupted=guard.requested)
    except OSError as exc:   # e.g. the disk filled up while consolidating: the shards are intact
        log.error("cannot finish %s (%s); every checkpoint in it is valid: fix the cause and run the same "
                  "command with --resume", plan.out_dir, exc)
        return EXIT_RUNTIME_ERROR
    if dist.is_main:
        print(summarize(engine, stats, wall, files, dist.dp_size, plan))
    if guard.requested:
        _say_how_to_resume(guard, plan, stats)
        return guard.exit_code
    failed = _run_failures(plan, stats)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _stop_condition(engine: LLMEngine, guard: InterruptGuard) -> Callable[[], bool]:
    """When serving stops on a signal. A tensor-parallel replica stops only once all its
    ranks agreed (at the engine's next replica check), all at the same step: a rank that
    stopped alone would leave the others waiting in a collective."""
    replica = engine.replica
    if replica is None:
        return lambda: guard.requested
    replica.stop_source = lambda: guard.signum or 0

    def agreed() -> bool:
        if replica.stop_signal:
            guard.adopt(replica.stop_signal)
        return bool(replica.stop_signal)
    return agreed


def _open_writer(engine: LLMEngine, args, dist: DistributedContext, plan: RunPlan) -> CheckpointWriter | None:
    """The replica leader's checkpoint writer (shards named by its data-parallel rank)."""
    if plan.out_dir is None or not dist.is_replica_leader:
        return None
    meta = routing_meta_for(engine.model_config, engine.config.block_size) if engine.recorder is not None else None
    return CheckpointWriter(plan.out_dir, attempt=plan.attempt, rank=dist.dp_rank, routing_meta=meta,
                            policy=CheckpointPolicy(args.checkpoint_every, args.checkpoint_interval),
                            record_extra=_record_extra(plan))


def _record_extra(plan: RunPlan) -> Callable[[RequestResult], dict]:
    """The CLI's own results fields (run on the writer thread): an RL group's ``prompt_id``
    and ``sample_index``, and with --output-text the generated text (null when the
    tokenizer cannot decode the tokens: one bad request never stops the run), cut before
    the stop string that ended the request unless --include-stop-str-in-output."""
    groups = {s.request_id: {"prompt_id": s.prompt_id, "sample_index": s.sample_index}
              for s in plan.my_specs if s.prompt_id is not None}
    decode = plan.output_text

    def extra(result: RequestResult) -> dict:
        fields = dict(groups.get(result.request_id, {}))
        if decode is not None and result.finish_reason != "error":
            try:
                fields["output_text"] = cut_at_stop(decode(result.output_token_ids), result.stop_string,
                                                    plan.include_stop_str_in_output)
            except Exception as exc:  # noqa: BLE001 - a tokenizer's failure on one request
                log.warning("request %r: cannot decode its output tokens (%s); output_text is null",
                            result.request_id, exc)
                fields["output_text"] = None
        return fields
    return extra


def _close_quietly(writer: CheckpointWriter) -> None:
    try:
        writer.close()
    except CheckpointError as exc:
        log.error("%s", exc)


def _finish_directory(engine: LLMEngine, args, dist: DistributedContext, plan: RunPlan, stats: ServeStats,
                      interrupted: bool) -> list[Path]:
    """Replica leaders write step_details; when every rank served all of its requests,
    rank 0 consolidates the shards into results.jsonl / routing.npz and marks run.json
    complete."""
    if plan.out_dir is None:
        return []
    out = plan.out_dir
    if dist.is_replica_leader:
        extra = {"rank": dist.dp_rank, "world_size": dist.dp_size, "workload": _workload_meta(args, len(plan.specs)),
                 "attempt": plan.attempt, "resumed_requests": plan.num_done, "tensor_parallel_size": dist.tp_size,
                 "expert_parallel_size": dist.layout.ep if dist.layout is not None else 1}
        rank_dir = out / f"rank{dist.dp_rank}" if dist.dp_size > 1 else out
        write_step_details(engine.step_log, rank_dir / STEP_DETAILS_FILE, run_meta(engine, extra))
    complete = _all_ranks_complete(dist, not interrupted and not stats.unserved)
    files = [out / STEP_DETAILS_FILE]
    if dist.is_main:
        if dist.dp_size > 1:
            shutil.copyfile(out / "rank0" / STEP_DETAILS_FILE, out / STEP_DETAILS_FILE)
        if complete:
            meta = routing_meta_for(engine.model_config, engine.config.block_size) if engine.recorder else None
            files = consolidate_run(out, [s.request_id for s in plan.specs], meta) + files
            files += [out / "routing_meta.json"] if meta is not None else []
            set_status(out, "complete")
            finish_complete_run(out)
        else:
            set_status(out, "interrupted")
    if complete:
        dist.barrier()
    return files


def _all_ranks_complete(dist: DistributedContext, mine: bool) -> bool:
    """Every rank's vote (no barrier on an interruption's way out would be safe: all ranks
    vote, so none waits for a consolidation that will not come)."""
    if dist.world_size == 1:
        return mine
    flag = torch.tensor([0 if mine else 1], dtype=torch.int32,
                        device=dist.device if dist.device.type == "cuda" else "cpu")
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item()) == 0


def _run_failures(plan: RunPlan, stats: ServeStats) -> int:
    """Failed requests of the whole run (the consolidated results), else of this process."""
    if plan.out_dir is None:
        return stats.failed
    return sum(r.get("finish_reason") == "error" for r in load_results(plan.out_dir))


def _say_how_to_resume(guard: InterruptGuard, plan: RunPlan, stats: ServeStats) -> None:
    if plan.out_dir is None:
        log.warning("interrupted by %s: %d requests finished; nothing was saved (no --output-dir)",
                    guard.name, stats.finished + stats.failed)
        return
    log.warning("interrupted by %s: %d requests of this attempt saved in %s, %d not served; run the same "
                "command with --resume to serve the rest", guard.name, stats.finished + stats.failed,
                plan.out_dir, len(stats.unserved))


def _workload_meta(args: argparse.Namespace, num_requests: int) -> dict:
    groups = {"samples_per_prompt": args.samples_per_prompt} if args.samples_per_prompt > 1 else {}
    if args.prompts_file:
        return {"prompts_file": str(args.prompts_file), "num_requests": num_requests, **groups}
    return {"num_requests": num_requests, "prompt_len": args.prompt_len, "output_len": args.output_len,
            "shared_prefix_len": args.shared_prefix_len, **groups}


def summarize(engine: LLMEngine, stats: ServeStats, wall_s: float, files: Sequence[Path], world_size: int,
              plan: RunPlan | None = None) -> str:
    """End-of-run summary of this rank's work (and where the merged files went)."""
    summary = engine.step_log.summary()
    resumed = f" ({plan.num_done} more were already on disk)" if plan is not None and plan.num_done else ""
    lines = [
        "run summary" + (f" (replica 0 of {world_size}; its share of the requests)" if world_size > 1 else ""),
        f"  requests        {stats.finished} finished, {stats.failed} failed"
        + (f", {len(stats.unserved)} not served (interrupted)" if stats.unserved else "") + resumed,
        f"  tokens          {stats.prompt_tokens} prompt, {stats.output_tokens} generated, "
        f"{stats.cached_tokens} prompt tokens from prefix cache",
        f"  wall time       {wall_s:.2f} s over {summary.get('num_steps', 0)} steps",
        f"  throughput      {stats.output_tokens / max(wall_s, 1e-9):,.1f} generated tok/s, "
        f"{(stats.prompt_tokens + stats.output_tokens) / max(wall_s, 1e-9):,.1f} total tok/s",
    ]
    if engine.recorder is not None:
        share = summary.get("routing_share", 0.0) or 0.0
        lines.append(f"  routing         recorded for {stats.with_routing} requests; "
                     f"recorder host time {100 * share:.2f}% of step time")
    state = getattr(engine.sequence_cache, "stats", None)     # hybrid models: the state-checkpoint cache
    if state is not None:
        lines.append(f"  state cache     {state['restores']} prefix hits restored a checkpoint "
                     f"({state['restored_tokens']} tokens); {state['commits']} checkpoints committed, "
                     f"{state['store_evictions']} evicted by its LRU, {state['dropped']} dropped with their KV block")
    if stats.preemptions:
        lines.append(f"  preemptions     {stats.preemptions}")
    if files:
        lines.append(f"  files           {', '.join(str(f) for f in files)}")
    return "\n".join(lines)
