"""MoE MLP: router, routed experts (SwiGLU, GPT-OSS's clamped SwiGLU or Nemotron-H's relu^2),
optional (gated) shared expert."""

from __future__ import annotations

import torch
from torch import nn

from inference.config import ModelConfig
from inference.kernels.moe_grouped import moe_experts_reference
from inference.model.experts import oai_experts, oai_experts_reference, relu2_experts, relu2_experts_reference
from inference.model.layers import build_dense_mlp
from inference.model.router import TopKRouter, combine_weights, router_scores


# The plain loop over experts (fp32, syncs on CUDA): the CPU path and the reference that
# the sync-free kernels are checked against.
experts_reference = moe_experts_reference


class MoEMLP(nn.Module):
    """Routed experts (+ optional shared expert). ``forward`` writes the router's top-k ids
    into ``routing_out`` when given, the capture point of the routing recorder.
    ``experts_fn`` (the engine's choice of kernel) applies to SwiGLU experts; GPT-OSS's
    biased clamped experts and relu^2 experts (``w13`` then holds the up rows only) choose
    their sync-free path by device themselves. The shared expert has the experts'
    activation (non-gated for relu^2)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, e = config.hidden_size, config.moe_intermediate_size, config.num_experts
        self.router = TopKRouter(h, e, config.topk, config.router)
        gated = config.expert_activation != "relu2"
        self.w13 = nn.Parameter(torch.empty(e, (2 if gated else 1) * i, h))
        self.w2 = nn.Parameter(torch.empty(e, h, i))
        self.activation = config.expert_activation
        self.swiglu_alpha, self.swiglu_limit = config.swiglu_alpha, config.swiglu_limit
        if config.expert_bias:
            self.b13 = nn.Parameter(torch.empty(e, 2 * i))
            self.b2 = nn.Parameter(torch.empty(e, h))
        else:
            self.b13 = self.b2 = None
        self.shared_expert = (build_dense_mlp(config, config.shared_expert_intermediate_size)
                              if config.shared_expert_intermediate_size > 0 else None)
        self.shared_expert_gate = (nn.Linear(h, 1, bias=False)
                                   if self.shared_expert is not None and config.shared_expert_gate else None)
        self.experts_fn = experts_reference

    @property
    def accepts_experts_fn(self) -> bool:
        """Whether ``experts_fn`` (SwiGLU, no bias) is what this layer's experts compute."""
        return self.activation == "silu" and self.b13 is None

    def forward(self, x: torch.Tensor, routing_out: torch.Tensor | None = None,
                forced_topk_ids: torch.Tensor | None = None, reference: bool = False) -> torch.Tensor:
        """``reference=True`` uses the plain expert loop whatever ``experts_fn`` the engine
        chose, so the full-sequence reference stays independent of the fast kernels."""
        topk_ids, topk_weights = route(self.router, x, routing_out, forced_topk_ids, reference)
        return add_shared_expert(self, x, self._experts(x, topk_ids, topk_weights, reference))


    def _experts(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 reference: bool) -> torch.Tensor:
        if self.activation == "swiglu_oai":
            fn = oai_experts_reference if reference else oai_experts
            b13 = self.b13 if self.b13 is not None else x.new_zeros(self.w13.shape[:2])
            b2 = self.b2 if self.b2 is not None else x.new_zeros(self.w2.shape[:2])
            return fn(x, topk_ids, topk_weights, self.w13, self.w2, b13, b2, self.swiglu_alpha, self.swiglu_limit)
        if self.activation == "relu2":
            fn = relu2_experts_reference if reference else relu2_experts
            return fn(x, topk_ids, topk_weights, self.w13, self.w2)
        fn = experts_reference if reference else self.experts_fn
        return fn(x, topk_ids, topk_weights, self.w13, self.w2)


def route(router: TopKRouter, x: torch.Tensor, routing_out: torch.Tensor | None,
          forced_topk_ids: torch.Tensor | None, reference: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(global top-k ids, combine weights) of a MoE block, the ids also in ``routing_out``
    when given: the router's choice (the router writes ``routing_out`` itself), or under
    replay the forced ids, with weights from this forward's logits. The unsharded and the
    expert-parallel block both route through it."""
    if forced_topk_ids is None:
        return router(x, reference, routing_out)
    ids = forced_topk_ids.to(torch.int64)
    scores = router_scores(router.logits(x, reference), router.config)
    if routing_out is not None:
        routing_out.copy_(ids)
    return ids, combine_weights(scores, ids, router.config)


def add_shared_expert(block: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` plus ``block``'s (optionally gated) shared expert on ``x``, if it has one."""
    if block.shared_expert is None:
        return y
    shared = block.shared_expert(x)
    if block.shared_expert_gate is not None:
        shared = torch.sigmoid(block.shared_expert_gate(x)) * shared
    return y + shared
