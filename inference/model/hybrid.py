"""Decoder layers of hybrid models (Qwen3-Next / Qwen3.5, Nemotron-H) and the two forward
passes over them.

Each layer has an optional token mixer (``ModelConfig.layer_types``: attention, Gated
DeltaNet, Mamba2 or ``none``) and an optional MLP (``mlp_types``: MoE, dense or ``none``),
each behind its own pre-norm and residual. Qwen3.5 layers have both; a Nemotron-H block
has exactly one (its single norm is the pre-norm of whichever it has).

- ``paged_forward``: one engine step. Attention layers use the paged KV cache as in
  ``MoEGPT``; recurrent layers advance their per-sequence states in the slots named by
  ``ForwardContext.recurrent`` (``RecurrentMetadata``) inside ``ctx.recurrent_states``.
- ``reference_forward``: one whole sequence, no KV cache, no state pool: attention runs
  ``forward_full`` and every recurrent layer its chunked torch form from a zero state.

``MoEGPT`` builds ``HybridDecoderLayer`` instead of its ``DecoderLayer`` whenever
``uses_hybrid_layers(config)`` and then calls these two functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from inference.config import DTYPES, ModelConfig
from inference.model.attention import build_attention
from inference.model.context import ForwardContext
from inference.model.layers import build_dense_mlp, build_norm
from inference.model.moe import MoEMLP
from inference.model.recurrent import CHUNKED, GatedDeltaNet, Mamba2Mixer, RecurrentMetadata
from inference.recurrent_config import (ATTENTION_LAYER_TYPES, DENSE, FULL_ATTENTION, GATED_DELTANET, MAMBA2, MOE,
                                        NO_MIXER, NO_MLP, RECURRENT_LAYER_TYPES)

if TYPE_CHECKING:
    from inference.model.gpt import MoEGPT
    from inference.parallel import ParallelGroups

RotaryTables = tuple[torch.Tensor, torch.Tensor]


def uses_hybrid_layers(config: ModelConfig) -> bool:
    """Whether ``config`` needs ``HybridDecoderLayer``: per-layer MLP kinds, recurrent or
    missing mixers, or norms / MLPs that ``DecoderLayer`` does not build."""
    return (bool(config.mlp_types) or any(t not in ATTENTION_LAYER_TYPES for t in config.layer_types)
            or config.zero_centered_norms or config.expert_activation == "relu2" or not config.use_rope)


def layer_kinds(config: ModelConfig, layer_index: int) -> tuple[str, str]:
    """(mixer kind, MLP kind) of decoder layer ``layer_index``."""
    mixer = config.layer_types[layer_index] if config.layer_types else FULL_ATTENTION
    if config.mlp_types:
        return mixer, config.mlp_types[layer_index]
    return mixer, DENSE if layer_index in config.dense_layers else MOE


class HybridDecoderLayer(nn.Module):
    """Pre-norm mixer + pre-norm MLP, either of which may be absent. Parameters keep the
    names of ``DecoderLayer`` where they exist (``input_layernorm``, ``self_attn``,
    ``post_attention_layernorm``, ``mlp``); recurrent mixers are ``mixer``. Invariant: the
    layer has a mixer or an MLP (the config guarantees it); ``moe_index`` is its column of
    the routing buffer when its MLP is MoE, else None. With ``parallel`` only the MoE MLP is
    split (``ExpertParallelMoE``); every other module is the unsharded one, replicated on the
    replica's ranks (``inference.parallel.layout``, hybrid models)."""

    def __init__(self, config: ModelConfig, layer_index: int, parallel: "ParallelGroups | None" = None) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.mixer_kind, self.mlp_kind = layer_kinds(config, layer_index)
        self.state_dtype = getattr(torch, DTYPES[config.recurrent_state_dtype])
        self.input_layernorm = build_norm(config, config.hidden_size) if self.mixer_kind != NO_MIXER else None
        self.self_attn = build_attention(config, layer_index) if self.mixer_kind in ATTENTION_LAYER_TYPES else None
        if self.mixer_kind == GATED_DELTANET:
            self.mixer = GatedDeltaNet(config.hidden_size, config.gated_deltanet)
        elif self.mixer_kind == MAMBA2:
            self.mixer = Mamba2Mixer(config.hidden_size, config.mamba2)
        else:
            self.mixer = None
        self.post_attention_layernorm = build_norm(config, config.hidden_size) if self.mlp_kind != NO_MLP else None
        moe_layers = config.moe_layer_indices
        self.moe_index = moe_layers.index(layer_index) if layer_index in moe_layers else None
        if self.mlp_kind == MOE:
            self.mlp = MoEMLP(config) if parallel is None else _expert_parallel_moe(config, parallel)
        elif self.mlp_kind == DENSE:
            self.mlp = build_dense_mlp(config, config.intermediate_size)
        else:
            self.mlp = None

    @property
    def is_recurrent(self) -> bool:
        return self.mixer_kind in RECURRENT_LAYER_TYPES

    def mlp_forward(self, x: torch.Tensor, routing_out: torch.Tensor | None,
                    forced: torch.Tensor | None = None, reference: bool = False) -> torch.Tensor:
        if self.moe_index is None:
            return self.mlp(x)
        return self.mlp(x, routing_out, forced, reference)

    def forward(self, h: torch.Tensor, rope: RotaryTables | None, ctx: ForwardContext) -> torch.Tensor:
        """One paged step over ``h`` [T_pad, H]."""
        if self.self_attn is not None:
            h = h + self.self_attn(self.input_layernorm(h), rope, ctx)
        elif self.mixer is not None:
            h = h + self._recurrent_step(self.input_layernorm(h), ctx)
        if self.mlp is not None:
            staging = ctx.routing_staging
            out = staging[:, self.moe_index] if staging is not None and self.moe_index is not None else None
            h = h + self.mlp_forward(self.post_attention_layernorm(h), out)
        return h

    def _recurrent_step(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        meta, states = ctx.recurrent, ctx.recurrent_states
        if meta is None or states is None:
            raise ValueError(f"layer {self.layer_index} is a {self.mixer_kind} layer: the paged forward of a hybrid "
                             "model needs ForwardContext.recurrent and recurrent_states")
        y = self.mixer(x, meta, *states[self.layer_index], mode=ctx.recurrent_mode)
        if y.shape[0] < x.shape[0]:     # padding rows past the step's tokens (never read)
            y = torch.cat([y, y.new_zeros(x.shape[0] - y.shape[0], y.shape[1])])
        return y

    def forward_full(self, h: torch.Tensor, rope: RotaryTables | None, routing_out: torch.Tensor | None,
                     forced: torch.Tensor | None) -> torch.Tensor:
        """The reference over one whole sequence ``h`` [S, H]."""
        if self.self_attn is not None:
            h = h + self.self_attn.forward_full(self.input_layernorm(h), rope)
        elif self.mixer is not None:
            h = h + self._recurrent_full(self.input_layernorm(h))
        if self.mlp is not None:
            h = h + self.mlp_forward(self.post_attention_layernorm(h), routing_out, forced, reference=True)
        return h

    def _recurrent_full(self, x: torch.Tensor) -> torch.Tensor:
        """The chunked torch form from a zero state (one fresh sequence in a private slot)."""
        c = self.mixer.config
        meta = RecurrentMetadata.build([x.shape[0]], [0], [False], device=x.device)
        conv = x.new_zeros(1, *c.conv_state_shape)
        state = torch.zeros(1, *c.recurrent_state_shape, dtype=self.state_dtype, device=x.device)
        return self.mixer(x, meta, conv, state, mode=CHUNKED)


def _expert_parallel_moe(config: ModelConfig, parallel: "ParallelGroups") -> nn.Module:
    from inference.parallel import ExpertParallelMoE    # lazily: the parallel blocks import this package
    return ExpertParallelMoE(config, parallel)


def _rope(model: MoEGPT, positions: torch.Tensor) -> RotaryTables | None:
    return model.rotary.tables(positions) if model.config.use_rope else None


def paged_forward(model: MoEGPT, input_ids: torch.Tensor, positions: torch.Tensor,
                  ctx: ForwardContext) -> torch.Tensor:
    """``MoEGPT.forward`` of a hybrid model: final hidden states [T_pad, H]."""
    h = model.embed_tokens(input_ids)
    rope = _rope(model, positions)
    for layer in model.layers:
        h = layer(h, rope, ctx)
    return model.norm(h)


@torch.no_grad()
def reference_forward(model: MoEGPT, token_ids: torch.Tensor,
                      forced_routing: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``MoEGPT.forward_reference`` of a hybrid model: (logits [S, V] fp32, top-k ids
    [S, num_moe_layers, topk])."""
    c = model.config
    s = token_ids.shape[0]
    h = model.embed_tokens(token_ids)
    routing = torch.empty(s, c.num_moe_layers, c.topk, dtype=torch.int64, device=h.device)
    rope = _rope(model, torch.arange(s, device=token_ids.device))
    for layer in model.layers:
        j = layer.moe_index
        out = routing[:, j] if j is not None else None
        forced = forced_routing[:, j] if forced_routing is not None and j is not None else None
        h = layer.forward_full(h, rope, out, forced)
    return model.compute_logits(model.norm(h)), routing
