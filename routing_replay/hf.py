"""Replay recorded routing inside a Hugging Face transformers MoE model's forward.

Supported: transformers >= 5, whose sparse MoE blocks call a router module (``block.gate``,
or ``block.router`` for GPT-OSS) returning ``(router_logits, top_k_weights, top_k_index)``:
``MixtralTopKRouter``, ``Qwen2MoeTopKRouter``, ``Qwen3MoeTopKRouter``, ``OlmoeTopKRouter``,
``DeepseekV3TopkRouter`` (also Kimi-K2 / Moonlight), ``Glm4MoeTopkRouter``,
``GptOssTopKRouter``, ``MiniMaxM2TopKRouter``, and the hybrids' ``Qwen3NextTopKRouter``,
``Qwen3_5MoeTopKRouter`` and ``NemotronHTopkRouter`` (whose MoE block is a layer's
``mixer``). transformers 4.x (a plain ``nn.Linear`` gate with routing inlined in the block)
is refused with that reason. Layers without MoE (recurrent, attention-only or dense blocks)
have no router and take no targets.

While ``replay_routing`` is active each router returns the recorded expert ids; the combine
weights come from the current logits exactly as that router computes them (softmax over
all experts renormalised, sigmoid scores without the selection bias, softmax over the
chosen logits for GPT-OSS, the routed scaling factor): the R3 semantics, so gradients flow
through the router as in normal training. ``router_logits`` (``output_router_logits=True``,
aux loss) are the current logits, unchanged.

Targets are ``[num_moe_layers, batch * seq, topk]`` in HF's flattened ``[batch, seq]``
order: ``replay_targets.padded_targets(..., order="bs")``.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import MappingProxyType
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from routing_replay.replay_targets import check_targets, layer_count_mismatch, per_layer

Weights = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _softmax_weights(always_normalise: bool, keep_fp32: bool) -> Weights:
    """Mixtral / Qwen-MoE / OLMoE: softmax over all experts, gathered, renormalised when the
    router renormalises (Mixtral always, the others with ``norm_topk_prob``)."""
    def weights(router, hidden, ids):
        logits = F.linear(hidden, router.weight)
        w = torch.softmax(logits, dim=-1, dtype=torch.float).gather(1, ids)
        if always_normalise or getattr(router, "norm_topk_prob", False):
            w = w / w.sum(dim=-1, keepdim=True)
        return logits, w if keep_fp32 else w.to(logits.dtype)
    return weights


def _sigmoid_scaled_weights(router, hidden, ids):
    """DeepSeek-V3 / GLM-4.5: sigmoid scores (the selection bias picks experts only), fp32."""
    logits = F.linear(hidden.float(), router.weight.float())
    w = logits.sigmoid().gather(1, ids)
    if router.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return logits, w * router.routed_scaling_factor


def _topk_softmax_weights(router, hidden, ids):
    """GPT-OSS: softmax over the chosen experts' (biased) logits."""
    logits = F.linear(hidden, router.weight, router.bias)
    return logits, torch.softmax(logits.gather(1, ids), dim=1, dtype=logits.dtype)


def _sigmoid_normalised_weights(router, hidden, ids):
    """MiniMax-M2: sigmoid scores of the chosen experts, always renormalised."""
    logits = F.linear(hidden.to(router.weight.dtype), router.weight)
    w = logits.float().sigmoid().gather(1, ids)
    return logits, w / w.sum(dim=-1, keepdim=True)


SUPPORTED_ROUTERS: Mapping[str, Weights] = MappingProxyType({
    "MixtralTopKRouter": _softmax_weights(True, keep_fp32=True),   # Mixtral returns fp32 weights
    "Qwen2MoeTopKRouter": _softmax_weights(False, keep_fp32=False),
    "Qwen3MoeTopKRouter": _softmax_weights(False, keep_fp32=False),
    "OlmoeTopKRouter": _softmax_weights(False, keep_fp32=False),
    "DeepseekV3TopkRouter": _sigmoid_scaled_weights,
    "Glm4MoeTopkRouter": _sigmoid_scaled_weights,
    "GptOssTopKRouter": _topk_softmax_weights,
    "MiniMaxM2TopKRouter": _sigmoid_normalised_weights,
    "Qwen3NextTopKRouter": _softmax_weights(False, keep_fp32=False),
    "Qwen3_5MoeTopKRouter": _softmax_weights(True, keep_fp32=False),    # always renormalises
    "NemotronHTopkRouter": _sigmoid_scaled_weights,
})


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
        # Nemotron-H names every block's module ``mixer``; only its MoE blocks hold experts
        is_moe_mixer = name.endswith("mixer") and hasattr(module, "experts")
        if not (name.endswith(("mlp", "block_sparse_moe")) or is_moe_mixer):
            continue
        for attr in ("gate", "router"):
            router = getattr(module, attr, None)
            if router is None:
                continue
            if type(router).__name__ in SUPPORTED_ROUTERS:
                routers.append(router)
            else:
                unsupported.append(f"{name}.{attr} ({type(router).__name__})")
    if unsupported:
        raise HFReplayError(f"unsupported MoE routers {unsupported}; supported: {sorted(SUPPORTED_ROUTERS)}")
    if not routers:
        raise HFReplayError(f"{type(model).__name__} has no supported MoE router "
                            f"(supported: {sorted(SUPPORTED_ROUTERS)})")
    return routers


def _replay_forward(router: nn.Module, target: torch.Tensor) -> Callable[..., tuple]:
    weights_of = SUPPORTED_ROUTERS[type(router).__name__]

    def forward(hidden_states: torch.Tensor, *unused) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # ``unused``: MiniMax-M2 passes its selection bias, which replay does not need.
        hidden_states = hidden_states.reshape(-1, router.hidden_dim)
        if hidden_states.shape[0] != target.shape[0]:
            raise HFReplayError(f"router saw {hidden_states.shape[0]} tokens, replay targets have "
                                f"{target.shape[0]} (targets cover one whole [batch, seq] forward; "
                                "cached generation is not supported)")
        ids = target.to(hidden_states.device)
        logits, weights = weights_of(router, hidden_states, ids)
        return logits, weights, ids

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
