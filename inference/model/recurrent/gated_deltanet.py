"""Gated DeltaNet token mixer (Qwen3-Next / Qwen3.5 linear-attention layers).

The math is transformers' ``Qwen3NextGatedDeltaNet`` / ``Qwen3_5MoeGatedDeltaNet``: one
input projection to q, k, v, z (output gate), b (-> beta = sigmoid(b)) and a (-> decay
g = -exp(A_log) * softplus(a + dt_bias)); a short causal conv + SiLU over q, k, v; the
gated delta rule with L2-normalised q, k; a per-head RMS norm gated by silu(z); the
output projection. Our fused projection stacks rows as [q | k | v | z | b | a] (Qwen3.5's
separate projections in that order); ``load_hf_weights`` also accepts Qwen3-Next's
per-key-head interleaved ``in_proj_qkvz`` / ``in_proj_ba``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from inference.model.recurrent.backend import AUTO, run_gated_delta_rule
from inference.model.recurrent.conv1d import causal_conv1d_varlen
from inference.model.recurrent.metadata import RecurrentMetadata
from inference.model.recurrent.norms import NormThenGate
from inference.recurrent_config import GatedDeltaNetConfig


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet over a packed step. Invariant: it keeps no per-request state of its
    own; each sequence's conv and recurrent states live in the caller's slot tensors
    (``conv_states`` [num_slots + 1, conv_dim, K - 1], ``recurrent_states``
    [num_slots + 1, num_v_heads, head_k_dim, head_v_dim]) and ``forward`` advances them by
    exactly the tokens it is given."""

    def __init__(self, hidden_size: int, config: GatedDeltaNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.in_proj = nn.Linear(hidden_size, c.in_proj_size, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(c.conv_dim, c.conv_kernel))
        self.dt_bias = nn.Parameter(torch.ones(c.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(c.num_v_heads))
        self.norm = NormThenGate(c.head_v_dim, c.norm_eps)
        self.out_proj = nn.Linear(c.value_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, meta: RecurrentMetadata, conv_states: torch.Tensor,
                recurrent_states: torch.Tensor, mode: str = AUTO) -> torch.Tensor:
        """x [num_tokens, hidden] -> [num_tokens, hidden]. ``mode``: "auto" (GPU kernels on
        CUDA when available, else chunked), "chunked" or "recurrent" (the torch forms)."""
        c = self.config
        x = x[: meta.num_tokens]
        tokens = x.shape[0]
        qkv, z, b, a = self.in_proj(x).split([c.conv_dim, c.value_dim, c.num_v_heads, c.num_v_heads], dim=-1)
        qkv = causal_conv1d_varlen(qkv, conv_states, self.conv_weight, None, meta)
        q, k, v = qkv.split([c.key_dim, c.key_dim, c.value_dim], dim=-1)
        q = q.reshape(tokens, c.num_k_heads, c.head_k_dim)
        k = k.reshape(tokens, c.num_k_heads, c.head_k_dim)
        v = v.reshape(tokens, c.num_v_heads, c.head_v_dim)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        o = run_gated_delta_rule(q, k, v, g, beta, recurrent_states, meta, mode, c.chunk_size)
        o = self.norm(o, z.reshape(tokens, c.num_v_heads, c.head_v_dim))
        return self.out_proj(o.reshape(tokens, c.value_dim))

    @torch.no_grad()
    def load_hf_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy a transformers layer's weights (names relative to the layer, e.g.
        ``in_proj_qkv.weight``); Qwen3.5 and Qwen3-Next projection layouts both work."""
        self.in_proj.weight.copy_(fused_in_proj_from_hf(tensors, self.config))
        self.conv_weight.copy_(tensors["conv1d.weight"].reshape(self.conv_weight.shape))
        for name in ("dt_bias", "A_log"):
            getattr(self, name).copy_(tensors[name])
        self.norm.weight.copy_(tensors["norm.weight"])
        self.out_proj.weight.copy_(tensors["out_proj.weight"])


def fused_in_proj_from_hf(tensors: Mapping[str, torch.Tensor], config: GatedDeltaNetConfig) -> torch.Tensor:
    """Our [q | k | v | z | b | a] input projection from Qwen3.5's four projections or
    from Qwen3-Next's two key-head-interleaved ones."""
    if "in_proj_qkv.weight" in tensors:
        return torch.cat([tensors[f"in_proj_{n}.weight"] for n in ("qkv", "z", "b", "a")], dim=0)
    if "in_proj_qkvz.weight" not in tensors or "in_proj_ba.weight" not in tensors:
        raise KeyError("expected in_proj_qkv/z/b/a (Qwen3.5) or in_proj_qkvz/ba (Qwen3-Next) weights, got "
                       f"{sorted(k for k in tensors if k.startswith('in_proj'))}")
    c = config
    ratio = c.num_v_heads // c.num_k_heads
    qkvz = tensors["in_proj_qkvz.weight"]
    hidden = qkvz.shape[-1]
    # Qwen3-Next stores, per key head, [q (Dk), k (Dk), v (ratio*Dv), z (ratio*Dv)] rows.
    per_head = qkvz.reshape(c.num_k_heads, 2 * c.head_k_dim + 2 * ratio * c.head_v_dim, hidden)
    q, k, v, z = per_head.split([c.head_k_dim, c.head_k_dim, ratio * c.head_v_dim, ratio * c.head_v_dim], dim=1)
    b, a = tensors["in_proj_ba.weight"].reshape(c.num_k_heads, 2 * ratio, hidden).split([ratio, ratio], dim=1)
    return torch.cat([t.reshape(-1, hidden) for t in (q, k, v, z, b, a)], dim=0)
