#!/usr/bin/env python
"""A small RL loop around one engine: rollouts with routing and log-probs, a GRPO step on
the trainer with routing replay, the new weights copied back into the same engine, repeat.

    python tools/rl_loop.py --iterations 4 --output rl.json              # CPU: tiny-moe
    python tools/rl_loop.py --device cuda --dtype bfloat16 --output rl.json
    python tools/rl_loop.py --backend hf --hf-checkpoint DIR             # transformers trainer

Per iteration: ``--num-prompts`` prompts, ``--group-size`` samples each (temperature
``--temperature``, no top-k/top-p, so the engine's log-probs are the trainer's softmax at
that temperature), a toy reward (the share of generated tokens with an even id), group-
relative advantages, one PPO-clipped step against the rollout log-probs. The trainer is a
megatron-core ``GPTModel`` exported from the engine's model (``--backend megatron``) or the
checkpoint's transformers model (``--backend hf``). Before the first rollouts the engine
takes the trainer's weights (as rounded to ``--train-dtype``), so both hold one policy.

Each row reports: the weight_version that produced the rollouts; router disagreement
between the trainer and the recorded routing with replay (must be 0; exit status 1
otherwise) and without; the train-vs-rollout log-prob mismatch, mean |delta| and a KL
estimate (k3 = E[exp(d) - 1 - d], d = trainer minus rollout log-prob of each generated
token; an estimate of KL(rollout || trainer)) with and without replay; the refit time
(``update_weights``, synchronised on CUDA); the engine's memory. The engine object is never
rebuilt (``engine_id`` in the JSON; on CUDA the decode graphs stay captured:
``graph_runner_id``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import torch

from inference.config import DTYPES, EngineConfig
from inference.engine import LLMEngine
from inference.presets import DEFAULT_PRESET, PRESETS, torch_dtype
from inference.request import SamplingParams
from inference.workload import synthetic_prompts
from tools.rl_trainers import (Trainer, group_advantages, grpo_loss, hf_trainer, megatron_runtime, megatron_trainer,
                               sequence_logprobs)
from tools.run_setup import model_source
from tools.verify_replay import Rollout, TrainingPass, compare

COLUMNS = (("iter", "iteration", "d"), ("version", "weight_version", ""), ("reward", "reward_mean", ".3f"),
           ("disagree replay", "router_disagreement_with_replay", ".4f"),
           ("disagree free", "router_disagreement_without_replay", ".4f"),
           ("|dlp| replay", "logprob_abs_diff_mean_with_replay", ".2e"),
           ("|dlp| free", "logprob_abs_diff_mean_without_replay", ".2e"),
           ("KL replay", "kl_k3_with_replay", ".2e"), ("KL free", "kl_k3_without_replay", ".2e"),
           ("refit s", "refit_s", ".3f"), ("engine MiB", "engine_mib", ".1f"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rl_loop.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backend", choices=("megatron", "hf"), default="megatron", help="trainer implementation")
    p.add_argument("--model", default=DEFAULT_PRESET, choices=list(PRESETS), help="preset (random seeded weights)")
    p.add_argument("--hf-checkpoint", metavar="DIR",
                   help="local HF checkpoint instead of a preset (needed by --backend hf)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="engine dtype (default: float32 on CPU, "
                   "bfloat16 on CUDA)")
    p.add_argument("--train-dtype", default="bfloat16", choices=sorted(DTYPES), help="trainer dtype")
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4, help="samples per prompt (GRPO group)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=0.2, help="PPO ratio clip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", metavar="FILE", help="write the rows as JSON ({'iterations': [...], ...})")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.backend == "hf" and not args.hf_checkpoint:
        raise SystemExit("error: --backend hf needs --hf-checkpoint DIR (a transformers checkpoint)")
    for name in ("iterations", "num_prompts", "group_size", "prompt_len", "output_len"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.group_size < 2:
        raise SystemExit("error: --group-size must be >= 2 (advantages are relative to the group)")
    if torch_dtype(args.train_dtype) == torch.float16:
        raise SystemExit("error: --train-dtype float16 needs loss scaling, which this loop does not do; use bfloat16")
    if args.temperature < 1e-3:
        raise SystemExit("error: --temperature must be > 0: a policy-gradient step needs sampled rollouts")


def _device(flag: str) -> torch.device:
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(flag)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda, but CUDA is not available")
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_memory(engine: LLMEngine) -> dict[str, int | None]:
    """Bytes the engine holds: its weights, KV cache and routing buffers; on CUDA also the
    allocator's count for the whole process (the trainer included)."""
    tensors = {t.data_ptr(): t for t in [*engine.model.parameters(), *engine.model.buffers()]}
    held = sum(t.numel() * t.element_size() for t in tensors.values()) + engine.kv_cache.nbytes
    recorder = engine.recorder
    for name in ("staging", "block_routing"):
        buf = getattr(recorder, name, None)
        held += buf.numel() * buf.element_size() if isinstance(buf, torch.Tensor) else 0
    cuda = torch.cuda.memory_allocated(engine.device) if engine.device.type == "cuda" else None
    return {"engine_bytes": held, "cuda_allocated_bytes": cuda}


