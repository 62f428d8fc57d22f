#!/usr/bin/env python
"""Check rollout routing replay end to end: generate rollouts with routing recorded, run a
training-style full-sequence forward with and without replay, and report how often the
training router disagrees with inference and how far log-probs drift.

    python tools/verify_replay.py --backend reference --perturb 0.05 --output replay.json
    python tools/verify_replay.py --backend megatron            # needs megatron-core (CPU)
    python tools/verify_replay.py --backend hf --hf-checkpoint DIR

The training side runs in ``--train-dtype`` (bf16 by default, against fp32 inference) and
optionally with ``--perturb`` weight noise (a policy one update away), so without replay
the routers disagree; with replay the disagreement must be exactly 0.
Inference log-probs come from the inference model's full-sequence forward with the
recorded routing (the engine returns tokens and routing, not log-probs). Everything runs on
CPU (megatron-core through ``cpu_megatron_runtime``): it checks correctness, not speed.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import orjson
import torch

from inference.config import DTYPES, EngineConfig
from inference.engine import LLMEngine
from inference.errors import MissingDependencyError, require
from inference.model import MoEGPT
from inference.presets import DEFAULT_PRESET, PRESETS, torch_dtype
from inference.request import SamplingParams
from inference.workload import synthetic_prompts
from routing_replay.replay_targets import complete_rows, padded_targets
from tools.run_setup import model_source

BACKENDS = ("reference", "megatron", "hf")
EPILOG = """exit status:
  0  with replay the training routers agree with inference exactly
  1  with replay they still disagree (the check failed)
  2  usage or configuration error before any work: bad flags, a missing or unreadable
     --hf-checkpoint, a missing optional dependency (the message names the pip extra)
  3  the rollouts could not be generated (a request failed), so nothing was checked
"""


@dataclass(frozen=True)
class Rollout:
    """One generated sequence. Invariant: ``routing`` has ``len(tokens) - 1`` rows."""

    tokens: list[int]
    prompt_len: int
    routing: np.ndarray          # [len(tokens) - 1, num_moe_layers, topk]


@dataclass(frozen=True)
class TrainingPass:
    """A training-side forward of every rollout: per rollout the logits [n, V] fp32 and the
    experts each MoE layer chose, as a mask [n, num_moe_layers, num_experts]."""

    logits: list[torch.Tensor]
    chosen: list[torch.Tensor]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="verify_replay.py", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=_HelpFormatter)
    p.add_argument("--backend", choices=BACKENDS, default="reference", help="training-side implementation")
    p.add_argument("--model", default=DEFAULT_PRESET, choices=list(PRESETS), help="preset (random seeded weights)")
    p.add_argument("--hf-checkpoint", metavar="DIR", help="local HF checkpoint instead of a preset (needed by --backend hf)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="inference dtype")
    p.add_argument("--train-dtype", default="bfloat16", choices=sorted(DTYPES), help="training-side dtype")
    p.add_argument("--perturb", type=float, default=0.0, help="training weights += perturb * std(weight) * noise")
    p.add_argument("--num-requests", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", metavar="FILE", help="write the metrics as JSON")
    return p


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the exit-status epilog kept as written."""


class SetupError(RuntimeError):
    """The model or checkpoint cannot be set up (exit status 2)."""


class RolloutError(RuntimeError):
    """A rollout request failed, so there is nothing to check."""


def generate_rollouts(model: MoEGPT, args: argparse.Namespace) -> list[Rollout]:
    prompts = synthetic_prompts(num_requests=args.num_requests, prompt_len=args.prompt_len,
                                vocab_size=model.config.vocab_size, seed=args.seed)
    engine = LLMEngine(model, EngineConfig(record_routing=True, block_size=16, num_kv_blocks=256,
                                           max_requests=max(1, args.num_requests), max_step_tokens=512,
                                           dtype=args.dtype, seed=args.seed))
    params = [SamplingParams(max_new_tokens=args.output_len, temperature=args.temperature,
                             seed=None if args.temperature == 0 else args.seed + i) for i in range(len(prompts))]
    results = engine.generate([s.prompt_token_ids for s in prompts], params)
    bad = [r.error for r in results if r.finish_reason == "error"]
    if bad:
        raise RolloutError(f"generation failed: {bad[0]}")
    return [Rollout(r.prompt_token_ids + r.output_token_ids, len(r.prompt_token_ids), r.routing) for r in results]


def training_copy(model: MoEGPT, dtype: torch.dtype, perturb: float, seed: int) -> MoEGPT:
    """The 'trainer's' model: same weights in ``dtype`` (buffers stay fp32), plus noise."""
    train = copy.deepcopy(model)
    perturb_weights(train, perturb, seed)
    for p in train.parameters():
        p.data = p.data.to(dtype)
    return train


