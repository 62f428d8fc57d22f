"""Prompt log-probs: the log-prob of every prompt token given the tokens before it, computed
from the hidden states of the prefill chunks that cover it (``SamplingParams.prompt_logprobs``).

Position p's hidden state predicts token p + 1. The last prompt position predicts the first
generated token, whose log-prob is an output log-prob, so a prompt of n tokens gets n - 1
values here (position 0 has none). Requests that ask for them take no prefix-cache hits
(every prompt position must be computed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference.request import Request
from inference.scheduled_step import ScheduledChunk

ROWS_PER_SLICE = 1024   # logits of at most this many rows exist at once ([rows, vocab] fp32)


@dataclass
class PromptLogprobPlan:
    """Which hidden-state rows of a step score which prompt tokens. Invariant: the four
    lists have one entry per scored token, in the same order."""

    rows: list[int]
    targets: list[int]
    inverse_temperatures: list[float]
    owners: list[tuple[Request, int]]    # (request, position of the scored token)

    def __bool__(self) -> bool:
        return bool(self.rows)


def plan_prompt_logprobs(chunks: list[ScheduledChunk], query_starts: list[int]) -> PromptLogprobPlan:
    plan = PromptLogprobPlan([], [], [], [])
    for chunk, row0 in zip(chunks, query_starts):
        request, params = chunk.request, chunk.request.sampling_params
        if not params.prompt_logprobs:
            continue
        prompt = request.prompt_token_ids
        inverse = 1.0 if params.is_greedy or params.logprobs_mode == "raw" else 1.0 / params.temperature
        for p in range(chunk.start, min(chunk.start + chunk.num_tokens, len(prompt) - 1)):
            plan.rows.append(row0 + p - chunk.start)
            plan.targets.append(prompt[p + 1])
            plan.inverse_temperatures.append(inverse)
            plan.owners.append((request, p + 1))
    return plan


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)   # pinned: the copy does not sync


def compute_prompt_logprobs(model, hidden: torch.Tensor, plan: PromptLogprobPlan) -> torch.Tensor:
    """float32 [len(plan.rows)] on the device, in plan order; no host sync."""
    device = hidden.device
    rows = _to_device(plan.rows, torch.int64, device)
    targets = _to_device(plan.targets, torch.int64, device)
    inverse = _to_device(plan.inverse_temperatures, torch.float32, device)
    out = torch.empty(len(plan.rows), dtype=torch.float32, device=device)
    for lo in range(0, len(plan.rows), ROWS_PER_SLICE):
        hi = min(lo + ROWS_PER_SLICE, len(plan.rows))
        logits = model.compute_logits(hidden.index_select(0, rows[lo:hi])) * inverse[lo:hi, None]
        out[lo:hi] = torch.log_softmax(logits, dim=-1).gather(1, targets[lo:hi, None])[:, 0]
    return out
