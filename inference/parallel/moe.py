"""Expert-parallel MoE block: the router replicated, experts partitioned, one all-reduce.

Inside a replica every TP rank holds every token (the previous block's all-reduce left the
activations replicated), so dispatch needs no communication: each rank runs its own
experts on the tokens routed to them and the combine is one all-reduce over the replica,
which also sums the shared expert's row-parallel partials. On replicated tokens this is
the all-gather + reduce-scatter scheme with the all-gather already done (an all-reduce is
a reduce-scatter followed by an all-gather). TODO(GPU, issue 13): an all-to-all dispatcher
(only routed tokens move; pays off when EP spans nodes or replicas, not for NVLink TP) and
an expert map in the grouped kernel so pairs routed elsewhere cost nothing (today they run
through local expert 0 with weight zero, see ``localize_topk``).

Routing is recorded before any of this: ``routing_out`` receives the router's GLOBAL expert
ids, the same on every rank and the same as the single-process run.
"""

from __future__ import annotations

import torch
from torch import nn

from inference.config import ModelConfig
from inference.kernels.moe_grouped import moe_experts_reference
from inference.model.experts import oai_experts, oai_experts_reference, relu2_experts, relu2_experts_reference
from inference.model.moe import add_shared_expert, route
from inference.model.router import TopKRouter
from inference.parallel.groups import ParallelGroups
from inference.parallel.layers import ParallelRelu2MLP, ParallelSwiGLUMLP
from inference.parallel.layout import split_range
from inference.parallel.shards import TensorShard