@torch.no_grad()
def perturb_weights(model: torch.nn.Module, scale: float, seed: int) -> None:
    if scale <= 0:
        return
    gen = torch.Generator().manual_seed(seed + 7919)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        p.add_((noise * scale * p.float().std(correction=0)).to(p.device, p.dtype))


def _mask_of(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[..., k] ids -> [..., num_experts] bool."""
    mask = torch.zeros(*ids.shape[:-1], num_experts, dtype=torch.bool)
    return mask.scatter_(-1, ids.long().cpu(), True)


def reference_pass(model: MoEGPT, rollouts: list[Rollout], replay: bool) -> TrainingPass:
    logits, chosen = [], []
    for r in rollouts:
        forced = torch.as_tensor(complete_rows(r.routing.astype(np.int64), len(r.tokens))) if replay else None
        out, routing = model.forward_reference(torch.tensor(r.tokens), forced_routing=forced)
        logits.append(out.float())
        chosen.append(_mask_of(routing, model.config.num_experts))
    return TrainingPass(logits, chosen)


def _padded_tokens(rollouts: list[Rollout]) -> tuple[torch.Tensor, int]:
    seq = max(len(r.tokens) for r in rollouts)
    tokens = torch.zeros(len(rollouts), seq, dtype=torch.long)
    for b, r in enumerate(rollouts):
        tokens[b, :len(r.tokens)] = torch.tensor(r.tokens)
    return tokens, seq


def _split(rollouts: list[Rollout], logits: torch.Tensor, masks: list[torch.Tensor], order: str) -> TrainingPass:
    """Batch outputs -> per-rollout TrainingPass; masks are per layer [B*S, E] in ``order``."""
    b, s = logits.shape[:2]
    stacked = torch.stack(masks, dim=1)                                  # [B*S, L, E]
    grid = stacked.view(s, b, *stacked.shape[1:]).transpose(0, 1) if order == "sb" else stacked.view(b, s, *stacked.shape[1:])
    return TrainingPass([logits[i, :len(r.tokens)].float() for i, r in enumerate(rollouts)],
                        [grid[i, :len(r.tokens)] for i, r in enumerate(rollouts)])


def megatron_pass(gpt: torch.nn.Module, rollouts: list[Rollout], replay: bool, grad: bool = False) -> TrainingPass:
    """``grad=True`` keeps the autograd graph of the logits (a training step's forward)."""
    from inference.megatron_export import causal_mask
    from megatron.core.transformer.moe.router import TopKRouter
    from routing_replay.megatron import replay_routing
    tokens, seq = _padded_tokens(rollouts)
    device = next(gpt.parameters()).device
    maps: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: maps.append(out[1].detach().cpu()))
             for m in gpt.modules() if isinstance(m, TopKRouter)]
    args = (tokens.to(device), torch.arange(seq, device=device).expand(len(rollouts), seq),
            causal_mask(len(rollouts), seq, device))
    try:
        with torch.set_grad_enabled(grad):
            if replay:
                targets = padded_targets([r.routing for r in rollouts], seq, order="sb")
                with replay_routing(gpt, targets, device):
                    logits = gpt(*args)
            else:
                logits = gpt(*args)
    finally:
        for h in hooks:
            h.remove()
    return _split(rollouts, logits, maps, "sb")


def hf_pass(hf_model: torch.nn.Module, rollouts: list[Rollout], replay: bool, grad: bool = False) -> TrainingPass:
    """``grad=True`` keeps the autograd graph of the logits (a training step's forward)."""
    from routing_replay.hf import moe_routers, replay_routing
    tokens, seq = _padded_tokens(rollouts)
    attention = torch.zeros_like(tokens)
    for b, r in enumerate(rollouts):
        attention[b, :len(r.tokens)] = 1
    device = next(hf_model.parameters()).device
    tokens, attention = tokens.to(device), attention.to(device)
    num_experts = moe_routers(hf_model)[0].num_experts
    masks: list[torch.Tensor] = []
    blocks = [m for m in hf_model.modules() if (hasattr(m, "gate") or hasattr(m, "router")) and hasattr(m, "experts")]
    hooks = [blk.experts.register_forward_pre_hook(lambda mod, args: masks.append(_mask_of(args[1], num_experts)))
             for blk in blocks]
    try:
        with torch.set_grad_enabled(grad):
            if replay:
                targets = padded_targets([r.routing for r in rollouts], seq, order="bs")
                with replay_routing(hf_model, targets):
                    logits = hf_model(input_ids=tokens, attention_mask=attention).logits
            else:
                logits = hf_model(input_ids=tokens, attention_mask=attention).logits
    finally:
        for h in hooks:
            h.remove()
    return _split(rollouts, logits, masks, "bs")


def response_logprobs(logits: torch.Tensor, r: Rollout) -> torch.Tensor:
    """Log-probs of the generated tokens (positions prompt_len-1 .. n-2 predict them)."""
    ids = torch.tensor(r.tokens[1:], device=logits.device).unsqueeze(-1)
    lp = torch.log_softmax(logits[:-1].float(), dim=-1).gather(-1, ids)[:, 0]
    return lp[r.prompt_len - 1:]


