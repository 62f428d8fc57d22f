"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2, Moonlight).

Paged path: the KV cache holds, per token, the normalised latent ``c`` (kv_lora_rank) and
the rotary key ``k_rope`` shared by all heads. Keys and values are never materialised: the
key up-projection is absorbed into the query (``q_nope @ W_UK``) and the value
up-projection applied after attention (``o_latent @ W_UV``), so attention itself is
multi-query attention over ``[c; k_rope]`` rows. Reference path: the same weights expanded
into per-head keys and values, as transformers computes it.
"""

from __future__ import annotations

import torch
from torch import nn

from inference.config import ModelConfig
from inference.model.attention.reference import full_attention
from inference.model.context import ForwardContext
from inference.model.layers import RMSNorm
from inference.model.rotary import apply_rotary, yarn_mscale
from inference.paged_attention import write_rows

RotaryTables = tuple[torch.Tensor, torch.Tensor]


def mla_softmax_scale(config: ModelConfig) -> float:
    """1/sqrt(qk_head_dim), times YaRN's mscale(mscale_all_dim)^2 as DeepSeek applies it."""
    scale = config.mla.qk_head_dim ** -0.5
    s = config.rope_scaling
    if s is not None and s.mscale_all_dim:
        scale *= yarn_mscale(s.factor, s.mscale_all_dim) ** 2
    return scale


class MLAttention(nn.Module):
    """Parameters are named as in transformers' ``DeepseekV3Attention``. Invariant: the
    paged forward writes exactly ``[kv_a_layernorm(c); rope(k_rope)]`` per token, the
    ``cache_dim`` elements ``KVCache`` allocates per token and layer."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        m = config.mla
        h, heads = config.hidden_size, config.num_heads
        self.layer_index = layer_index
        self.num_heads = heads
        self.nope, self.rope, self.v_dim, self.latent = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
        self.qk_dim = m.qk_head_dim
        self.scale = mla_softmax_scale(config)
        if m.q_lora_rank:
            self.q_a_proj = nn.Linear(h, m.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(m.q_lora_rank, heads * self.qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(h, heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.latent + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.latent, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.latent, heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_dim, h, bias=False)

    def project(self, x: torch.Tensor, rope: RotaryTables):
        """(q_nope [T, H, nope], q_rope [T, H, R], latent [T, L], k_rope [T, R]), rotary applied."""
        t = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if hasattr(self, "q_b_proj") else self.q_proj(x)
        q_nope, q_rope = q.view(t, self.num_heads, self.qk_dim).split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.latent, self.rope], dim=-1)
        k_rope = apply_rotary(k_rope.reshape(t, 1, self.rope), *rope).reshape(t, self.rope)
        return q_nope, apply_rotary(q_rope, *rope), self.kv_a_layernorm(latent), k_rope

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, L] and W_UV [H, v, L], views of ``kv_b_proj``."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.latent)
        return w[:, :self.nope], w[:, self.nope:]

    def forward(self, x: torch.Tensor, rope: RotaryTables, ctx: ForwardContext) -> torch.Tensor:
        q_nope, q_rope, latent, k_rope = self.project(x, rope)
        cache, _ = ctx.kv_caches[self.layer_index]
        write_rows(cache, ctx.attn.slot_mapping, torch.cat([latent, k_rope], dim=-1).unsqueeze(1))
        w_uk, w_uv = self._up_weights()
        q_latent = torch.einsum("thn,hnl->thl", q_nope, w_uk)
        out_latent = ctx.attention.attend_latent(torch.cat([q_latent, q_rope], dim=-1), cache, ctx.attn,
                                                 self.scale, self.latent)
        out = torch.einsum("thl,hvl->thv", out_latent, w_uv)
        return self.o_proj(out.reshape(x.shape[0], self.num_heads * self.v_dim))

    def forward_full(self, x: torch.Tensor, rope: RotaryTables) -> torch.Tensor:
        """Causal attention over one whole sequence with expanded per-head keys and values."""
        t = x.shape[0]
        q_nope, q_rope, latent, k_rope = self.project(x, rope)
        kv = self.kv_b_proj(latent).view(t, self.num_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, None, :].expand(t, self.num_heads, self.rope)], dim=-1)
        out = full_attention(torch.cat([q_nope, q_rope], dim=-1), k, v, self.scale)
        return self.o_proj(out.reshape(t, self.num_heads * self.v_dim))
