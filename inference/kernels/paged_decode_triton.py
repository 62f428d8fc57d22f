"""Paged decode attention: one new query token per row against its cached context.

Two implementations with one contract:

- ``paged_decode_attention_triton``: a flash-decoding Triton kernel. One program per
  (row, kv head, context split) handles the whole query group of that kv head, so GQA
  reads each K/V block once per group. Long contexts with few rows are split along the
  context and merged by a second small kernel (log-sum-exp weighting).
- ``paged_decode_attention_reference``: plain torch, vectorized (gather every row's blocks,
  mask by ``seq_lens``). Used on CPU and as the fallback.

Both are CUDA-graph capturable: no host sync, every allocation and launch grid depends on
tensor shapes only, never on values such as ``seq_lens``.

Options (GPT-OSS): ``window`` > 0 attends to the last ``window`` positions only (the kernel
reads nothing before them); ``sinks`` [num_heads] adds one learned logit per head to every
softmax denominator (a key whose value is zero).
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path needs no Triton
    triton = None
    tl = None

LOG2E = 1.4426950408889634
# A split should stream enough tokens to amortise its partial-result write and merge.
MIN_TOKENS_PER_SPLIT = 128
MAX_SPLITS = 32
# Without query groups (MHA) a program reads one head row per tile: far less work per
# program, so it needs many more programs in flight, and shorter splits still pay
# (tools/tune_paged_decode.py on the H200, docs/bench/paged_decode_tuning_h200.json: OLMoE's
# shape ran 1.2-1.3x faster at batch 16-64 with 8-32 splits than with the grouped rule).
MHA_PROGRAMS_PER_SM = 64
MHA_MIN_TOKENS_PER_SPLIT = 32
# Whether MHA (no query groups) takes the tl.dot path by default (``use_dot``): on the H200
# (tools/tune_paged_decode.py --quick, OLMoE's shape, docs/bench/paged_decode_mha_dot_h200.json)
# its best launch beat the element-wise path's 1.65-1.81x at batch 16-256 (up to 4.2 TB/s
# against 2.4) and 1.12x at batch 1 with a 544-token context.
MHA_USE_DOT = True
# Stands for "no window" inside the kernels: no context is this long.
NO_WINDOW = 1 << 30


def triton_available() -> bool:
    """Whether the Triton kernels can be launched at all (GPU or TRITON_INTERPRET=1)."""
    return triton is not None


def check_decode_rows(batch: int, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """A decode kernel reads row r's length and block table for query row r, padding rows
    included (seq_len 0): fewer metadata rows than query rows would be read out of bounds."""
    if block_tables.shape[0] != batch or seq_lens.shape[0] != batch:
        raise ValueError(f"decode attention needs one block-table row and one seq_len per query row: "
                         f"{batch} query rows, {block_tables.shape[0]} block-table rows, "
                         f"{seq_lens.shape[0]} seq_lens")


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           window: int = 0, sinks: torch.Tensor | None = None,
                           mha_dot: bool | None = None) -> torch.Tensor:
    """Decode attention over a paged KV cache, Triton on CUDA, plain torch elsewhere.

    q: [B, num_heads, head_dim]; k_cache, v_cache: [num_blocks + 1, block_size, kv_heads,
    head_dim]; block_tables: [B, max_blocks] int32; seq_lens: [B] int32 (the current token's
    KV is already in the cache). Rows with ``seq_lens == 0`` return zeros. ``mha_dot``: the
    Triton kernel's ``use_dot`` for MHA shapes (None: its default); models with query groups
    keep the kernel's default whatever it says.
    """
    check_decode_rows(q.shape[0], block_tables, seq_lens)
    if q.is_cuda and triton is not None:
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                             window=window, sinks=sinks,
                                             use_dot=mha_dot if q.shape[1] == k_cache.shape[2] else None)
    return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, scale, window, sinks)


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                     window: int = 0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch decode attention (fp32 math), same contract as ``paged_decode_attention``.

    Gathers all ``max_blocks`` blocks of every row, so memory is
    ``B * max_blocks * block_size * kv_heads * head_dim``: fine for CPU and fallback use.
    """
    batch, num_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = num_heads // kv_heads
    # Entries past a row's last block may hold any filler; clamping keeps the gather in
    # bounds and the seq_lens mask discards what it reads.
    blocks = block_tables.long().clamp(0, k_cache.shape[0] - 1)
    ctx = blocks.shape[1] * block_size
    k = k_cache[blocks].reshape(batch, ctx, kv_heads, head_dim).float()
    v = v_cache[blocks].reshape(batch, ctx, kv_heads, head_dim).float()
    qg = q.float().reshape(batch, kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bthd->bhgt", qg, k) * scale
    pos = torch.arange(ctx, device=q.device)[None, :]
    lens = seq_lens.long()[:, None]
    valid = pos < lens
    if window > 0:
        valid &= pos >= lens - window
        # What lies before the window is never used, whatever it holds (even NaN).
        v = v.masked_fill(~valid[:, :, None, None], 0.0)
    valid = valid[:, None, None, :]
    scores = scores.masked_fill(~valid, float("-inf"))
    # Rows with no valid token would softmax to NaN; a finite max keeps them at zero.
    row_max = scores.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)
    sink = None
    if sinks is not None:
        sink = sinks.float().reshape(1, kv_heads, group, 1)
        row_max = torch.maximum(row_max, sink)
    probs = torch.exp(scores - row_max) * valid
    denom = probs.sum(dim=-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink - row_max)
    denom = denom.clamp(min=torch.finfo(torch.float32).tiny)
    out = torch.einsum("bhgt,bthd->bhgd", probs / denom, v)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def choose_num_splits(batch: int, kv_heads: int, max_blocks: int, block_size: int,
                      device: torch.device, grouped: bool = True) -> int:
    """Context splits per (row, kv head): enough programs to fill the GPU, from shapes only.
    ``grouped``: the kernel processes a group of query heads per program (GQA / MQA / MLA);
    False for MHA, which wants more and shorter splits."""
    if device.type != "cuda":
        return 1
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = batch * kv_heads
    per_sm, min_tokens = (2, MIN_TOKENS_PER_SPLIT) if grouped else (MHA_PROGRAMS_PER_SM, MHA_MIN_TOKENS_PER_SPLIT)
    wanted = math.ceil(per_sm * num_sms / programs)
    worthwhile = math.ceil(max_blocks * block_size / min_tokens)
    return max(1, min(wanted, worthwhile, MAX_SPLITS))


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                  num_splits: int | None = None, window: int = 0,
                                  sinks: torch.Tensor | None = None, block_n: int | None = None,
                                  num_warps: int = 4, num_stages: int | None = None,
                                  use_dot: bool | None = None) -> torch.Tensor:
    """Triton flash-decoding kernel; ``num_splits`` overrides the shape-based heuristic.
    With a window the splits partition the window, not the whole context. ``block_n``
    (context tokens per tile; default 64 with query groups, else 32), ``num_warps`` and
    ``num_stages`` (Triton's default when None) are tuning knobs (tools/tune_paged_decode.py).
    ``use_dot`` (None: with query groups, and for MHA when ``MHA_USE_DOT``) computes scores
    and the weighted V sum with ``tl.dot``; False runs the element-wise path (a group's
    heads padded to a power of two). Without groups (MHA) the dot path pads the single query
    row to 16 rows, which costs the tensor cores nothing a memory-bound step can see, in
    exchange for the dot path's load and register layouts (the H200 tuning saw MHA's
    element-wise path cap near 2.3 TB/s where the grouped dot path reached 3.4-3.9)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    batch, num_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = num_heads // kv_heads
    max_blocks = block_tables.shape[1]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need a contiguous head_dim")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    span = max_blocks * block_size if window <= 0 else min(window, max_blocks * block_size)
    if num_splits is None:   # the split rule follows the work per program: one head row without groups
        num_splits = choose_num_splits(batch, kv_heads, -(-span // block_size), block_size, q.device,
                                       grouped=group > 1)
    use_dot = (group > 1 or MHA_USE_DOT) if use_dot is None else bool(use_dot)
    if block_n is None:
        block_n = 64 if use_dot else 32
    elif block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    launch = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    has_sinks = sinks is not None
    sinks_arg = sinks.float().contiguous() if has_sinks else out
    # tl.dot needs M >= 16; the element-wise path takes any power of two (1 without groups).
    block_g = max(16, triton.next_power_of_2(group)) if use_dot else triton.next_power_of_2(group)
    if num_splits == 1:
        partial_out, partial_lse = out, out  # lse is never written in single-split mode
    else:
        partial_out = torch.empty(batch, num_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
        partial_lse = torch.empty(batch, num_heads, num_splits, device=q.device, dtype=torch.float32)
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, partial_out, partial_lse, sinks_arg,
        scale * LOG2E, window if window > 0 else NO_WINDOW,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, KV_BLOCK_SIZE=block_size,
        BLOCK_G=block_g, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)) if use_dot else triton.next_power_of_2(head_dim),  # tl.dot: K >= 16
        NUM_SPLITS=num_splits, USE_DOT=use_dot, HAS_SINKS=has_sinks and num_splits == 1, **launch,
    )
    if num_splits > 1:
        merge_splits(partial_out, partial_lse, out, sinks_arg if has_sinks else None)
    return out


def merge_splits(partial_out: torch.Tensor, partial_lse: torch.Tensor, out: torch.Tensor,
                 sinks: torch.Tensor | None) -> None:
    """Combine per-split results [B, H, S, D] (log2-sum-exp [B, H, S]) into ``out`` [B, H, D];
    ``sinks`` [H] fp32 join the denominator once."""
    batch, num_heads, num_splits, head_dim = partial_out.shape
    _decode_merge_kernel[(batch, num_heads)](
        partial_out, partial_lse, sinks if sinks is not None else out, out, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
        BLOCK_D=triton.next_power_of_2(head_dim), HAS_SINKS=sinks is not None, num_warps=4,
    )


if triton is not None:

    @triton.jit
    def load_paged_kv_tile(
        k_ptr, v_ptr, block_table_ptr, tok, t_mask, kv_head, offs_d, d_mask,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        KV_BLOCK_SIZE: tl.constexpr,
    ):
        """K and V rows [len(tok), len(offs_d)] of one kv head for context positions ``tok``,
        gathered through one request's block table row; masked tokens and dims read 0."""
        # Masked tokens may point past the row's blocks, where the table holds any filler.
        block_id = tl.load(block_table_ptr + tok // KV_BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        slot = tok % KV_BLOCK_SIZE
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + block_id[:, None] * stride_kb + slot[:, None] * stride_kt
                    + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + block_id[:, None] * stride_vb + slot[:, None] * stride_vt
                    + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        return k, v

    @triton.jit
    def sink_epilogue(m_i, l_i, acc, sinks_ptr, heads, g_mask):
        """Add each head's sink logit to the softmax denominator (log2 units inside)."""
        sink = tl.load(sinks_ptr + heads, mask=g_mask, other=0.0).to(tl.float32) * 1.4426950408889634
        m_f = tl.maximum(m_i, sink)
        rescale = tl.exp2(m_i - m_f)
        return l_i * rescale + tl.exp2(sink - m_f), acc * rescale[:, None]

    @triton.jit
    def _decode_split_kernel(
        q_ptr, k_ptr, v_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, lse_ptr, sinks_ptr,
        qk_scale, window,
        stride_qb, stride_qh, stride_ob, stride_oh, stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh, stride_bt,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        NUM_SPLITS: tl.constexpr, USE_DOT: tl.constexpr, HAS_SINKS: tl.constexpr,
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + row)
        # Splits partition this row's own span, the window [seq_len - window, seq_len) (nothing
        # before it is read), in whole BLOCK_N tiles so only a split's last tile is partial.
        # Sized per row on the device, not from the block table's width: in a decode graph
        # that width is the longest context the engine allows, and splits cut from it would
        # leave a short row to its first split alone.
        first = tl.maximum(seq_len - window, 0)
        tokens_per_split = tl.cdiv(tl.cdiv(seq_len - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = first + split * tokens_per_split
        hi = tl.minimum(seq_len, lo + tokens_per_split)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        heads = kv_head * GROUP + offs_g
        g_mask = offs_g < GROUP
        d_mask = offs_d < HEAD_DIM
        q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            tok = start + tl.arange(0, BLOCK_N)
            t_mask = tok < hi
            k, v = load_paged_kv_tile(k_ptr, v_ptr, block_tables_ptr + row * stride_bt, tok, t_mask,
                                      kv_head, offs_d, d_mask, stride_kb, stride_kt, stride_kh,
                                      stride_vb, stride_vt, stride_vh, KV_BLOCK_SIZE)
            if USE_DOT:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.sum(q[:, None, :].to(tl.float32) * k[None, :, :].to(tl.float32), axis=2)
            s = tl.where(t_mask[None, :], s * qk_scale, float("-inf"))
            # Every tile holds at least one valid token, so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if USE_DOT:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :].to(tl.float32), axis=1)
            m_i = m_new

        if HAS_SINKS:  # single split only; the merge adds sinks otherwise
            l_i, acc = sink_epilogue(m_i, l_i, acc, sinks_ptr, heads, g_mask)
        # Empty rows/splits keep l_i == 0: emit zeros (and lse = -inf) instead of NaN.
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        out_mask = g_mask[:, None] & d_mask[None, :]
        if NUM_SPLITS == 1:
            tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            # partial_out: [B, H, NUM_SPLITS, HEAD_DIM], partial_lse: [B, H, NUM_SPLITS], contiguous
            row_head = row * (GROUP * tl.num_programs(1)) + heads
            tl.store(out_ptr + (row_head[:, None] * NUM_SPLITS + split) * HEAD_DIM + offs_d[None, :],
                     o, mask=out_mask)
            lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            tl.store(lse_ptr + row_head * NUM_SPLITS + split, lse, mask=g_mask)

    @triton.jit
    def _decode_merge_kernel(
        partial_out_ptr, partial_lse_ptr, sinks_ptr, out_ptr, stride_ob, stride_oh,
        HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_SINKS: tl.constexpr,
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        row_head = row * tl.num_programs(1) + head
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_mask = offs_s < NUM_SPLITS
        d_mask = offs_d < HEAD_DIM
        lse = tl.load(partial_lse_ptr + row_head * NUM_SPLITS + offs_s, mask=s_mask, other=float("-inf"))
        o = tl.load(partial_out_ptr + (row_head * NUM_SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        lse_max = tl.max(lse, axis=0)
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
            lse_max = tl.maximum(lse_max, sink)
        # All splits empty (seq_len 0): every weight is exp2(-inf) = 0 and the row stays zero.
        safe_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
        weight = tl.exp2(lse - safe_max)
        total = tl.sum(weight, axis=0)
        if HAS_SINKS:
            total += tl.exp2(sink - safe_max)
        merged = tl.sum(o * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + row * stride_ob + head * stride_oh + offs_d,
                 merged.to(out_ptr.dtype.element_ty), mask=d_mask)
