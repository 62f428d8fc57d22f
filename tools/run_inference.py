#!/usr/bin/env python
"""Generate rollouts with the MoE inference engine, optionally recording routing.

    torchrun --nproc-per-node 1 tools/run_inference.py --record-routing --output-dir OUT

Plain ``python tools/run_inference.py ...`` works too. With more than one torchrun process
the world splits into data-parallel replicas of --tensor-parallel-size ranks (experts over
--expert-parallel-size of them): each replica serves its share of the requests, its leader
writes them, and rank 0 merges the outputs. Finished requests reach OUT as checkpoints while
the run goes on; an interrupted run (signal, crash, preemption) continues with --resume.

    torchrun --nproc-per-node 4 tools/run_inference.py --tensor-parallel-size 2 --expert-parallel-size 2 ...
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from inference.config import DTYPES, EngineConfig
from inference.errors import AllocationError, MissingDependencyError
from inference.presets import DEFAULT_PRESET, PRESETS
from inference.run_outputs import routing_meta_for
from inference.run_writer import CheckpointPolicy
from inference.workload import PromptsFileError, replica_share
from routing_replay.run_layout import read_manifest
from tools.interrupts import InterruptGuard
from tools.memory_plan import plan_memory
from tools.output_dir import (RunLock, finish_complete_run, finished_ids, inspect_output_dir, prepare_output_dir,
                              run_fingerprint)
from tools.run_report import EXIT_OK, EXIT_USAGE, RunPlan, serve_and_report
from tools.run_setup import (build_engine, checkpoint_tokenizer, degenerate_config_warnings, describe_memory_plan,
                             distributed_context, load_prompts, model_source, output_limit, output_text_decoder,
                             parallel_layout, parse_memory_size, sample_group_warnings, sampling_params_for,
                             stop_string_detokenizer)

log = logging.getLogger("run_inference")

EPILOG = """exit status:
  0    every request finished
  1    the run stopped on an error after work began (e.g. a checkpoint could not be written:
       disk full); everything checkpointed is valid: fix the cause, then run again with --resume
  2    usage or configuration error, found before any work (nothing served)
  3    every request was served but some failed (finish_reason "error"); all else is written
  130  interrupted by SIGINT (143: SIGTERM): OUT holds every request finished before the last
       checkpoint, in valid files; the same command with --resume serves the rest
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_inference.py", description=__doc__.split("\n\n")[0], epilog=EPILOG,
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_PRESET, choices=list(PRESETS),
                   help="built-in preset (random seeded weights; *-shape presets copy real models' shapes)")
    g.add_argument("--hf-checkpoint", metavar="DIR", help="local HF checkpoint (config.json + safetensors) instead of a preset")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weights/KV dtype (default: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--seed", type=int, default=0, help="seed for weights, synthetic prompts and sampling")
    g = p.add_argument_group("workload (a prompts file, or a synthetic workload)")
    g.add_argument("--prompts-file", metavar="JSONL", help='one JSON object per line: {"id": ..., "prompt_token_ids": [...]} or {"id": ..., "prompt": "text"} '
                        '(text needs --hf-checkpoint with a tokenizer); optional "max_new_tokens", "routing_start", "stop" '
                        '(a string or a list of them)')
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
    g.add_argument("--stop-token-ids", type=_token_ids, default=(), metavar="IDS",
                   help="comma-separated token ids that also end a request (besides the model's EOS ids; they stop "
                        "even with --ignore-eos), e.g. a chat template's end-of-turn token")
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="a stop string for every request (repeatable; needs --hf-checkpoint's tokenizer): a request "
                        "ends (finish_reason stop, results' stop_string) at the first token after which its decoded "
                        "output contains one; that token is kept. A prompts file line's \"stop\" replaces these")
    g.add_argument("--include-stop-str-in-output", action="store_true",
                   help="output_text keeps the stop string that ended a request (default: cut before it)")
    g.add_argument("--samples-per-prompt", type=int, default=1, metavar="N",
                   help="N samples of every prompt (an RL group): request ids '<id>_<k>' for k = 0..N-1, each with "
                        "its own seed, served together by one replica so they compute the prompt once (hybrid models: "
                        "see the warning); results carry prompt_id and sample_index")
    g.add_argument("--logprobs", type=int, default=0, metavar="N",
                   help="also return the top-N alternatives of every generated token (each token's own log-prob "
                        "is always written)")
    g.add_argument("--prompt-logprobs", action="store_true",
                   help="also return each prompt token's log-prob (such requests take no prefix-cache hits)")
    g.add_argument("--logprobs-mode", default="processed", choices=["processed", "tempered", "raw"],
                   help="distribution of the log-probs: processed = the one sampled from (temperature, top-k, top-p), "
                        "tempered = logits / temperature only, raw = softmax of the logits")
    g = p.add_argument_group("engine")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="usable KV blocks (default 1024, or from --kv-cache-memory)")
    g.add_argument("--kv-cache-memory", metavar="SIZE", help="KV cache size instead of --num-kv-blocks, e.g. 512MiB, 8GiB (per rank: with tensor parallelism a rank holds its KV heads)")
    g.add_argument("--max-requests", type=int, default=64, help="requests running at once")
    g.add_argument("--max-step-tokens", type=int, default=512, help="token budget per step (decodes + prefill chunks)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse KV (and routing) of identical full-block prefixes")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA-graph decode (default: on when running on CUDA)")
    g.add_argument("--piecewise-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="steps with prefill chunks as piecewise CUDA graphs, attention eager between them "
                        "(default: on with --cuda-graphs, for models without recurrent layers)")
    g.add_argument("--piecewise-max-tokens", type=int, default=2048,
                   help="largest step (tokens) that runs as piecewise graphs; larger steps run eagerly")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule and prepare step N+1 while the GPU runs step N; sampled tokens reach the next "
                        "step on the device (default: on when running on CUDA)")
    g.add_argument("--state-checkpoints", type=int, default=None, metavar="N",
                   help="hybrid models: recurrent-state checkpoints the prefix cache keeps (default: --max-requests; "
                        "0: cached prefixes are never reused, recurrent layers cannot resume without one)")
    g.add_argument("--checkpoint-interval-blocks", type=int, default=0, metavar="N",
                   help="hybrid models: a state checkpoint every N blocks of long prompts, besides the last full "
                        "block of each prompt (0: automatic, a checkpoint's state bytes <= the KV of N blocks)")
    g = p.add_argument_group("parallelism (torchrun; world = data-parallel replicas x tensor-parallel size)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, metavar="T",
                   help="ranks per replica: attention heads, MLPs and the vocabulary split over T ranks")
    g.add_argument("--expert-parallel-size", type=int, default=1, metavar="E",
                   help="experts split over E of a replica's T ranks (E divides T; each expert is split over T/E ranks)")
    g.add_argument("--replica-check-interval", type=int, default=16, metavar="N",
                   help="with T > 1: every N steps the ranks of a replica check they computed the same schedule "
                        "and tokens (and agree to stop on a signal)")
    g = p.add_argument_group("routing recording")
    g.add_argument("--record-routing", action="store_true",
                   help="record every token's top-k experts per MoE layer (routing.npz, routing_meta.json)")
    g = p.add_argument_group("output and logging")
    g.add_argument("--output-dir", metavar="DIR", help="write results.jsonl, step_details.json (and routing files) here; "
                   "a directory holding another run is refused unless --resume or --overwrite")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --output-dir (same flags): "
                   "skip requests already on disk, serve the rest; starts a new run when the directory has none")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --output-dir (only its files are deleted)")
    g.add_argument("--checkpoint-every", type=int, default=CheckpointPolicy.every_requests, metavar="N",
                   help="commit finished requests to --output-dir after every N of them ...")
    g.add_argument("--checkpoint-interval", type=float, default=CheckpointPolicy.every_seconds, metavar="SECONDS",
                   help="... or SECONDS after the oldest finished request not yet on disk")
    g.add_argument("--output-text", action=argparse.BooleanOptionalAction, default=None,
                   help="write each result's generated text (output_text, decoded by the --hf-checkpoint tokenizer, "
                        "special tokens left out); default: on when the prompts file has text or chat prompts")
    g.add_argument("--step-details-max-entries", type=int, default=100_000, metavar="N",
                   help="step_details.json keeps the last N step entries (its summary covers every step), so "
                        "hours-long runs stay bounded in memory and on disk; 0 = keep all")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress line on stderr, updated every step (default: on when stderr is a terminal)")
    g.add_argument("--dry-run", action="store_true", help="validate the configuration, print the memory plan, generate nothing")
    return p


