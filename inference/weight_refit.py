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


def copy_named_tensors(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Copy ``(name, tensor)`` pairs into ``model``'s tensors (casting dtype and device);
    returns how many were copied. Raises ValueError naming every unknown name, shape
    mismatch, non-finite tensor or duplicate, before copying anything."""
    targets = refit_targets(model)
    items = list(named_tensors)
    problems, seen = [], set()
    for name, tensor in items:
        target = targets.get(name)
        if target is None:
            problems.append(f"unknown parameter {name!r}")
        elif not isinstance(tensor, torch.Tensor):
            problems.append(f"{name}: expected a tensor, got {type(tensor).__name__}")
        elif tuple(tensor.shape) != tuple(target.shape):
            problems.append(f"{name}: shape {tuple(tensor.shape)} != {tuple(target.shape)}")
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
            targets[name].copy_(tensor, non_blocking=tensor.device.type == targets[name].device.type)
    return len(items)
