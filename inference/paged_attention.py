"""Plain-torch paged attention: correct on CPU and GPU, the reference for fast kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inference.model.context import AttentionMetadata


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """Append this step's K/V: row i goes to flat slot ``slot_mapping[i]`` (padding rows
    land in the dummy block). Index-put with a tensor index: no host sync."""
    n = slot_mapping.shape[0]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k[:n].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v[:n].to(v_cache.dtype))


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` cached tokens of one request: [length, kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [Q, heads, d] are the last Q positions of the K-long context k, v: [K, kv_heads, d]."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    q_len, k_len = q.shape[0], k.shape[0]
    qpos = torch.arange(k_len - q_len, k_len, device=q.device).unsqueeze(1)
    mask = torch.arange(k_len, device=q.device).unsqueeze(0) <= qpos
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def paged_attention_eager(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One request at a time using host-side lengths; padding rows get zeros."""
    out = torch.zeros_like(q)
    starts = meta.query_start_loc_host
    for r, seq_len in enumerate(meta.seq_lens_host):
        a, b = starts[r], starts[r + 1]
        if b == a:
            continue
        k = gather_context(k_cache, meta.block_tables[r], seq_len)
        v = gather_context(v_cache, meta.block_tables[r], seq_len)
        out[a:b] = causal_attention(q[a:b], k.to(q.dtype), v.to(q.dtype), scale)
    return out
