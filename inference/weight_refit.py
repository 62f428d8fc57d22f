"""Copying new weights into a live model in place (``LLMEngine.update_weights``).

In place means the parameters keep their storage: CUDA graphs that captured their addresses
stay valid, and nothing is reallocated. Every name, shape and value is checked before the
first copy, so a bad update changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

MAX_NAMES_IN_ERROR = 8


def refit_targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor an update may write: parameters under all their names (a tied
    ``lm_head.weight`` is ``embed_tokens.weight``) and the routers' ``expert_bias`` buffers."""
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update((name, buf) for name, buf in model.named_buffers() if name.endswith("expert_bias"))
    return targets


def _shard_targets(model: nn.Module) -> dict[str, tuple[torch.Tensor, object]]:
    """``refit_targets`` of a tensor-parallel model, each with this rank's ``TensorShard``."""
    from inference.parallel.shards import TensorShard, module_shards
    modules = dict(model.named_modules(remove_duplicate=False))
    out = {}
    for name, tensor in refit_targets(model).items():
        owner, _, leaf = name.rpartition(".")
        out[name] = (tensor, module_shards(modules[owner]).get(leaf) or TensorShard.replicated(tensor.shape))
    return out


def copy_named_tensors(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Copy ``(name, tensor)`` pairs into ``model``'s tensors (casting dtype and device);
    returns how many were copied. Raises ValueError naming every unknown name, shape
    mismatch, non-finite tensor or duplicate, before copying anything. For a tensor-parallel
    model (``model.parallel``) the tensors are the full (unsharded) ones and each rank copies
    its shard of them."""
    if getattr(model, "parallel", None) is None:
        targets = {name: (t, None) for name, t in refit_targets(model).items()}
    else:
        targets = _shard_targets(model)
    items = list(named_tensors)
    problems, seen = [], set()
    for name, tensor in items:
        target, shard = targets.get(name, (None, None))
        full_shape = tuple(target.shape) if shard is None and target is not None else getattr(shard, "full_shape", None)
        if target is None:
            problems.append(f"unknown parameter {name!r}")
        elif not isinstance(tensor, torch.Tensor):
            problems.append(f"{name}: expected a tensor, got {type(tensor).__name__}")
        elif tuple(tensor.shape) != full_shape:
            problems.append(f"{name}: shape {tuple(tensor.shape)} != {full_shape}")
        elif tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            problems.append(f"{name}: has NaN or inf values")
        if name in seen:
            problems.append(f"{name}: given twice")
        seen.add(name)
    if problems:
        shown = "; ".join(problems[:MAX_NAMES_IN_ERROR])
        more = f" (and {len(problems) - MAX_NAMES_IN_ERROR} more)" if len(problems) > MAX_NAMES_IN_ERROR else ""
        raise ValueError(f"update_weights: {shown}{more}; names are the engine model's named_parameters()")
    with torch.no_grad():
        for name, tensor in items:
            target, shard = targets[name]
            if shard is not None:
                tensor = shard.take(tensor)
            target.copy_(tensor, non_blocking=tensor.device.type == target.device.type)
    return len(items)
