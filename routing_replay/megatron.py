"""Replay recorded routing in a megatron-core model through its ``RouterReplay`` hooks.

megatron-core (0.16) builds one ``RouterReplay`` per MoE layer when the model config has
``moe_enable_routing_replay=True``. Each takes a target ``[num_tokens, topk]`` in the
router's flattened ``[seq, batch]`` order (build it with ``routing_replay.replay_targets``)
and an action: ``REPLAY_FORWARD`` uses the current target; ``REPLAY_BACKWARD`` pops targets
in the order they were set (activation recompute re-runs the forward inside backward,
possibly after later micro-batches replaced the current target).

Traps this module closes:
- the instance registry ``RouterReplay.global_router_replay_instances`` is global across
  model builds, so ``RouterReplay.set_replay_data`` matches targets to the wrong layers once
  a second model was built. We take the instances from the model's own routers instead,
  and ``release_model`` removes a discarded model's instances from the registry;
- fused router kernels (``moe_router_fusion``) bypass replay: refused;
- replay only fixes the expert choice: probabilities are recomputed from current logits.

megatron-core is imported lazily; ``routing_replay`` never imports ``inference``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from routing_replay.replay_targets import check_targets, layer_count_mismatch, per_layer


class MegatronReplayError(RuntimeError):
    """The model cannot replay routing as asked; the message says why."""


def _router_modules(model: nn.Module) -> list[nn.Module]:
    from megatron.core.transformer.moe.router import TopKRouter
    return [m for m in model.modules() if isinstance(m, TopKRouter)]


def router_replay_instances(model: nn.Module) -> list[Any]:
    """The model's ``RouterReplay`` objects, one per MoE layer in depth order (module order
    is construction order). Raises MegatronReplayError when replay is off or bypassed."""
    routers = _router_modules(model)
    if not routers:
        raise MegatronReplayError("the model has no megatron-core TopKRouter (no MoE layer?)")
    config = routers[0].config
    if not config.moe_enable_routing_replay:
        raise MegatronReplayError("build the model with moe_enable_routing_replay=True")
    if getattr(config, "moe_router_fusion", False):
        raise MegatronReplayError("moe_router_fusion=True: the fused router kernel bypasses RouterReplay")
    return [r.router_replay for r in routers]


def release_model(model: nn.Module) -> None:
    """Remove the model's instances from megatron's global registry (call when discarding
    a model; otherwise registry-wide calls address dead layers as well)."""
    from megatron.core.transformer.moe.router_replay import RouterReplay
    mine = {id(r.router_replay) for r in _router_modules(model) if r.router_replay is not None}
    registry = RouterReplay.global_router_replay_instances
    registry[:] = [r for r in registry if id(r) not in mine]


class MegatronRoutingReplay:
    """Drives one model's RouterReplay instances for a training step. Invariant: between
    ``__enter__`` and ``__exit__`` each instance holds the targets pushed by this object, in
    push order; after ``__exit__`` (also on error) no instance of the model has a target, a
    backward queue or an action, so a later forward routes normally.

    Use: ``with MegatronRoutingReplay(model) as replay:`` then per micro-batch
    ``replay.forward(targets)`` before its forward, and ``replay.backward()`` before a
    backward that recomputes activations."""

    def __init__(self, model: nn.Module) -> None:
        self.instances = router_replay_instances(model)
        routers = _router_modules(model)
        self.num_experts = routers[0].config.num_moe_experts
        self.topk = routers[0].config.moe_router_topk

    def __enter__(self) -> "MegatronRoutingReplay":
        self._clear()
        return self

    def __exit__(self, *exc: object) -> None:
        self._clear()

    def _clear(self) -> None:
        for instance in self.instances:
            instance.clear_indices()
            instance.clear_router_replay_action()

    def forward(self, targets: np.ndarray | torch.Tensor | Sequence[torch.Tensor],
                device: torch.device | str | None = None) -> None:
        """Set one micro-batch's targets ``[num_moe_layers, num_tokens, topk]`` (or a list of
        per-layer tensors) and switch every router to REPLAY_FORWARD. Host targets are
        checked (distinct ids in range); targets already on an accelerator are trusted."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction
        is_list = isinstance(targets, (list, tuple))
        parts = list(targets) if is_list else [targets]
        if len(targets) != len(self.instances):   # before the id checks, which a 0 filler would fail first
            raise MegatronReplayError(layer_count_mismatch(len(targets), len(self.instances)))
        if all(isinstance(t, np.ndarray) or t.device.type == "cpu" for t in parts):
            # validated on the host only: checking device tensors would stall the step
            check_targets(np.stack([np.asarray(t) for t in parts]) if is_list else targets, self.num_experts, self.topk)
        layers = [torch.as_tensor(t).to(device) for t in parts] if is_list else per_layer(targets, device)
        for instance, target in zip(self.instances, layers):
            instance.set_target_indices(target.to(torch.int64))
            instance.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def backward(self) -> None:
        """Switch to REPLAY_BACKWARD: each recomputed forward pops the oldest pushed target."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction
        for instance in self.instances:
            instance.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)


@contextmanager
def replay_routing(model: nn.Module, targets: np.ndarray | torch.Tensor,
                   device: torch.device | str | None = None) -> Iterator[MegatronRoutingReplay]:
    """The common one-micro-batch case::

        with replay_routing(gpt, targets) as replay:
            loss = loss_fn(gpt(tokens, positions, mask))
            replay.backward()      # only needed with activation recompute
            loss.backward()
    """
    with MegatronRoutingReplay(model) as session:
        session.forward(targets, device)
        yield session
