"""Paged KV cache storage: one tensor holding every layer's K and V blocks."""

from __future__ import annotations

import torch

from inference.config import ModelConfig


class KVCache:
    """K/V of ``num_blocks`` usable blocks plus the dummy block (index ``num_blocks``)
    that padding rows write into. Block ids are the block pool's ids."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.storage = torch.zeros(config.num_layers, 2, num_blocks + 1, block_size,
                                   config.num_kv_heads, config.head_dim, dtype=dtype, device=device)
        self.per_layer = [(self.storage[i, 0], self.storage[i, 1]) for i in range(config.num_layers)]

    @property
    def dummy_block_id(self) -> int:
        return self.num_blocks

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return config.kv_bytes_per_token * block_size * torch.empty((), dtype=dtype).element_size()
