"""Paged KV cache storage: one tensor holding every layer's blocks."""

from __future__ import annotations

import torch

from inference.config import ModelConfig


class KVCache:
    """Per-layer cache blocks of ``num_blocks`` usable blocks plus the dummy block (index
    ``num_blocks``) that padding rows write into. Block ids are the block pool's ids: in
    every layer's tensors, dim 0 is the block id, dim 1 the offset inside the block. Only
    attention layers (``config.attention_layer_indices``) have KV: the recurrent layers of a
    hybrid keep their state in a ``StatePool``; ``per_layer`` maps each attention layer's
    global index to its tensors and ``storage`` dim 0 runs over those layers only.

    Layouts: grouped-query attention stores K and V,
    ``storage [num_attention_layers, 2, num_blocks + 1, block_size, kv_heads, head_dim]`` and
    ``per_layer[i] = (k, v)``; multi-head latent attention stores one row per token (latent,
    then rotary key), ``storage [num_attention_layers, num_blocks + 1, block_size, 1, L + R]`` and
    ``per_layer[i] = (rows, rows[..., :L])``."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        layers = config.attention_layer_indices
        if config.mla is not None:
            self.storage = torch.zeros(len(layers), num_blocks + 1, block_size, 1, config.mla.cache_dim,
                                       dtype=dtype, device=device)
            latent = config.mla.kv_lora_rank
            self.per_layer = {layer: (self.storage[j], self.storage[j][..., :latent]) for j, layer in enumerate(layers)}
        else:
            self.storage = torch.zeros(len(layers), 2, num_blocks + 1, block_size, config.num_kv_heads,
                                       config.head_dim, dtype=dtype, device=device)
            self.per_layer = {layer: (self.storage[j, 0], self.storage[j, 1]) for j, layer in enumerate(layers)}

    @property
    def dummy_block_id(self) -> int:
        return self.num_blocks

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return config.kv_bytes_per_token * block_size * torch.empty((), dtype=dtype).element_size()
