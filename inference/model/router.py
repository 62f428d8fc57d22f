"""Top-k router with megatron-core ``TopKRouter`` semantics and an explicit expert-id tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inference.config import RouterConfig


class TopKRouter(nn.Module):
    """Chooses ``topk`` experts per token. ``forward`` returns ``(topk_ids, topk_weights)``:
    ids in descending selection-score order (int64 [T, k]) and the combine weights (fp32).
    Logits are fp32: exact products of the inputs summed in fp32, so routing does not
    depend on the activation dtype more than it must.

    Fast paths, off unless the engine turns them on (``MoEGPT.set_fused_small_ops``) and
    taken on CUDA tensors only: ``fused`` runs scores, top-k and weights as one kernel
    (``inference.kernels.router_topk``, the same routing as ``route`` but for the order of
    exact ties and near-ties within an ulp); ``half_logits`` computes the logits of a
    bf16 / fp16 model from its own operands with fp32 accumulation and fp32 output instead
    of copying the weight to fp32 every step (the same products, summed in fp32 in the
    GEMM's order; neither order is specified). The reference forward always takes the
    plain path."""

    def __init__(self, hidden_size: int, num_experts: int, topk: int, config: RouterConfig) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.topk = topk
        self.config = config
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.empty(num_experts)) if config.bias else None
        if config.use_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts))
        else:
            self.expert_bias = None
        self.fused = False
        self.half_logits = False

    def _half_gemm(self, x: torch.Tensor, reference: bool) -> bool:
        return (self.half_logits and not reference and x.is_cuda and x.dim() == 2
                and x.dtype == self.weight.dtype and x.dtype in (torch.bfloat16, torch.float16))

    def logits(self, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """fp32 router logits [T, E]."""
        if self._half_gemm(x, reference):
            out = torch.mm(x, self.weight.t(), out_dtype=torch.float32)
            return out if self.bias is None else out + self.bias.float()
        return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())

    def forward(self, x: torch.Tensor, reference: bool = False,
                routing_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``routing_out`` (the recorder's capture view, any integer dtype) holds the chosen
        ids on return: written by the fused kernel itself, or copied."""
        if self.fused and x.is_cuda and not reference:
            from inference.kernels.router_topk import router_topk
            if self._half_gemm(x, reference):
                logits = torch.mm(x, self.weight.t(), out_dtype=torch.float32)
            else:
                logits = F.linear(x.float(), self.weight.float())
            direct = routing_out is not None and routing_out.stride(-1) == 1
            ids, weights = router_topk(logits, self.topk, self.config, self.expert_bias, self.bias,
                                       routing_out if direct else None)
            if routing_out is not None and not direct:
                routing_out.copy_(ids)
            return ids, weights
        ids, weights = route(self.logits(x, reference), self.topk, self.config, self.expert_bias)
        if routing_out is not None:
            routing_out.copy_(ids)
        return ids, weights


def router_scores(logits: torch.Tensor, config: RouterConfig) -> torch.Tensor:
    """Per-expert scores the combine weights come from (softmax or sigmoid of the logits)."""
    return torch.softmax(logits, dim=-1) if config.score_function == "softmax" else torch.sigmoid(logits)


def combine_weights(scores: torch.Tensor, topk_ids: torch.Tensor, config: RouterConfig) -> torch.Tensor:
    """Weights of the chosen experts: their scores, renormalised if configured, scaled.
    Shared by routing and by replay (where the ids are given)."""
    weights = scores.gather(-1, topk_ids)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if config.score_function == "sigmoid" else 0.0))
    return weights * config.scaling_factor


def route(logits: torch.Tensor, topk: int, config: RouterConfig,
          expert_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing from fp32 logits [T, E]; a pure function so replay hooks and tests share it."""
    scores = router_scores(logits, config)
    selection = scores if expert_bias is None else scores + expert_bias.float()
    if config.num_groups > 1:
        per_group = config.group_score_topk or max(1, topk // config.topk_groups)
        selection = _mask_to_top_groups(selection, config.num_groups, config.topk_groups, per_group)
    topk_ids = torch.topk(selection, topk, dim=-1).indices
    return topk_ids, combine_weights(scores, topk_ids, config)


def _mask_to_top_groups(selection: torch.Tensor, num_groups: int, topk_groups: int, per_group: int) -> torch.Tensor:
    """Group-limited selection (megatron ``group_limited_topk``): score each group by the sum
    of its best ``per_group`` experts, keep the best groups, mask the rest."""
    t, e = selection.shape
    grouped = selection.view(t, num_groups, e // num_groups)
    group_scores = grouped.topk(per_group, dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(topk_groups, dim=-1).indices, 1.0)
    mask = keep.unsqueeze(-1).expand_as(grouped).reshape(t, e)
    return selection.masked_fill(mask == 0, float("-inf"))