def compare(rollouts: list[Rollout], inference_lp: list[torch.Tensor], run: TrainingPass) -> dict[str, float]:
    """Router disagreement: share of recorded (token, layer, slot) choices the training
    router did not make. Token disagreement: share of tokens with any differing layer."""
    missed = tokens_differing = decisions = rows = 0
    diffs = []
    for r, lp, logits, chosen in zip(rollouts, inference_lp, run.logits, run.chosen):
        rec = torch.as_tensor(r.routing.astype(np.int64))
        hit = chosen[:rec.shape[0]].gather(-1, rec)                    # [rows, L, k]
        missed += int((~hit).sum())
        tokens_differing += int((~hit).flatten(1).any(-1).sum())
        decisions, rows = decisions + hit.numel(), rows + rec.shape[0]
        diffs.append((response_logprobs(logits, r) - lp).abs())
    d = torch.cat(diffs)
    return {"router_disagreement": missed / max(decisions, 1), "token_disagreement": tokens_differing / max(rows, 1),
            "max_abs_logprob_diff": float(d.max()) if d.numel() else 0.0,
            "mean_abs_logprob_diff": float(d.mean()) if d.numel() else 0.0}


def training_runner(args: argparse.Namespace, model: MoEGPT):
    """A function rollouts, replay -> TrainingPass for the chosen backend."""
    dtype = torch_dtype(args.train_dtype)
    if args.backend == "reference":
        train = training_copy(model, dtype, args.perturb, args.seed)
        return lambda rollouts, replay: reference_pass(train, rollouts, replay)
    if args.backend == "megatron":
        require("megatron.core", "megatron", "--backend megatron")
        from inference.megatron_export import export_to_megatron
        gpt = export_to_megatron(training_copy(model, torch.float32, args.perturb, args.seed), params_dtype=dtype).eval()
        return lambda rollouts, replay: megatron_pass(gpt, rollouts, replay)
    transformers = require("transformers", "hf", "--backend hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_checkpoint, dtype=dtype, local_files_only=True).eval()
    perturb_weights(hf_model, args.perturb, args.seed)
    return lambda rollouts, replay: hf_pass(hf_model, rollouts, replay)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    try:
        config, loader = model_source(args)
        model = loader(torch.device("cpu"), torch_dtype(args.dtype), args.seed)
    except (ValueError, FileNotFoundError) as exc:   # HFCheckpointError is a ValueError
        raise SetupError(str(exc)) from exc
    rollouts = generate_rollouts(model, args)
    inference_lp = [response_logprobs(reference_pass(model, [r], True).logits[0], r) for r in rollouts]
    train = training_runner(args, model)
    without, with_replay = compare(rollouts, inference_lp, train(rollouts, False)), compare(rollouts, inference_lp, train(rollouts, True))
    report = {"backend": args.backend, "model": config.name, "inference_dtype": args.dtype,
              "train_dtype": args.train_dtype, "perturb": args.perturb, "num_sequences": len(rollouts),
              "num_tokens": sum(len(r.tokens) for r in rollouts)}
    for label, metrics in (("with_replay", with_replay), ("without_replay", without)):
        report.update({f"{k}_{label}": v for k, v in metrics.items()})
    return report


def format_table(report: dict) -> str:
    rows = [("router disagreement", "router_disagreement"), ("tokens with any differing layer", "token_disagreement"),
            ("max |logprob diff| (response)", "max_abs_logprob_diff"),
            ("mean |logprob diff| (response)", "mean_abs_logprob_diff")]
    head = (f"backend={report['backend']} model={report['model']} inference={report['inference_dtype']} "
            f"train={report['train_dtype']} perturb={report['perturb']} "
            f"sequences={report['num_sequences']} tokens={report['num_tokens']}")
    lines = [head, f"{'metric':<34}{'without replay':>16}{'with replay':>16}"]
    for title, key in rows:
        lines.append(f"{title:<34}{report[key + '_without_replay']:>16.6g}{report[key + '_with_replay']:>16.6g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.backend == "hf" and not args.hf_checkpoint:
        parser.error("--backend hf needs --hf-checkpoint DIR (a transformers checkpoint)")
    try:
        if args.backend == "hf":   # checked before any work, not after the rollouts
            require("transformers", "hf", "--backend hf")
        if args.backend == "megatron":
            require("megatron.core", "megatron", "--backend megatron")
            from inference.megatron_export import cpu_megatron_runtime
            with cpu_megatron_runtime():
                report = run(args)
        else:
            report = run(args)
    except (SetupError, MissingDependencyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RolloutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(format_table(report))
    if args.output:
        Path(args.output).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    if report["router_disagreement_with_replay"] != 0:
        print("error: with replay the training routers still disagree with inference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
