"""Per-step state handed to the model explicitly (no globals): attention metadata, the KV
cache tensors, the attention implementation and the routing capture buffer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class AttentionMetadata:
    """Layout of one step's tokens. Request r owns query rows
    ``query_start_loc[r]:query_start_loc[r+1]``: the last ``q_len`` tokens of its
    ``seq_lens[r]``-token context. Rows past ``query_start_loc[-1]`` are padding whose
    ``slot_mapping`` points into the dummy block."""

    slot_mapping: torch.Tensor            # [T_pad] int64: block * block_size + offset
    block_tables: torch.Tensor            # [R, max_blocks] int32
    query_start_loc: torch.Tensor         # [R + 1] int32
    seq_lens: torch.Tensor                # [R] int32
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
    max_query_len: int
    max_seq_len: int
    decode_only: bool


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]


@dataclass
class ForwardContext:
    """Everything a paged forward needs besides token ids and positions."""

    attn: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]   # per layer: k, v [num_blocks + 1, block_size, kv_heads, head_dim]
    attention_fn: AttentionFn
    routing_staging: torch.Tensor | None = None          # [T_pad, num_moe_layers, topk]
