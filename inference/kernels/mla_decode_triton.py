"""Multi-head latent attention (MLA) decode over a paged latent cache, absorbed weights.

Each cached token holds ``[latent (L); rotary key (R)]`` in one row shared by every head.
With the key up-projection absorbed into the query (``q_latent = q_nope @ W_UK``), decode is
multi-query attention in latent space: scores ``q_latent . latent + q_rope . k_rope``, output
``softmax @ latent`` ([B, H, L]; the caller applies ``W_UV`` and ``o_proj``). Per decode step
only ``L + R`` elements per token and layer are read, the whole point of MLA.

- ``mla_decode_attention_triton``: one program per (row, block of heads, context split) reads
  each latent tile once for all its heads; splits are merged like paged decode's.
- ``mla_decode_attention_reference``: plain torch (fp32), vectorized, CPU path and reference.

Both are CUDA-graph capturable: no host sync, grids and buffers depend on shapes only.
"""

from __future__ import annotations

import torch

from inference.kernels.paged_decode_triton import LOG2E, check_decode_rows, choose_num_splits, merge_splits

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path needs no Triton
    triton = None
    tl = None


def mla_decode_attention(q_latent: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Latent decode attention, Triton on CUDA, plain torch elsewhere.

    q_latent: [B, H, L]; q_rope: [B, H, R]; cache: [num_blocks + 1, block_size, 1, L + R]
    (the current token already written); block_tables: [B, max_blocks] int32; seq_lens: [B]
    int32. Returns [B, H, L]; rows with ``seq_lens == 0`` are zeros.
    """
    check_decode_rows(q_latent.shape[0], block_tables, seq_lens)
    if q_latent.is_cuda and triton is not None:
        return mla_decode_attention_triton(q_latent, q_rope, cache, block_tables, seq_lens, scale)
    return mla_decode_attention_reference(q_latent, q_rope, cache, block_tables, seq_lens, scale)


def mla_decode_attention_reference(q_latent: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor,
                                   block_tables: torch.Tensor, seq_lens: torch.Tensor,
                                   scale: float) -> torch.Tensor:
    """Plain-torch latent decode (fp32 math); gathers all ``max_blocks`` blocks of every row."""
    batch, _, latent = q_latent.shape
    block_size = cache.shape[1]
    blocks = block_tables.long().clamp(0, cache.shape[0] - 1)
    ctx = blocks.shape[1] * block_size
    kv = cache[blocks].reshape(batch, ctx, cache.shape[-1]).float()
    q = torch.cat([q_latent, q_rope], dim=-1).float()
    scores = torch.einsum("bhd,btd->bht", q, kv) * scale
    valid = (torch.arange(ctx, device=q.device)[None, :] < seq_lens.long()[:, None])[:, None, :]
    scores = scores.masked_fill(~valid, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)
    probs = torch.exp(scores - row_max) * valid
    probs = probs / probs.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.einsum("bht,btl->bhl", probs, kv[..., :latent]).to(q_latent.dtype)


def mla_decode_attention_triton(q_latent: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor,
                                block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                num_splits: int | None = None) -> torch.Tensor:
    """Triton flash-decoding in latent space; ``num_splits`` overrides the heuristic."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    batch, num_heads, latent = q_latent.shape
    rope = q_rope.shape[-1]
    _, block_size, one_head, width = cache.shape
    if one_head != 1 or width != latent + rope:
        raise ValueError(f"latent cache rows must be [1, {latent} + {rope}], got {list(cache.shape[2:])}")
    if cache.stride(-1) != 1:
        raise ValueError("the latent cache needs a contiguous last dimension")
    q_latent = q_latent if q_latent.stride(-1) == 1 else q_latent.contiguous()
    q_rope = q_rope if q_rope.stride(-1) == 1 else q_rope.contiguous()
    out = torch.empty(q_latent.shape, dtype=q_latent.dtype, device=q_latent.device)
    if batch == 0:
        return out
    block_h = 16                      # tl.dot needs 16 rows; small head counts are masked
    head_blocks = triton.cdiv(num_heads, block_h)
    max_blocks = block_tables.shape[1]
    if num_splits is None:
        num_splits = choose_num_splits(batch, head_blocks, max_blocks, block_size, q_latent.device)
    block_l = max(16, triton.next_power_of_2(latent))
    block_n = 16 if block_l >= 256 else 32   # a [BLOCK_N, L] latent tile per iteration
    if num_splits == 1:
        partial_out, partial_lse = out, out
    else:
        partial_out = torch.empty(batch, num_heads, num_splits, latent, device=out.device, dtype=torch.float32)
        partial_lse = torch.empty(batch, num_heads, num_splits, device=out.device, dtype=torch.float32)
    _mla_decode_kernel[(batch, head_blocks, num_splits)](
        q_latent, q_rope, cache, block_tables, seq_lens, partial_out, partial_lse,
        scale * LOG2E, num_heads,
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        cache.stride(0), cache.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        LATENT=latent, ROPE=rope, KV_BLOCK_SIZE=block_size, BLOCK_H=block_h, BLOCK_N=block_n,
        BLOCK_L=block_l, BLOCK_R=max(16, triton.next_power_of_2(rope)), NUM_SPLITS=num_splits,
        num_warps=4, num_stages=2,
    )
    if num_splits > 1:
        merge_splits(partial_out, partial_lse, out, None)
    return out


if triton is not None:

    @triton.jit
    def _mla_decode_kernel(
        q_lat_ptr, q_rope_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, lse_ptr,
        qk_scale, num_heads,
        stride_qlb, stride_qlh, stride_qrb, stride_qrh, stride_cb, stride_ct, stride_ob, stride_oh, stride_bt,
        LATENT: tl.constexpr, ROPE: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, NUM_SPLITS: tl.constexpr,
    ):
        row = tl.program_id(0)
        head_block = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + row)
        # Splits of this row's own context (whole BLOCK_N tiles), sized on the device: the
        # block table's width is the longest context allowed, not this row's.
        tokens_per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * tokens_per_split
        hi = tl.minimum(seq_len, lo + tokens_per_split)

        heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
        h_mask = heads < num_heads
        offs_l = tl.arange(0, BLOCK_L)
        offs_r = tl.arange(0, BLOCK_R)
        l_mask = offs_l < LATENT
        r_mask = offs_r < ROPE
        q_lat = tl.load(q_lat_ptr + row * stride_qlb + heads[:, None] * stride_qlh + offs_l[None, :],
                        mask=h_mask[:, None] & l_mask[None, :], other=0.0)
        q_rope = tl.load(q_rope_ptr + row * stride_qrb + heads[:, None] * stride_qrh + offs_r[None, :],
                         mask=h_mask[:, None] & r_mask[None, :], other=0.0)

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_L], dtype=tl.float32)
        table = block_tables_ptr + row * stride_bt
        for start in range(lo, hi, BLOCK_N):
            tok = start + tl.arange(0, BLOCK_N)
            t_mask = tok < hi
            # Masked tokens may point past the row's blocks, where the table holds any filler.
            block_id = tl.load(table + tok // KV_BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
            base = cache_ptr + block_id * stride_cb + (tok % KV_BLOCK_SIZE) * stride_ct
            lat = tl.load(base[:, None] + offs_l[None, :], mask=t_mask[:, None] & l_mask[None, :], other=0.0)
            k_rope = tl.load(base[:, None] + LATENT + offs_r[None, :], mask=t_mask[:, None] & r_mask[None, :],
                             other=0.0)
            s = tl.dot(q_lat, tl.trans(lat), input_precision="ieee")
            s += tl.dot(q_rope, tl.trans(k_rope), input_precision="ieee")
            s = tl.where(t_mask[None, :], s * qk_scale, float("-inf"))
            # Every tile holds at least one valid token, so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(lat.dtype), lat, input_precision="ieee")
            m_i = m_new

        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        out_mask = h_mask[:, None] & l_mask[None, :]
        if NUM_SPLITS == 1:
            tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + offs_l[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            # partial_out: [B, H, NUM_SPLITS, LATENT], partial_lse: [B, H, NUM_SPLITS], contiguous
            row_head = row * num_heads + heads
            tl.store(out_ptr + (row_head[:, None] * NUM_SPLITS + split) * LATENT + offs_l[None, :], o, mask=out_mask)
            lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            tl.store(lse_ptr + row_head * NUM_SPLITS + split, lse, mask=h_mask)