def engine_config_from_args(args: argparse.Namespace, model_config, device: torch.device,
                            attention_config=None) -> EngineConfig:
    """``attention_config``: this rank's attention shard (its KV heads), which sizes a KV
    block for --kv-cache-memory; every rank of a replica has the same, so the same block count."""
    num_blocks = args.num_kv_blocks
    if args.kv_cache_memory:
        from inference.cache.kv_cache import KVCache
        from inference.presets import torch_dtype
        per_block = KVCache.bytes_per_block(attention_config or model_config, args.block_size, torch_dtype(args.dtype))
        num_blocks = parse_memory_size(args.kv_cache_memory) // per_block
        if num_blocks < 1:
            raise ValueError(f"--kv-cache-memory {args.kv_cache_memory} holds no block of {per_block} bytes")
    cuda_graphs = device.type == "cuda" if args.cuda_graphs is None else args.cuda_graphs
    if cuda_graphs and device.type != "cuda":
        raise ValueError("--cuda-graphs needs a CUDA device (use --no-cuda-graphs on CPU)")
    return EngineConfig(block_size=args.block_size, num_kv_blocks=num_blocks or 1024, max_requests=args.max_requests,
                        max_step_tokens=args.max_step_tokens, enable_prefix_caching=args.enable_prefix_caching,
                        record_routing=args.record_routing, cuda_graphs=cuda_graphs, dtype=args.dtype,
                        device=str(device), seed=args.seed, async_scheduling=args.async_scheduling,
                        replica_check_interval=args.replica_check_interval, state_checkpoints=args.state_checkpoints,
                        checkpoint_interval_blocks=args.checkpoint_interval_blocks,
                        piecewise_graphs=args.piecewise_graphs, piecewise_max_tokens=args.piecewise_max_tokens,
                        step_log_max_entries=args.step_details_max_entries)


