"""Attention layers: grouped-query (optionally windowed, with sinks) and multi-head latent.

Each layer has a paged forward (through the step's ``AttentionBackend``) and a
full-sequence ``forward_full`` (``reference.full_attention``, no KV cache) that tests
compare against.
"""

from __future__ import annotations

from torch import nn

from inference.config import ModelConfig
from inference.model.attention.gqa import GQAttention
from inference.model.attention.mla import MLAttention

__all__ = ["GQAttention", "MLAttention", "build_attention"]


def build_attention(config: ModelConfig, layer_index: int) -> nn.Module:
    """The attention module of decoder layer ``layer_index``."""
    if config.mla is not None:
        return MLAttention(config, layer_index)
    return GQAttention(config, layer_index)
