"""MoE GPT decoder: a paged forward for the engine and a full-sequence reference forward.

With ``parallel`` (an ``inference.parallel.ParallelGroups``) the model is one rank's shard of
a tensor/expert-parallel replica: vocabulary-parallel embedding and logits, attention on
this rank's heads, expert-parallel MoE and row/column-parallel dense MLPs (one all-reduce
per block). A hybrid model splits only its MoE layers and replicates the rest. Module and
parameter names are the unsharded model's, so routing capture, replay, ``set_experts_fn``
and loading by name work unchanged; the logits and the routing ids (global expert ids) are
identical on every rank of the replica.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from inference.config import ModelConfig
from inference.model.attention import build_attention
from inference.model.context import ForwardContext
from inference.model.hybrid import HybridDecoderLayer, paged_forward, reference_forward, uses_hybrid_layers
from inference.model.layers import RMSNorm, SwiGLUMLP, build_norm
from inference.model.moe import MoEMLP
from inference.model.rotary import RotaryEmbedding
from inference.model.router import TopKRouter

if TYPE_CHECKING:
    from inference.parallel import ParallelGroups


class DecoderLayer(nn.Module):
    """Pre-norm attention + MLP. ``moe_index`` is this layer's position among MoE layers
    (its slice of the routing staging tensor), or None for a dense layer."""

    def __init__(self, config: ModelConfig, layer_index: int, parallel: "ParallelGroups | None" = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        moe_layers = config.moe_layer_indices
        self.moe_index = moe_layers.index(layer_index) if layer_index in moe_layers else None
        if parallel is None:
            self.self_attn = build_attention(config, layer_index)
            self.mlp = MoEMLP(config) if self.moe_index is not None else SwiGLUMLP(config.hidden_size,
                                                                                      config.intermediate_size)
        else:
            self.self_attn, self.mlp = _parallel_blocks(config, layer_index, self.moe_index is not None, parallel)

    def mlp_forward(self, x: torch.Tensor, routing_out: torch.Tensor | None,
                    forced: torch.Tensor | None = None, reference: bool = False) -> torch.Tensor:
        if self.moe_index is None:
            return self.mlp(x)
        return self.mlp(x, routing_out, forced, reference)


class MoEGPT(nn.Module):
    """Decoder-only MoE transformer; hybrid configs (``uses_hybrid_layers``) get the layers
    and forward passes of ``inference.model.hybrid``. Invariant: MoE layer j (j-th in depth
    order, global index ``config.moe_layer_indices[j]``) writes its top-k ids into column j
    of the routing buffer it is given. ``config`` is the whole model's; ``attention_config``
    is the one this rank's attention (and KV cache) runs on: ``config`` itself without
    ``parallel``, this rank's heads with it."""

    def __init__(self, config: ModelConfig, parallel: "ParallelGroups | None" = None) -> None:
        super().__init__()
        self.config = config
        self.parallel = parallel
        if parallel is None:
            self.attention_config = config
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        else:
            from inference.parallel import VocabParallelEmbedding
            from inference.parallel.attention import local_attention_config
            parallel.layout.validate_model(config)
            self.attention_config = local_attention_config(config, parallel.layout, parallel.tp.rank)
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, parallel.tp)
        self.rotary = rotary_for(config)
        self.hybrid = uses_hybrid_layers(config)     # recurrent / MLP-only layers: inference.model.hybrid
        layer_kind = HybridDecoderLayer if self.hybrid else DecoderLayer
        self.layers = nn.ModuleList(layer_kind(config, i, parallel) for i in range(config.num_layers))
        self.norm = build_norm(config, config.hidden_size)
        self.fused_residual_norms = False       # set_fused_small_ops
        if parallel is None:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            if config.tie_word_embeddings:
                self.lm_head.weight = self.embed_tokens.weight
        else:   # vocabulary-parallel: fp32 logits all-gathered, the same on every TP rank
            from inference.parallel import ParallelLMHead
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, parallel.tp,
                                          tied_to=self.embed_tokens if config.tie_word_embeddings else None)

    def set_experts_fn(self, fn) -> None:
        """Choose the routed-expert implementation of every MoE layer (same contract as
        ``inference.model.moe.experts_reference``); layers whose experts that contract does
        not describe (GPT-OSS) keep their own."""
        for layer in self.layers:
            if layer.moe_index is not None and layer.mlp.accepts_experts_fn:
                layer.mlp.experts_fn = fn

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Paged forward over one step's tokens; returns final hidden states [T, H]."""
        if self.hybrid:
            return paged_forward(self, input_ids, positions, ctx)
        h = self.embed_tokens(input_ids)
        staging = ctx.routing_staging
        rope = self.rotary.tables(positions)
        if self.fused_residual_norms and h.is_cuda:
            return self._forward_fused_norms(h, rope, ctx)
        for layer in self.layers:
            a = layer.self_attn(layer.input_layernorm(h), rope, ctx)
            h = h + a
            out = staging[:, layer.moe_index] if staging is not None and layer.moe_index is not None else None
            h = h + layer.mlp_forward(layer.post_attention_layernorm(h), out)
        return self.norm(h)

    def _forward_fused_norms(self, h: torch.Tensor, rope, ctx: ForwardContext) -> torch.Tensor:
        """``forward``'s layers with every residual add and the RMSNorm after it (the next
        layer's input norm, the final norm) as one kernel: the same values, half the
        kernels between the blocks."""
        staging = ctx.routing_staging
        x = self.layers[0].input_layernorm(h)
        for i, layer in enumerate(self.layers):
            h, x = layer.post_attention_layernorm.add_forward(layer.self_attn(x, rope, ctx), h)
            out = staging[:, layer.moe_index] if staging is not None and layer.moe_index is not None else None
            after = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            h, x = after.add_forward(layer.mlp_forward(x, out), h)
        return x

    def set_fused_small_ops(self, enabled: bool, kv_write: bool = True) -> dict[str, int]:
        """Turn the fused small-op kernels on or off (the engine's ``fused_small_ops``): the
        router (``TopKRouter.fused`` / ``half_logits``), q/k norm + rotary
        (``GQAttention.fused_rotary``; with ``kv_write``, ``fused_kv_write``: the same
        kernel writes the step's K/V into the cache, where the cache layout allows it) and
        residual add + RMSNorm (non-hybrid models whose norms are all plain RMSNorms). Each
        is taken on CUDA tensors only and where its kernel applies; returns how many modules
        of each kind took it."""
        from inference.kernels.norm_rotary import add_rms_norm_supported
        from inference.kernels.router_topk import half_logits_gemm_available, router_topk_supported
        from inference.model.attention import GQAttention
        device = next(self.parameters()).device
        half = enabled and half_logits_gemm_available(device)
        counts = {"routers": 0, "half_logits": 0, "attention": 0, "kv_writes": 0, "residual_norms": 0}
        for module in self.modules():
            if isinstance(module, TopKRouter):
                module.fused = enabled and router_topk_supported(module.num_experts, module.topk, module.config)
                module.half_logits = half
                counts["routers"] += module.fused
                counts["half_logits"] += half
            elif isinstance(module, GQAttention):
                module.fused_rotary = enabled and module.fused_rotary_applies()
                module.fused_kv_write = module.fused_rotary and kv_write
                counts["attention"] += module.fused_rotary
                counts["kv_writes"] += module.fused_kv_write
        norms = [] if self.hybrid else [self.norm, *(n for layer in self.layers
                                                     for n in (layer.input_layernorm, layer.post_attention_layernorm))]
        self.fused_residual_norms = (enabled and bool(norms) and all(type(n) is RMSNorm for n in norms)
                                     and add_rms_norm_supported(self.config.hidden_size))
        counts["residual_norms"] = len(norms) - 1 if self.fused_residual_norms else 0
        return counts

    def set_skinny_linear(self, max_tokens: int) -> dict[str, int]:
        """Run every attention layer's ``qkv_proj`` / ``o_proj`` through
        ``inference.kernels.skinny_linear`` in steps of at most ``max_tokens`` tokens (the
        engine's ``skinny_linear_max_tokens``; 0: nn.Linear always). Each module keeps the
        threshold (``GQAttention.skinny_linear_max_tokens``); returns it and how many
        projections take the kernel (plain ``nn.Linear`` ones: tensor-parallel shards and
        latent attention keep their own)."""
        from inference.model.attention import GQAttention
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"skinny_linear_max_tokens must be an int >= 0 (0: off), got {max_tokens!r}")
        projections = 0
        for module in self.modules():
            if isinstance(module, GQAttention):
                module.skinny_linear_max_tokens = max_tokens
                projections += sum(type(p) is nn.Linear for p in (module.qkv_proj, module.o_proj))
        return {"max_tokens": max_tokens, "projections": projections if max_tokens else 0}

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def forward_reference(self, token_ids: torch.Tensor,
                          forced_routing: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-sequence forward without KV cache: (logits [S, V] fp32, top-k ids
        [S, num_moe_layers, topk]). ``forced_routing`` replays given ids instead of routing."""
        if self.hybrid:
            return reference_forward(self, token_ids, forced_routing)
        s = token_ids.shape[0]
        positions = torch.arange(s, device=token_ids.device)
        h = self.embed_tokens(token_ids)
        routing = torch.empty(s, self.config.num_moe_layers, self.config.topk, dtype=torch.int64, device=h.device)
        rope = self.rotary.tables(positions)
        for layer in self.layers:
            h = h + layer.self_attn.forward_full(layer.input_layernorm(h), rope)
            j = layer.moe_index
            out = routing[:, j] if j is not None else None
            forced = forced_routing[:, j] if forced_routing is not None and j is not None else None
            h = h + layer.mlp_forward(layer.post_attention_layernorm(h), out, forced, reference=True)
        return self.compute_logits(self.norm(h)), routing


def _parallel_blocks(config: ModelConfig, layer_index: int, moe: bool,
                     parallel: "ParallelGroups") -> tuple[nn.Module, nn.Module]:
    """This rank's attention and MLP of one decoder layer (imported lazily: the parallel
    blocks import this package's attention and MoE code)."""
    from inference.parallel import ExpertParallelMoE, ParallelSwiGLUMLP, sharded_attention
    attn = sharded_attention(config, layer_index, parallel.layout, parallel.tp)
    mlp = (ExpertParallelMoE(config, parallel) if moe
           else ParallelSwiGLUMLP(config.hidden_size, config.intermediate_size, parallel.tp))
    return attn, mlp


def rotary_for(config: ModelConfig) -> RotaryEmbedding:
    # Without rotary (Nemotron-H) the tables are never read: one row instead of a context's worth.
    positions = config.max_position_embeddings if config.use_rope else 1
    return RotaryEmbedding(config.rope_dim, positions, config.rope_theta, config.rope_scaling)


def allocate_model(config: ModelConfig, device: str | torch.device, dtype: torch.dtype,
                   parallel: "ParallelGroups | None" = None) -> MoEGPT:
    """A model whose parameters are allocated directly in ``dtype`` on ``device`` but not
    initialised (a 30B-parameter shape never exists in fp32; with ``parallel`` only this
    rank's shards exist). The rotary tables and expert biases, which no checkpoint carries,
    are fp32 and set (bias zero)."""
    device = torch.device(device)
    with torch.device("meta"):
        model = MoEGPT(config, parallel).to(dtype)
    model.to_empty(device=device)
    if config.tie_word_embeddings:      # to_empty materialises the shared parameter twice
        model.lm_head.weight = model.embed_tokens.weight
    with torch.device(device):
        model.rotary = rotary_for(config)
    for module in model.modules():
        if isinstance(module, TopKRouter) and module.expert_bias is not None:
            module.expert_bias = torch.zeros(module.num_experts, device=device)
    return model