def _token_ids(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"token ids must be >= 0, got {text!r}")
    return ids


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the exit-status epilog kept as written."""


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("num_requests", "prompt_len", "output_len", "block_size", "max_requests", "max_step_tokens",
                 "samples_per_prompt", "checkpoint_every", "tensor_parallel_size", "expert_parallel_size",
                 "replica_check_interval"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("num_kv_blocks", "max_new_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("state_checkpoints", "checkpoint_interval_blocks", "step_details_max_entries"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.shared_prefix_len < 0 or args.shared_prefix_len > args.prompt_len:
        parser.error(f"--shared-prefix-len must be in [0, --prompt-len={args.prompt_len}], got {args.shared_prefix_len}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        parser.error(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        parser.error(f"--top-k must be >= 0 (0 = disabled), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if not 0 <= args.logprobs <= 20:
        parser.error(f"--logprobs must be in [0, 20], got {args.logprobs}")
    if not (math.isfinite(args.checkpoint_interval) and args.checkpoint_interval > 0):
        parser.error(f"--checkpoint-interval must be a finite number of seconds > 0, got {args.checkpoint_interval}")
    if args.num_kv_blocks is not None and args.kv_cache_memory:
        parser.error("give --num-kv-blocks or --kv-cache-memory, not both")
    if args.resume and args.overwrite:
        parser.error("give --resume or --overwrite, not both")
    if (args.resume or args.overwrite) and not args.output_dir:
        parser.error(f"--{'resume' if args.resume else 'overwrite'} needs --output-dir")
    if args.stop and not args.hf_checkpoint:
        parser.error("--stop needs --hf-checkpoint: its tokenizer decodes the outputs to find the stop strings")
    if "" in args.stop:
        parser.error("--stop must not be empty")


def check_model_args(args: argparse.Namespace, model_config) -> None:
    """Flags whose valid range depends on the model."""
    if args.block_size > model_config.max_position_embeddings:
        raise ValueError(f"--block-size {args.block_size} exceeds the model's maximum length "
                         f"({model_config.max_position_embeddings} positions); use a block size like 16")
    outside = [i for i in args.stop_token_ids if i >= model_config.vocab_size]
    if outside:
        raise ValueError(f"--stop-token-ids {outside} are outside the vocabulary ({model_config.vocab_size} tokens)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    with InterruptGuard() as guard, contextlib.ExitStack() as held:
        try:
            ready = _set_up(args, guard, held)
        except (ValueError, PromptsFileError, OSError, MissingDependencyError, AllocationError) as exc:
            parser.error(str(exc))   # setup only: nothing was served yet
        if isinstance(ready, int):
            return ready
        engine, dist, specs, plan = ready
        index_of = {s.request_id: i for i, s in enumerate(specs)}
        return serve_and_report(engine, args, dist, plan,
                                lambda spec: sampling_params_for(args, spec, index_of[spec.request_id]), guard)


def _set_up(args: argparse.Namespace, guard: InterruptGuard, held: contextlib.ExitStack):
    """Validate everything (before any weights), build the engine, prepare --output-dir
    (rank 0 holds its lock in ``held`` until the run ends). Returns an exit code when the
    run ends here, else (engine, dist, specs, plan)."""
    dist = distributed_context(args.device)
    if args.dtype is None:
        args.dtype = "bfloat16" if dist.device.type == "cuda" else "float32"
    model_config, model_loader = model_source(args)
    check_model_args(args, model_config)
    layout = parallel_layout(dist.world_size, args.tensor_parallel_size, args.expert_parallel_size, model_config,
                             dry_run=args.dry_run)
    if layout.world_size == dist.world_size:      # else a single-process --dry-run planning a replica
        dist = dist.with_layout(layout)
    engine_config = engine_config_from_args(args, model_config, dist.device,
                                            _attention_config(model_config, layout, dist.rank))
    tokenizer = checkpoint_tokenizer(args)
    specs = load_prompts(args, model_config, tokenizer)
    output_text = output_text_decoder(args, specs, tokenizer)
    detokenizer = stop_string_detokenizer(args, specs, tokenizer)
    limits = [output_limit(args, s) for s in specs]
    memory = plan_memory(model_config, engine_config, dist.device,
                         local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")), layout=layout, rank=dist.rank)
    fingerprint = run_fingerprint(args, model_config, engine_config, specs, limits)
    out_plan = _inspect_output_dir(args, dist, fingerprint)
    warnings = (degenerate_config_warnings(model_config, engine_config, specs, limits)
                + sample_group_warnings(args, model_config))
    if args.dry_run:
        return _dry_run(model_config, engine_config, memory, len(specs), out_plan, warnings, layout)
    problem = _any_rank_problem(dist, memory.problem()) or (out_plan.problem if out_plan else None)
    if problem:
        raise ValueError(problem)
    if out_plan is not None and dist.is_main:
        held.enter_context(RunLock(out_plan.path))
    for warning in warnings:
        log.warning("%s", warning)
    if out_plan is not None and out_plan.action == "done":
        if dist.is_main:
            finish_complete_run(out_plan.path)   # a run killed while tidying up after completion
        print(f"{out_plan.path}: the run is already complete ({len(specs)} requests); nothing to resume")
        return EXIT_OK
    dist = dist.with_groups()
    engine = build_engine(model_loader, engine_config, dist.device, dist.groups, detokenizer)
    _adopt_peer_signal(dist, guard)
    if guard.requested:
        log.warning("interrupted by %s before any request was served; nothing was written", guard.name)
        return guard.exit_code
    meta = routing_meta_for(model_config, engine_config.block_size) if engine_config.record_routing else None
    return engine, dist, specs, _plan_run(args, dist, specs, out_plan, fingerprint, meta, output_text)


def _attention_config(model_config, layout, rank: int):
    """This rank's attention shard (its KV heads), or the whole model's without TP."""
    if layout.tp == 1:
        return model_config
    from inference.parallel.attention import local_attention_config
    return local_attention_config(model_config, layout, layout.coords(rank).tp_rank)


def _adopt_peer_signal(dist, guard: InterruptGuard) -> None:
    """A signal any rank received before serving stops every rank (alone, it would leave
    the others waiting in a collective)."""
    if dist.world_size > 1:
        signals: list = [None] * dist.world_size
        torch.distributed.all_gather_object(signals, guard.signum)
        received = [s for s in signals if s]
        if received:
            guard.adopt(received[0])


def _any_rank_problem(dist, problem: str | None) -> str | None:
    """The first rank's problem, on every rank (a rank that stopped alone would leave the
    others waiting in a collective)."""
    if dist.world_size == 1:
        return problem
    problems: list = [None] * dist.world_size
    torch.distributed.all_gather_object(problems, problem)
    return next((p if r == dist.rank else f"rank {r}: {p}" for r, p in enumerate(problems) if p), None)


def _inspect_output_dir(args: argparse.Namespace, dist, fingerprint: dict):
    """Rank 0 decides what --output-dir allows and every rank gets the same verdict (another
    rank looking for itself could see the files rank 0 has just begun writing)."""
    if not args.output_dir:
        return None
    plan = [inspect_output_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite,
                               fingerprint=fingerprint) if dist.is_main else None]
    if dist.world_size > 1:
        torch.distributed.broadcast_object_list(plan, src=0)
    return plan[0]


def _dry_run(model_config, engine_config, memory, num_requests: int, out_plan, warnings: list[str], layout) -> int:
    verdict = None if out_plan is None else (out_plan.problem or f"{out_plan.path}: ok ({out_plan.action})")
    problems = [p for p in (memory.problem(), out_plan.problem if out_plan else None) if p]
    head = ("dry run: configuration is valid" if not problems else
            "dry run: configuration is NOT valid:\n" + "\n".join(f"  error: {p}" for p in problems))
    notes = "".join(f"\n  warning: {w}" for w in warnings)
    print(head + notes + "\n" + describe_memory_plan(model_config, engine_config, memory, num_requests, verdict, layout))
    return EXIT_USAGE if problems else EXIT_OK


def _plan_run(args, dist, specs, out_plan, fingerprint, routing_meta, output_text=None) -> RunPlan:
    """Prepare --output-dir (rank 0) and pick this replica's share of the requests not yet
    on disk (every rank of a replica gets the same share, in the same order)."""
    if out_plan is None:
        return RunPlan(specs, replica_share(specs, dist.dp_rank, dist.dp_size), 0, 1, None, output_text,
                       args.include_stop_str_in_output)
    if dist.is_main:
        if out_plan.action in ("resume", "reopen"):
            log.info("resuming the run in %s", out_plan.path)
        elif args.resume:
            log.info("--resume: %s holds no run yet; starting a new one", out_plan.path)
        prepare_output_dir(out_plan, {"num_requests": len(specs), "record_routing": args.record_routing,
                                      "world_size": dist.dp_size, "tensor_parallel_size": dist.tp_size,
                                      "expert_parallel_size": dist.layout.ep, "fingerprint": fingerprint},
                           routing_meta)
    dist.barrier()
    attempt = int(read_manifest(out_plan.path)["attempt"])
    done = finished_ids(out_plan.path, attempt)
    remaining = [s for s in specs if s.request_id not in done]
    return RunPlan(specs, replica_share(remaining, dist.dp_rank, dist.dp_size), len(specs) - len(remaining), attempt,
                   out_plan.path, output_text, args.include_stop_str_in_output)


if __name__ == "__main__":
    sys.exit(main())
