"""Plain-torch paged attention: correct on CPU and GPU, the eager path of any step.

One request at a time, with host-side lengths: it gathers only the positions the request's
queries can see (the sliding window, if any) and runs SDPA, or an explicit softmax when
attention sinks join the denominator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inference.model.context import AttentionMetadata


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """Append this step's K/V: row i goes to flat slot ``slot_mapping[i]`` (padding rows
    land in the dummy block). Index-put with a tensor index: no host sync."""
    write_rows(k_cache, slot_mapping, k)
    write_rows(v_cache, slot_mapping, v)


def write_rows(cache: torch.Tensor, slot_mapping: torch.Tensor, rows: torch.Tensor) -> None:
    """``cache`` [num_blocks + 1, block_size, *row_shape] gets ``rows[i]`` at flat slot
    ``slot_mapping[i]``."""
    n = slot_mapping.shape[0]
    cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, rows[:n].to(cache.dtype))


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Cached positions ``start .. end - 1`` of one request: [end - start, *row_shape]."""
    block_size = cache.shape[1]
    first, last = start // block_size, (end + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[first:last].long())
    return blocks.reshape(-1, *cache.shape[2:])[start - first * block_size:end - first * block_size]


def context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key_start: int,
                      window: int = 0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q: [Q, heads, dk] are the last Q positions of a context whose keys k [K, kv_heads, dk]
    and values v [K, kv_heads, dv] start at position ``key_start``."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    q_len, k_len = q.shape[0], k.shape[0]
    qpos = torch.arange(key_start + k_len - q_len, key_start + k_len, device=q.device).unsqueeze(1)
    kpos = torch.arange(key_start, key_start + k_len, device=q.device).unsqueeze(0)
    mask = kpos <= qpos
    if window > 0:
        mask &= kpos > qpos - window
    q_, k_, v_ = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if sinks is None:
        return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, scale=scale).transpose(0, 1)
    scores = (q_.float() @ k_.float().transpose(1, 2) * scale).masked_fill(~mask, float("-inf"))
    # The sink logit joins the normaliser: exp(s) / (sum exp(s) + exp(sink)).
    lse = torch.logsumexp(torch.cat([scores, sinks.float()[:, None, None].expand(-1, q_len, 1)], dim=-1),
                          dim=-1, keepdim=True)
    return (torch.exp(scores - lse) @ v_.float()).to(q.dtype).transpose(0, 1)


def paged_attention_eager(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: AttentionMetadata, scale: float, window: int = 0,
                          sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One request at a time using host-side lengths; padding rows get zeros. The output
    row size is the value size (MLA's latent values are shorter than its keys)."""
    out = q.new_zeros(*q.shape[:2], v_cache.shape[-1])
    starts = meta.query_start_loc_host
    for r, seq_len in enumerate(meta.seq_lens_host):
        a, b = starts[r], starts[r + 1]
        if b == a:
            continue
        key_start = max(0, seq_len - (b - a) - window + 1) if window > 0 else 0
        k = gather_context(k_cache, meta.block_tables[r], key_start, seq_len)
        v = gather_context(v_cache, meta.block_tables[r], key_start, seq_len)
        out[a:b] = context_attention(q[a:b], k.to(q.dtype), v.to(q.dtype), scale, key_start, window, sinks)
    return out
