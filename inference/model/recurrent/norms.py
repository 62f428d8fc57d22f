"""Gated RMS norms at the output of recurrent mixers (transformers' exact order of casts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NormThenGate(nn.Module):
    """Gated DeltaNet's output norm: ``weight * rmsnorm(x) * silu(gate)`` over the last
    dim (one value head), statistics and gate in fp32, result in x's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return (self.weight * normed * F.silu(gate.float())).to(x.dtype)


class GateThenGroupNorm(nn.Module):
    """Mamba2's output norm (norm_before_gate=False): ``weight * rmsnorm_g(x * silu(gate))``
    where the RMS statistics are taken over each of ``dim // group_size`` groups."""

    def __init__(self, dim: int, group_size: int, eps: float) -> None:
        super().__init__()
        if dim % group_size:
            raise ValueError(f"norm dim {dim} must be a multiple of group_size {group_size}")
        self.eps = eps
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = x.float() * F.silu(gate.float())
        grouped = h.view(*h.shape[:-1], -1, self.group_size)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * grouped.view(h.shape).to(x.dtype)
