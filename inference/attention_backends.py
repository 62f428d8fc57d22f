"""Choosing the attention implementation for a device.

CPU: the plain-torch eager loop (``paged_attention_eager``), the simplest correct path.
CUDA: Triton paged decode for decode-only steps (also what decode graphs capture) and
Triton paged prefill over cached prefixes for everything else.
"""

from __future__ import annotations

import torch

from inference.kernels import paged_decode_attention, prefill_attention
from inference.model.context import AttentionFn, AttentionMetadata
from inference.paged_attention import paged_attention_eager


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query row per request (padding rows have seq_len 0); graph-capturable."""
    return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)


def varlen_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Any mix of prefill chunks and decodes, dispatching decode-only steps to the decode kernel."""
    if meta.decode_only:
        return decode_attention(q, k_cache, v_cache, meta, scale)
    return prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                             scale, meta.max_query_len, meta.max_seq_len)


def select_attention(device: torch.device) -> AttentionFn:
    return varlen_attention if device.type == "cuda" else paged_attention_eager