def localize_topk(topk_ids: torch.Tensor, topk_weights: torch.Tensor, first: int,
                  count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k ids -> ids of this rank's ``count`` experts starting at ``first``. Pairs
    routed to other ranks become local expert 0 with weight 0: every expert kernel accepts
    them, and no host sync is needed to drop them (a sync-free graph-capturable shape)."""
    local = topk_ids - first
    mine = (local >= 0) & (local < count)
    return torch.where(mine, local, torch.zeros_like(local)), torch.where(mine, topk_weights,
                                                                            torch.zeros_like(topk_weights))


class ExpertParallelMoE(nn.Module):
    """One rank's MoE MLP. Parameter names match ``MoEMLP`` (``router.*``, ``w13``, ``w2``,
    ``b13``, ``b2``, ``shared_expert.*``, ``shared_expert_gate.weight``); the expert tensors
    hold this rank's ``num_local_experts`` experts from ``first_expert`` and its slice of
    their intermediate dimension (GPT-OSS's clamped SwiGLU is elementwise per intermediate
    unit, so it splits like SwiGLU; ``b2`` is added by expert-TP rank 0 only). relu^2 experts
    (Nemotron-H) hold up rows only in ``w13``, split the same way; the shared expert is
    row-parallel over the replica (gated SwiGLU or relu^2, the experts' activation), its
    partial sums added before the one all-reduce so it counts once.
    Invariant: the output equals ``MoEMLP``'s on every rank, and the top-k ids written to
    ``routing_out`` are global ids, identical on every rank of the replica."""

    def __init__(self, config: ModelConfig, groups: ParallelGroups, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        layout, c = groups.layout, groups.coords
        layout.validate_model(config)
        h, i, n = config.hidden_size, config.moe_intermediate_size, config.num_experts
        kw = dict(dtype=dtype, device=device)
        self.tp, self.full_shape, self.etp_rank = groups.tp, (n, h, i), c.etp_rank
        self.first_expert, stop = layout.expert_range(c.ep_rank, n)
        self.num_local_experts = stop - self.first_expert
        self.inter = split_range(i, layout.etp, c.etp_rank)
        local_i = self.inter[1] - self.inter[0]
        self.router = self._replicated_router(config, kw)
        self.activation = config.expert_activation
        self.swiglu_alpha, self.swiglu_limit = config.swiglu_alpha, config.swiglu_limit
        self.gated = config.expert_activation != "relu2"
        self.w13 = _param(self.num_local_experts, (2 if self.gated else 1) * local_i, h, **kw)
        self.w2 = _param(self.num_local_experts, h, local_i, **kw)
        self.b13 = _param(self.num_local_experts, 2 * local_i, **kw) if config.expert_bias else None
        self.b2 = _param(self.num_local_experts, h, **kw) if config.expert_bias else None
        self.shared_expert = None
        if config.shared_expert_intermediate_size > 0:
            mlp = ParallelSwiGLUMLP if self.gated else ParallelRelu2MLP
            self.shared_expert = mlp(h, config.shared_expert_intermediate_size, groups.tp, reduce=False, **kw)
        self.shared_expert_gate = (nn.Linear(h, 1, bias=False, **kw).requires_grad_(False)
                                   if self.shared_expert is not None and config.shared_expert_gate else None)
        self.experts_fn = moe_experts_reference

    @staticmethod
    def _replicated_router(config: ModelConfig, kw: dict) -> TopKRouter:
        router = TopKRouter(config.hidden_size, config.num_experts, config.topk, config.router)
        router.weight = _param(config.num_experts, config.hidden_size, **kw)
        if router.bias is not None:
            router.bias = _param(config.num_experts, **kw)
        if router.expert_bias is not None:
            router.expert_bias = torch.zeros(config.num_experts, device=kw["device"])   # fp32, as allocate_model
        return router

    @property
    def accepts_experts_fn(self) -> bool:
        """Whether ``experts_fn`` (SwiGLU, no bias) is what these experts compute."""
        return self.activation == "silu" and self.b13 is None

    def tensor_shards(self) -> dict[str, TensorShard]:
        n, h, i = self.full_shape
        experts = [(self.first_expert, self.first_expert + self.num_local_experts)]
        a, b = self.inter
        gate_up = [(a, b), (i + a, i + b)] if self.gated else [(a, b)]
        shards = {"w13": TensorShard.along((n, len(gate_up) * i, h), dim0=experts, dim1=gate_up),
                  "w2": TensorShard.along((n, h, i), dim0=experts, dim2=[(a, b)])}
        if self.b13 is not None:
            shards["b13"] = TensorShard.along((n, 2 * i), dim0=experts, dim1=gate_up)
            shards["b2"] = TensorShard.along((n, h), dim0=experts)
        return shards

    def forward(self, x: torch.Tensor, routing_out: torch.Tensor | None = None,
                forced_topk_ids: torch.Tensor | None = None, reference: bool = False) -> torch.Tensor:
        """Same contract as ``MoEMLP.forward``; ``reference`` selects the plain expert loop."""
        topk_ids, topk_weights = route(self.router, x, routing_out, forced_topk_ids, reference)
        local_ids, local_weights = localize_topk(topk_ids, topk_weights, self.first_expert, self.num_local_experts)
        y = add_shared_expert(self, x, self._experts(x, local_ids, local_weights, reference))
        return self.tp.all_reduce(y)

    def _experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, reference: bool) -> torch.Tensor:
        if self.activation == "relu2":
            return (relu2_experts_reference if reference else relu2_experts)(x, ids, weights, self.w13, self.w2)
        if self.activation != "swiglu_oai":
            return (moe_experts_reference if reference else self.experts_fn)(x, ids, weights, self.w13, self.w2)
        fn = oai_experts_reference if reference else oai_experts
        b13 = self.b13 if self.b13 is not None else x.new_zeros(self.w13.shape[:2])
        # The output bias once per expert: on the first of the ranks splitting its width.
        b2 = self.b2 if self.b2 is not None and self.etp_rank == 0 else x.new_zeros(self.w2.shape[:2])
        return fn(x, ids, weights, self.w13, self.w2, b13, b2, self.swiglu_alpha, self.swiglu_limit)


def _param(*shape: int, dtype: torch.dtype | None, device: torch.device | str | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)
