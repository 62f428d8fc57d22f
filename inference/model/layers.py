"""Small building blocks of the decoder: RMSNorm (plain or zero-centred), dense MLPs
(SwiGLU, relu^2) and the factories that pick them from the config (rotary: ``rotary.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inference.config import ModelConfig


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

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, norm(s)) with s = x + residual: one kernel on CUDA (``add_rms_norm``, the same
        values as the add and ``forward``), the two torch ops elsewhere."""
        if x.is_cuda and x.dim() == 2:
            from inference.kernels.norm_rotary import add_rms_norm
            return add_rms_norm(x, residual, self.weight, self.eps)
        s = x + residual
        return s, self(s)


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm whose weight is stored zero-centred (Qwen3-Next / Qwen3.5): ``rmsnorm(x) *
    (1 + weight)``, all in fp32, cast to x's dtype at the end (transformers' order, which
    keeps ``1 + w`` exact in bf16 models). Invariant: a zero weight is the identity scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


def build_norm(config: ModelConfig, dim: int) -> nn.Module:
    """The RMSNorm kind the config's decoder norms use."""
    if config.zero_centered_norms:
        return ZeroCenteredRMSNorm(dim, config.rms_norm_eps)
    return RMSNorm(dim, config.rms_norm_eps)


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


class Relu2MLP(nn.Module):
    """Non-gated MLP ``down(relu(up(x))^2)`` (Nemotron-H's dense layers and shared experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(x)).square())


def build_dense_mlp(config: ModelConfig, intermediate_size: int) -> nn.Module:
    """A dense MLP of the config's activation (relu^2 models have no gated MLP anywhere)."""
    if config.expert_activation == "relu2":
        return Relu2MLP(config.hidden_size, intermediate_size)
    return SwiGLUMLP(config.hidden_size, intermediate_size)
