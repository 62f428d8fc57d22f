"""The training side of tools/rl_loop.py: a megatron-core ``GPTModel`` (our export) or a
transformers model that scores rollouts with and without routing replay, takes a policy
gradient step, and hands its weights back in our parameter names.

The forward passes are tools/verify_replay.py's (``megatron_pass``, ``hf_pass``); the
weights go back through ``inference.weight_sync``.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator
from unittest import mock

import torch

from inference.model import MoEGPT
from inference.weight_sync import named_tensors_from_hf, named_tensors_from_megatron
from tools.verify_replay import Rollout, TrainingPass, hf_pass, megatron_pass

NamedTensors = Iterator[tuple[str, torch.Tensor]]


@dataclass
class Trainer:
    """One training backend. Invariant: ``optimizer`` steps exactly the parameters of
    ``module``; ``forward(rollouts, replay, grad)`` runs ``module``; ``named_tensors()``
    reads ``module``'s current weights under our names."""

    backend: str
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    forward: Callable[[list[Rollout], bool, bool], TrainingPass]
    named_tensors: Callable[[], NamedTensors]


def megatron_trainer(model: MoEGPT, dtype: torch.dtype, lr: float, device: torch.device) -> Trainer:
    """Our model exported into a megatron-core GPTModel (routing replay on), trained in
    ``dtype`` (bf16/fp16 come wrapped in megatron's Float16Module, as training runs them).
    Needs ``megatron_runtime(device)``."""
    from inference.megatron_export import export_to_megatron
    gpt = export_to_megatron(model, params_dtype=dtype).to(device).train()
    return Trainer("megatron", gpt, torch.optim.Adam(gpt.parameters(), lr=lr),
                   lambda rollouts, replay, grad: megatron_pass(gpt, rollouts, replay, grad),
                   lambda: named_tensors_from_megatron(gpt, model.config))


def hf_trainer(checkpoint: str, dtype: torch.dtype, lr: float, device: torch.device) -> Trainer:
    """The checkpoint's transformers model (the one our engine serves through the HF loader)."""
    from transformers import AutoModelForCausalLM
    hf_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, local_files_only=True).to(device).train()
    return Trainer("hf", hf_model, torch.optim.Adam(hf_model.parameters(), lr=lr),
                   lambda rollouts, replay, grad: hf_pass(hf_model, rollouts, replay, grad),
                   lambda: named_tensors_from_hf(hf_model.state_dict(), hf_model.config))


@contextmanager
def megatron_runtime(device: torch.device, seed: int) -> Iterator[None]:
    """megatron-core in this one process: the CPU shims of ``inference.megatron_export`` on
    CPU; on CUDA a one-rank NCCL group (in-process store), model-parallel state of size 1,
    megatron's CUDA RNG tracker seeded, and the Transformer-Engine router GEMM name it reads
    without TE set to None (what ``cpu_megatron_runtime`` does too)."""
    from inference.megatron_export import cpu_megatron_runtime
    if device.type != "cuda":
        with cpu_megatron_runtime():
            yield
        return
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.moe import moe_utils
    created_group = not dist.is_initialized()
    if created_group:
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(moe_utils, "te_general_gemm", None, create=True))
        created_state = not parallel_state.model_parallel_is_initialized()
        if created_state:
            parallel_state.initialize_model_parallel(1, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        try:
            yield
        finally:
            if created_state:
                parallel_state.destroy_model_parallel()
            if created_group:
                dist.destroy_process_group()


def sequence_logprobs(run: TrainingPass, rollouts: list[Rollout], temperature: float) -> list[torch.Tensor]:
    """Per rollout, the log-prob of each generated token under the trainer's distribution at
    the sampling temperature (what the engine reports when sampling without top-k/top-p)."""
    out = []
    for logits, r in zip(run.logits, rollouts):
        ids = torch.tensor(r.tokens[r.prompt_len:], device=logits.device).unsqueeze(-1)
        scaled = logits[r.prompt_len - 1:-1].float() / temperature
        out.append(torch.log_softmax(scaled, dim=-1).gather(-1, ids)[:, 0])
    return out


def grpo_loss(train_lp: list[torch.Tensor], rollout_lp: list[torch.Tensor], advantages: list[float],
              clip: float) -> torch.Tensor:
    """PPO-clipped surrogate with GRPO's group-relative advantages, averaged over every
    generated token; the behaviour policy is the engine's (its rollout log-probs)."""
    losses = []
    for lp, old, adv in zip(train_lp, rollout_lp, advantages):
        ratio = torch.exp(lp - old)
        losses.append(-torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv))
    return torch.cat(losses).mean()


def group_advantages(rewards: list[float], group_size: int) -> list[float]:
    """GRPO: each reward minus its group's mean, over the group's standard deviation."""
    t = torch.tensor(rewards, dtype=torch.float64).view(-1, group_size)
    adv = (t - t.mean(1, keepdim=True)) / (t.std(1, correction=0, keepdim=True) + 1e-6)
    return adv.flatten().tolist()
