"""A tensor/expert-parallel MoEGPT assembled from ``inference.parallel`` blocks: how the
model integrates them (same module names as ``MoEGPT``; the model's own attention classes
run on this rank's heads), used by the multi-rank tests to compare whole forwards with the
single-process model."""

from __future__ import annotations

import torch
from torch import nn

from inference.config import ModelConfig
from inference.model.context import ForwardContext
from inference.model.gpt import rotary_for
from inference.model.layers import RMSNorm
from inference.parallel import (ExpertParallelMoE, ParallelGroups, ParallelLMHead, ParallelSwiGLUMLP,
                                VocabParallelEmbedding, sharded_attention)


class TPDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, groups: ParallelGroups) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = sharded_attention(config, layer_index, groups.layout, groups.tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        moe = config.moe_layer_indices
        self.moe_index = moe.index(layer_index) if layer_index in moe else None
        self.mlp = (ExpertParallelMoE(config, groups) if self.moe_index is not None
                    else ParallelSwiGLUMLP(config.hidden_size, config.intermediate_size, groups.tp))

    def mlp_forward(self, x, routing_out=None, forced=None):
        return self.mlp(x) if self.moe_index is None else self.mlp(x, routing_out, forced, reference=True)


class TPMoEGPT(nn.Module):
    """One rank of a TP/EP replica; mirrors ``MoEGPT.forward`` / ``forward_reference``."""

    def __init__(self, config: ModelConfig, groups: ParallelGroups) -> None:
        super().__init__()
        groups.layout.validate_model(config)
        self.config, tp = config, groups.tp
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.rotary = rotary_for(config)
        self.layers = nn.ModuleList(TPDecoderLayer(config, i, groups) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp,
                                      tied_to=self.embed_tokens if config.tie_word_embeddings else None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        rope = self.rotary.tables(positions)
        for layer in self.layers:
            h = h + layer.self_attn(layer.input_layernorm(h), rope, ctx)
            j = layer.moe_index
            out = ctx.routing_staging[:, j] if ctx.routing_staging is not None and j is not None else None
            h = h + layer.mlp_forward(layer.post_attention_layernorm(h), out)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @torch.no_grad()
    def forward_reference(self, token_ids: torch.Tensor, forced_routing: torch.Tensor | None = None):
        s = token_ids.shape[0]
        h = self.embed_tokens(token_ids)
        routing = torch.empty(s, self.config.num_moe_layers, self.config.topk, dtype=torch.int64, device=h.device)
        rope = self.rotary.tables(torch.arange(s, device=h.device))
        for layer in self.layers:
            h = h + layer.self_attn.forward_full(layer.input_layernorm(h), rope)
            j = layer.moe_index
            out = routing[:, j] if j is not None else None
            forced = forced_routing[:, j] if forced_routing is not None and j is not None else None
            h = h + layer.mlp_forward(layer.post_attention_layernorm(h), out, forced)
        return self.compute_logits(self.norm(h)), routing
