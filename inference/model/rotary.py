"""Rotary position embedding: neox style (rotate halves), optional partial rotary and YaRN.

Checkpoints with interleaved rotary pairs (DeepSeek's ``rope_interleave``) are turned into
this layout when loaded (the projection rows are permuted), so one style serves all.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from inference.config import RopeScaling


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context extended ``scale`` times."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(dim: int, theta: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim / 2], cos/sin factor), computed as transformers'
    ``_compute_yarn_parameters`` computes them (fp32), so angles agree bit for bit."""
    if s.attention_factor:
        factor = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        factor = yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    else:
        factor = yarn_mscale(s.factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp needs a non-empty range
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (s.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(factor)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary tables over ``dim`` dimensions (the rotated part of a head). The
    cos/sin table covers every position up to ``max_positions`` and is a buffer, so it moves
    with the model and CUDA graphs can index it. With YaRN the tables carry its cos/sin
    factor, as transformers applies it."""

    def __init__(self, dim: int, max_positions: int, theta: float, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        if scaling is None:
            inv_freq, factor = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)), 1.0
        else:
            inv_freq, factor = yarn_inv_freq(dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq.double())
        self.register_buffer("cos", (freqs.cos() * factor).float(), persistent=False)
        self.register_buffer("sin", (freqs.sin() * factor).float(), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin rows for ``positions`` ([T] int64), shaped to broadcast over heads.
        Looked up once per forward and shared by every layer."""
        return self.cos.index_select(0, positions).unsqueeze(1), self.sin.index_select(0, positions).unsqueeze(1)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]; positions: [T] int64."""
        return apply_rotary(x, *self.tables(positions))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves of the first ``2 * cos.shape[-1]`` dims of ``x`` [T, heads, d] in fp32
    (partial rotary leaves the rest as is)."""
    rot = 2 * cos.shape[-1]
    x1, x2 = x[..., :rot].float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return rotated if rot == x.shape[-1] else torch.cat((rotated, x[..., rot:]), dim=-1)
