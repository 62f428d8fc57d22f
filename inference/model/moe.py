"""MoE MLP: router, routed experts, optional (gated) shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inference.config import ModelConfig
from inference.kernels.moe_grouped import moe_experts_reference
from inference.model.layers import SwiGLUMLP
from inference.model.router import TopKRouter


# The plain loop over experts (fp32, syncs on CUDA): the CPU path and the reference that
# the sync-free kernels are checked against.
experts_reference = moe_experts_reference


class MoEMLP(nn.Module):
    """Routed experts (+ optional shared expert). ``forward`` writes the router's top-k ids
    into ``routing_out`` when given, the capture point of the routing recorder."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, e = config.hidden_size, config.moe_intermediate_size, config.num_experts
        self.router = TopKRouter(h, e, config.topk, config.router)
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h))
        self.w2 = nn.Parameter(torch.empty(e, h, i))
        self.shared_expert = (SwiGLUMLP(h, config.shared_expert_intermediate_size)
                              if config.shared_expert_intermediate_size > 0 else None)
        self.shared_expert_gate = (nn.Linear(h, 1, bias=False)
                                   if self.shared_expert is not None and config.shared_expert_gate else None)
        self.experts_fn = experts_reference

    def forward(self, x: torch.Tensor, routing_out: torch.Tensor | None = None,
                forced_topk_ids: torch.Tensor | None = None, reference: bool = False) -> torch.Tensor:
        """``reference=True`` uses the plain expert loop whatever ``experts_fn`` the engine
        chose, so the full-sequence reference stays independent of the fast kernels."""
        topk_ids, topk_weights = self.router(x)
        if forced_topk_ids is not None:
            topk_ids, topk_weights = self._replay(x, forced_topk_ids)
        if routing_out is not None:
            routing_out.copy_(topk_ids)
        experts = experts_reference if reference else self.experts_fn
        y = experts(x, topk_ids, topk_weights, self.w13, self.w2)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        return y

    def _replay(self, x: torch.Tensor, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing replay: the expert choice is fixed; weights come from the current logits."""
        logits = F.linear(x.float(), self.router.weight.float())
        cfg = self.router.config
        scores = torch.softmax(logits, -1) if cfg.score_function == "softmax" else torch.sigmoid(logits)
        ids = topk_ids.to(torch.int64)
        weights = scores.gather(-1, ids)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return ids, weights * cfg.scaling_factor
