"""Grouped-query self-attention: rotary (full, partial or none), optional q/k norm and
biases, for GPT-OSS a per-layer sliding window and attention sinks, and for Qwen3-Next /
Qwen3.5 a sigmoid gate on each head's output."""

from __future__ import annotations

import torch
from torch import nn

from inference.config import ModelConfig
from inference.model.attention.reference import full_attention
from inference.model.context import ForwardContext
from inference.model.layers import RMSNorm, build_norm
from inference.model.rotary import apply_rotary
from inference.paged_attention import write_kv

RotaryTables = tuple[torch.Tensor, torch.Tensor]


class GQAttention(nn.Module):
    """q/k/v projections fused into one weight ([q; k; v] rows). ``qk_norm`` is applied
    per head (Qwen3, GLM-4.5) or over the whole projection (OLMoE, MiniMax-M2) before
    rotary. ``output_gate_proj`` (``attention_output_gate``): per-head gates, applied as
    ``out * sigmoid(gate)`` before ``o_proj``. Without ``use_rope`` the rotary tables are
    ignored. Invariant: ``window`` is 0 (full attention) or the layer's sliding window, and
    both the paged and the reference forward apply the same window, sinks and gate; the
    fused paths (``fused_rotary``, ``fused_kv_write``) leave in the KV cache exactly what
    ``project`` then ``write_kv`` would; ``skinny_linear_max_tokens`` changes only which
    kernel computes ``qkv_proj`` / ``o_proj`` (the same product, fp32 accumulation)."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.window = config.window_of(layer_index)
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_proj_bias)
        # A separate projection (not more rows of qkv_proj): the fused q/k/v layout stays the
        # one the kernels, tensor parallelism and the megatron export know.
        self.output_gate_proj = (nn.Linear(config.hidden_size, self.q_size, bias=config.attention_bias)
                                 if config.attention_output_gate else None)
        self.use_rope = config.use_rope
        self.qk_norm = config.qk_norm
        if config.qk_norm == "per_head":
            self.q_norm, self.k_norm = build_norm(config, self.head_dim), build_norm(config, self.head_dim)
        elif config.qk_norm == "full":
            self.q_norm, self.k_norm = build_norm(config, self.q_size), build_norm(config, self.kv_size)
        else:
            self.q_norm = self.k_norm = None
        # Logits added to the (fp32) softmax: used in fp32 whatever the model dtype.
        self.sinks = nn.Parameter(torch.zeros(self.num_heads)) if config.attention_sinks else None
        # q/k norm + rotary as one kernel on CUDA (MoEGPT.set_fused_small_ops); off: torch.
        self.fused_rotary = False
        # With fused_rotary: that kernel also writes k and v into the KV cache (one launch
        # instead of three) where the cache layout allows it (set_fused_small_ops).
        self.fused_kv_write = False
        # Steps of at most this many tokens run qkv_proj / o_proj through skinny_linear
        # (MoEGPT.set_skinny_linear); 0: nn.Linear always.
        self.skinny_linear_max_tokens = 0

    @staticmethod
    def _kernels_take(x: torch.Tensor) -> bool:
        """The fused kernels run on CUDA tensors only (interpreter tests patch this to run
        them on CPU)."""
        return x.is_cuda

    def _linear(self, proj: nn.Module, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """``proj(x)``, or for a step of at most ``skinny_linear_max_tokens`` tokens the same
        product by ``skinny_linear`` (the Triton kernel on CUDA, ``F.linear`` elsewhere). Plain
        ``nn.Linear`` projections only: tensor-parallel ones keep their own forward."""
        if not reference and 0 < x.shape[0] <= self.skinny_linear_max_tokens and type(proj) is nn.Linear:
            from inference.kernels.skinny_linear import skinny_linear, skinny_linear_applies
            if skinny_linear_applies(x, proj.weight):
                return skinny_linear(x, proj.weight, proj.bias)
        return proj(x)

    def fused_rotary_applies(self) -> bool:
        """Whether ``qk_norm_rotary`` computes this layer's q/k norm and rotary (plain
        RMSNorms or none; zero-centred and sharded whole-projection norms keep torch; a
        layer with neither norm nor rotary has nothing to fuse)."""
        from inference.kernels.norm_rotary import qk_norm_rotary_supported
        norms_plain = self.q_norm is None or (type(self.q_norm) is RMSNorm and type(self.k_norm) is RMSNorm)
        has_work = self.use_rope or self.q_norm is not None     # else q and k are views: nothing to fuse
        return norms_plain and has_work and qk_norm_rotary_supported(self.num_heads, self.num_kv_heads,
                                                                     self.head_dim)

    def project(self, x: torch.Tensor, rope: RotaryTables,
                reference: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = x.shape[0]
        if self.fused_rotary and self._kernels_take(x) and not reference:
            return self._project_fused(x, rope)
        q, k, v = self._linear(self.qkv_proj, x, reference).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        if not self.use_rope:
            return q, k, v
        return apply_rotary(q, *rope), apply_rotary(k, *rope), v

    def _project_fused(self, x: torch.Tensor, rope: RotaryTables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``project`` with the norms and rotary as one kernel (same values, see
        ``inference.kernels.norm_rotary``)."""
        from inference.kernels.norm_rotary import qk_norm_rotary
        qkv = self._linear(self.qkv_proj, x)
        v = qkv[:, self.q_size + self.kv_size:].reshape(x.shape[0], self.num_kv_heads, self.head_dim)
        q, k = qk_norm_rotary(qkv, self.num_heads, self.num_kv_heads, self.head_dim, *self._kernel_args(rope))
        return q, k, v

    def project_write_kv(self, x: torch.Tensor, rope: RotaryTables, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> torch.Tensor:
        """``project``'s q; its k and v written into the caches at ``slot_mapping`` by the
        same kernel, as ``write_kv`` stores them (``qk_norm_rotary_write_kv``)."""
        from inference.kernels.norm_rotary import qk_norm_rotary_write_kv
        return qk_norm_rotary_write_kv(self._linear(self.qkv_proj, x), self.num_heads, self.num_kv_heads, self.head_dim,
                                       *self._kernel_args(rope), k_cache, v_cache, slot_mapping)

    def _kernel_args(self, rope: RotaryTables) -> tuple:
        """(cos, sin, norm, q weight, k weight, eps) of the norm + rotary kernels."""
        cos, sin = rope if self.use_rope else (None, None)
        if self.qk_norm == "none":
            return cos, sin, "none", None, None, 1e-6
        return cos, sin, self.qk_norm, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps

    def _writes_kv_fused(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> bool:
        if not (self.fused_kv_write and self.fused_rotary and self._kernels_take(x)):
            return False
        from inference.kernels.norm_rotary import kv_write_supported
        return kv_write_supported(k_cache, v_cache, slot_mapping, self.num_kv_heads, self.head_dim, x.dtype,
                                  x.shape[0])

    def _sinks(self) -> torch.Tensor | None:
        return None if self.sinks is None else self.sinks.float()

    def forward(self, x: torch.Tensor, rope: RotaryTables, ctx: ForwardContext) -> torch.Tensor:
        k_cache, v_cache = ctx.kv_caches[self.layer_index]
        slots = ctx.attn.slot_mapping
        if self._writes_kv_fused(x, k_cache, v_cache, slots):
            # The attention backends read this step's k and v from the cache: k is never
            # materialised outside it.
            q = self.project_write_kv(x, rope, k_cache, v_cache, slots)
        else:
            q, k, v = self.project(x, rope)
            write_kv(k_cache, v_cache, slots, k, v)
        out = ctx.attention.attend(q, k_cache, v_cache, ctx.attn, self.scale, self.window, self._sinks())
        return self._output(out, x)

    def forward_full(self, x: torch.Tensor, rope: RotaryTables) -> torch.Tensor:
        """Causal attention over one whole sequence, no KV cache (the reference path)."""
        q, k, v = self.project(x, rope, reference=True)
        out = full_attention(q, k, v, self.scale, self.window, self._sinks())
        return self._output(out, x, reference=True)

    def _output(self, out: torch.Tensor, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        out = out.reshape(x.shape[0], self.q_size)
        if self.output_gate_proj is not None:
            out = out * torch.sigmoid(self.output_gate_proj(x))
        return self._linear(self.o_proj, out, reference)
