"""Small building blocks of the decoder: RMSNorm, SwiGLU MLP (rotary: ``rotary.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm; statistics in fp32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel on CUDA (the decode step is a long chain of small kernels);
        # it accumulates in fp32 for bf16/fp16 inputs.
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class SwiGLUMLP(nn.Module):
    """Dense SwiGLU MLP with gate and up projections stacked in one weight (gate rows first)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