def build(args: argparse.Namespace, device: torch.device) -> tuple[LLMEngine, Trainer]:
    config, loader = model_source(args)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model = loader(device, torch_dtype(dtype), args.seed)
    batch = args.num_prompts * args.group_size
    engine = LLMEngine(model, EngineConfig(
        record_routing=True, block_size=16, max_requests=batch, cuda_graphs=device.type == "cuda",
        num_kv_blocks=batch * -(-(args.prompt_len + args.output_len) // 16) + 16,
        max_step_tokens=max(256, batch), dtype=dtype, device=str(device), seed=args.seed))
    train_dtype = torch_dtype(args.train_dtype)
    if args.backend == "megatron":
        trainer = megatron_trainer(model, train_dtype, args.lr, device)
    else:
        trainer = hf_trainer(args.hf_checkpoint, train_dtype, args.lr, device)
    return engine, trainer


def rollouts_of(engine: LLMEngine, prompts: list[list[int]], args: argparse.Namespace, iteration: int):
    params = [SamplingParams(max_new_tokens=args.output_len, temperature=args.temperature,
                             seed=args.seed * 1_000_003 + iteration * 10_007 + i) for i in range(len(prompts))]
    results = engine.generate(prompts, params)
    bad = [r.error for r in results if r.finish_reason == "error"]
    if bad:
        raise SystemExit(f"error: generation failed: {bad[0]}")
    versions = {r.weight_version for r in results}
    if len(versions) != 1:
        raise AssertionError(f"one rollout batch mixes weight versions {versions}")
    rollouts = [Rollout(r.prompt_token_ids + r.output_token_ids, len(r.prompt_token_ids), r.routing) for r in results]
    return rollouts, results, versions.pop()


def mismatch(run: TrainingPass, rollouts: list[Rollout], rollout_lp: list[torch.Tensor],
             temperature: float) -> dict[str, float]:
    """Router disagreement with the recorded routing, and the log-prob mismatch."""
    scaled = TrainingPass([logits.detach() / temperature for logits in run.logits], run.chosen)
    routers = compare(rollouts, rollout_lp, scaled)
    d = torch.cat([t - r for t, r in zip(sequence_logprobs(scaled, rollouts, 1.0), rollout_lp)]).double()
    return {"router_disagreement": routers["router_disagreement"], "token_disagreement": routers["token_disagreement"],
            "logprob_abs_diff_mean": float(d.abs().mean()), "logprob_abs_diff_max": float(d.abs().max()),
            "kl_k3": float((torch.exp(d) - 1 - d).mean())}


def iteration(k: int, engine: LLMEngine, trainer: Trainer, prompts: list[list[int]],
              args: argparse.Namespace, device: torch.device) -> dict:
    t0 = time.perf_counter()
    rollouts, results, version = rollouts_of(engine, prompts, args, k)
    rollout_s = time.perf_counter() - t0
    param_device = next(trainer.module.parameters()).device
    rollout_lp = [torch.tensor(r.output_logprobs, dtype=torch.float32, device=param_device) for r in results]
    rewards = [sum(t % 2 == 0 for t in r.output_token_ids) / len(r.output_token_ids) for r in results]
    t0 = time.perf_counter()
    free = mismatch(trainer.forward(rollouts, False, False), rollouts, rollout_lp, args.temperature)
    forced_run = trainer.forward(rollouts, True, True)
    forced = mismatch(forced_run, rollouts, rollout_lp, args.temperature)
    loss = grpo_loss(sequence_logprobs(forced_run, rollouts, args.temperature), rollout_lp,
                     group_advantages(rewards, args.group_size), args.clip)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.optimizer.step()
    _sync(device)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    new_version = engine.update_weights(trainer.named_tensors())
    _sync(device)
    refit_s = time.perf_counter() - t0
    memory = engine_memory(engine)
    row = {"iteration": k, "weight_version": version, "new_weight_version": new_version, "engine_id": id(engine),
           "graph_runner_id": id(engine.graph_runner) if engine.graph_runner is not None else None,
           "num_sequences": len(rollouts), "num_generated_tokens": sum(len(r.output_token_ids) for r in results),
           "reward_mean": sum(rewards) / len(rewards), "loss": float(loss), "rollout_s": rollout_s,
           "train_s": train_s, "refit_s": refit_s, **memory, "engine_mib": memory["engine_bytes"] / 2**20}
    for label, metrics in (("with_replay", forced), ("without_replay", free)):
        row.update({f"{key}_{label}": value for key, value in metrics.items()})
    return row


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    device = _device(args.device)
    engine, trainer = build(args, device)
    initial = engine.update_weights(trainer.named_tensors())     # one policy on both sides from the start
    specs = synthetic_prompts(num_requests=args.num_prompts, prompt_len=args.prompt_len,
                              vocab_size=engine.model_config.vocab_size, seed=args.seed)
    prompts = [s.prompt_token_ids for s in specs for _ in range(args.group_size)]
    print(header())
    rows = []
    for k in range(args.iterations):
        rows.append(iteration(k, engine, trainer, prompts, args, device))
        print(format_row(rows[-1]), flush=True)
    return {"backend": trainer.backend, "model": engine.model_config.name, "device": str(device),
            "engine_dtype": engine.config.dtype, "train_dtype": args.train_dtype,
            "initial_weight_version": initial, "config": vars(args), "iterations": rows}


def header() -> str:
    return "  ".join(f"{title:>{max(len(title), 8)}}" for title, _, _ in COLUMNS)


def format_row(row: dict) -> str:
    return "  ".join(f"{format(row[key], fmt):>{max(len(title), 8)}}" for title, key, fmt in COLUMNS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    if args.backend == "megatron":
        with megatron_runtime(_device(args.device), args.seed):
            report = run(args)
    else:
        report = run(args)
    if args.output:
        Path(args.output).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    if any(row["router_disagreement_with_replay"] != 0 for row in report["iterations"]):
        print("error: with replay the trainer's routers still disagree with the rollouts", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
