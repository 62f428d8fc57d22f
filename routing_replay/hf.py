"""Replay recorded routing inside a Hugging Face transformers MoE model's forward.

Supported: transformers >= 5, whose sparse MoE blocks call a router module ``block.gate``
returning ``(router_logits, top_k_weights, top_k_index)``: ``MixtralTopKRouter``,
``Qwen2MoeTopKRouter``, ``Qwen3MoeTopKRouter``, ``OlmoeTopKRouter``. transformers 4.x
(a plain ``nn.Linear`` gate with routing inlined in the block) is refused with that reason.

While ``replay_routing`` is active each router returns the recorded expert ids; the combine
weights come from the current logits exactly as the router computes them (softmax over all
experts, gathered at the replayed ids, renormalised when the router renormalises): the R3
semantics, so gradients flow through the router as in normal training. ``router_logits``
(``output_router_logits=True``, aux loss) are the current logits, unchanged.

Targets are ``[num_moe_layers, batch * seq, topk]`` in HF's flattened ``[batch, seq]``
order: ``replay_targets.padded_targets(..., order="bs")``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from routing_replay.replay_targets import check_targets, layer_count_mismatch, per_layer

# router class -> renormalises top-k always (Mixtral) or only with ``norm_topk_prob``.
SUPPORTED_ROUTERS = {
    "MixtralTopKRouter": True,
    "Qwen2MoeTopKRouter": False,
    "Qwen3MoeTopKRouter": False,
    "OlmoeTopKRouter": False,
}


class HFReplayError(RuntimeError):
    """The model cannot replay routing; the message names the version or class."""


def moe_routers(model: nn.Module) -> list[nn.Module]:
    """The model's router modules, one per MoE layer in depth order; raises HFReplayError
    for an unsupported transformers version or MoE block."""
    import transformers
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise HFReplayError(f"transformers {transformers.__version__}: routing replay needs transformers >= 5 "
                            "(router modules returning top-k ids); 4.x inlines routing in the MoE block")
    routers, unsupported = [], []
    for name, module in model.named_modules():
        gate = getattr(module, "gate", None)
        if gate is None or not name.endswith(("mlp", "block_sparse_moe")):
            continue
        if type(gate).__name__ in SUPPORTED_ROUTERS:
            routers.append(gate)
        else:
            unsupported.append(f"{name}.gate ({type(gate).__name__})")
    if unsupported:
        raise HFReplayError(f"unsupported MoE routers {unsupported}; supported: {sorted(SUPPORTED_ROUTERS)}")
    if not routers:
        raise HFReplayError(f"{type(model).__name__} has no supported MoE router "
                            f"(supported: {sorted(SUPPORTED_ROUTERS)})")
    return routers


def _replay_forward(router: nn.Module, target: torch.Tensor) -> Callable[[torch.Tensor], tuple]:
    always_normalise = SUPPORTED_ROUTERS[type(router).__name__]
    keep_fp32 = type(router).__name__ == "MixtralTopKRouter"   # Mixtral returns fp32 weights

    def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, router.hidden_dim)
        if hidden_states.shape[0] != target.shape[0]:
            raise HFReplayError(f"router saw {hidden_states.shape[0]} tokens, replay targets have "
                                f"{target.shape[0]} (targets cover one whole [batch, seq] forward; "
                                "cached generation is not supported)")
        logits = F.linear(hidden_states, router.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        ids = target.to(logits.device)
        weights = probs.gather(1, ids)
        if always_normalise or getattr(router, "norm_topk_prob", False):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights if keep_fp32 else weights.to(logits.dtype), ids

    return forward


@contextmanager
def replay_routing(model: nn.Module, targets: np.ndarray | torch.Tensor) -> Iterator[list[nn.Module]]:
    """Force every MoE layer of ``model`` to route as ``targets`` says (see the module
    docstring); yields the routers. The routers' own ``forward`` is restored on exit, also
    on error. Invariant: no router stays patched outside the ``with`` block."""
    routers = moe_routers(model)
    layers = per_layer(targets)
    if len(layers) != len(routers):
        raise HFReplayError(layer_count_mismatch(len(layers), len(routers)))
    if not isinstance(targets, torch.Tensor) or targets.device.type == "cpu":   # no device sync
        check_targets(targets, routers[0].num_experts, routers[0].top_k)
    try:
        for router, target in zip(routers, layers):
            router.forward = _replay_forward(router, target)
        yield routers
    finally:
        for router in routers:
            router.__dict__.pop("forward", None)
