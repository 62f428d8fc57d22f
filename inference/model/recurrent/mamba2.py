"""Mamba2 token mixer (Nemotron-H's "M" layers).

The math is transformers' ``NemotronHMamba2Mixer`` (its torch path): one input projection
to z (gate), xBC and dt; a short causal conv + SiLU over xBC; the SSD recurrence with
A = -exp(A_log), dt = clamp(softplus(dt + dt_bias), dt_min, dt_max) and the D skip; a
group-wise RMS norm of y * silu(z); the output projection. Weight names follow
transformers' (``in_proj``, ``conv1d``, ``dt_bias``, ``A_log``, ``D``, ``norm``,
``out_proj``), so ``load_hf_weights`` is a plain copy.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from inference.model.recurrent.backend import AUTO, run_ssd
from inference.model.recurrent.conv1d import causal_conv1d_varlen
from inference.model.recurrent.metadata import RecurrentMetadata
from inference.model.recurrent.norms import GateThenGroupNorm
from inference.model.recurrent.ssd import discretize_dt
from inference.recurrent_config import Mamba2Config


class Mamba2Mixer(nn.Module):
    """Mamba2 over a packed step. Invariant: it keeps no per-request state of its own;
    each sequence's conv and SSM states live in the caller's slot tensors (``conv_states``
    [num_slots + 1, conv_dim, K - 1], ``ssm_states`` [num_slots + 1, num_heads, head_dim,
    state_size]) and ``forward`` advances them by exactly the tokens it is given."""

    def __init__(self, hidden_size: int, config: Mamba2Config) -> None:
        super().__init__()
        self.config = config
        c = config
        self.in_proj = nn.Linear(hidden_size, c.in_proj_size, bias=c.use_bias)
        self.conv_weight = nn.Parameter(torch.empty(c.conv_dim, c.conv_kernel))
        self.conv_bias = nn.Parameter(torch.zeros(c.conv_dim)) if c.use_conv_bias else None
        self.dt_bias = nn.Parameter(torch.ones(c.num_heads))
        self.A_log = nn.Parameter(torch.zeros(c.num_heads))
        self.D = nn.Parameter(torch.ones(c.num_heads))
        self.norm = GateThenGroupNorm(c.intermediate_size, c.intermediate_size // c.n_groups, c.norm_eps)
        self.out_proj = nn.Linear(c.intermediate_size, hidden_size, bias=c.use_bias)

    def forward(self, x: torch.Tensor, meta: RecurrentMetadata, conv_states: torch.Tensor,
                ssm_states: torch.Tensor, mode: str = AUTO) -> torch.Tensor:
        """x [num_tokens, hidden] -> [num_tokens, hidden]; ``mode`` as for GatedDeltaNet."""
        c = self.config
        x = x[: meta.num_tokens]
        tokens = x.shape[0]
        z, xbc, dt = self.in_proj(x).split([c.intermediate_size, c.conv_dim, c.num_heads], dim=-1)
        xbc = causal_conv1d_varlen(xbc, conv_states, self.conv_weight, self.conv_bias, meta)
        xs, b, cc = xbc.split([c.intermediate_size, c.n_groups * c.state_size, c.n_groups * c.state_size], dim=-1)
        y = run_ssd(xs.reshape(tokens, c.num_heads, c.head_dim),
                    discretize_dt(dt, self.dt_bias, c.dt_min, c.dt_max),
                    -self.A_log.float().exp(),
                    b.reshape(tokens, c.n_groups, c.state_size), cc.reshape(tokens, c.n_groups, c.state_size),
                    self.D, ssm_states, meta, mode, c.chunk_size)
        y = self.norm(y.reshape(tokens, c.intermediate_size), z)
        return self.out_proj(y.to(x.dtype))

    @torch.no_grad()
    def load_hf_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy a transformers ``NemotronHMamba2Mixer``'s weights (names relative to it)."""
        self.in_proj.weight.copy_(tensors["in_proj.weight"])
        self.conv_weight.copy_(tensors["conv1d.weight"].reshape(self.conv_weight.shape))
        optional = [("in_proj.bias", self.in_proj.bias), ("conv1d.bias", self.conv_bias),
                    ("out_proj.bias", self.out_proj.bias)]
        for name, param in optional:
            if (param is None) != (name not in tensors):
                raise KeyError(f"{name}: the checkpoint and Mamba2Config (use_bias / use_conv_bias) disagree")
            if param is not None:
                param.copy_(tensors[name])
        for name in ("dt_bias", "A_log", "D"):
            getattr(self, name).copy_(tensors[name])
        self.norm.weight.copy_(tensors["norm.weight"])
        self.out_proj.weight.copy_(tensors["out_proj.weight"])
