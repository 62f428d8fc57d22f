"""Compact integer dtypes for expert ids.

Routing is stored for every token of every MoE layer, so the element size dominates its
memory and transfer cost: one byte per id covers every model with at most 256 experts.
"""

from __future__ import annotations

import numpy as np
import torch

# (largest num_experts the dtype can index, dtype), smallest first. Ids run 0..num_experts-1.
_ROUTING_DTYPES: tuple[tuple[int, torch.dtype], ...] = (
    (256, torch.uint8),
    (32767, torch.int16),
    (2**31 - 1, torch.int32),
)

_NUMPY_OF_TORCH: dict[torch.dtype, np.dtype] = {
    torch.uint8: np.dtype(np.uint8),
    torch.int8: np.dtype(np.int8),
    torch.int16: np.dtype(np.int16),
    torch.int32: np.dtype(np.int32),
    torch.int64: np.dtype(np.int64),
}


def routing_dtype(num_experts: int) -> torch.dtype:
    """Smallest dtype that holds every expert id of a model with `num_experts` experts.

    uint8 up to 256 experts, int16 up to 32767, int32 beyond.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"num_experts must be an int, got {type(num_experts).__name__}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    for max_experts, dtype in _ROUTING_DTYPES:
        if num_experts <= max_experts:
            return dtype
    raise ValueError(f"num_experts={num_experts} does not fit in int32 expert ids")


def numpy_dtype(torch_dtype: torch.dtype) -> np.dtype:
    """The numpy dtype with the same layout as an integer torch dtype."""
    try:
        return _NUMPY_OF_TORCH[torch_dtype]
    except KeyError:
        raise ValueError(f"no numpy equivalent for routing dtype {torch_dtype}") from None
