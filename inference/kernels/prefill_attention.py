"""Prefill attention over a cached prefix: chunks of new tokens attend causally to their
request's whole paged context (the new tokens' K/V are already written into the cache).

- ``prefill_attention_triton``: a paged flash-attention forward; K/V tiles are gathered
  through the block table. Grouped-query attention in 16-bit dtypes runs the packed
  kernel, one program per (query tile, request, kv head) whose rows are the tile's tokens x
  the group's q heads, so each K/V tile is loaded once for the whole group (the layout of
  vLLM's Triton unified attention); otherwise one program per (query tile, request, head).
- ``prefill_attention_reference``: plain torch over a padded [requests, max_query_len]
  layout, vectorized and free of host syncs.

Layout: request ``r`` owns query rows ``query_start_loc[r]:query_start_loc[r+1]``; they are
the last ``q_len`` tokens of its ``seq_lens[r]``-token context. Rows past
``query_start_loc[-1]`` are padding and come back as zeros.

Options (GPT-OSS): ``window`` > 0 lets the query at position p see keys p - window + 1 .. p
only (the kernel skips key tiles before a query tile's window); ``sinks`` [num_heads] adds
one learned logit per head to every softmax denominator.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path needs no Triton
    triton = None
    tl = None

LOG2E = 1.4426950408889634
NO_WINDOW = 1 << 30   # stands for "no window" inside the kernel: no context is this long


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      scale: float, max_query_len: int, max_seq_len: int, window: int = 0,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of ``q [T, num_heads, head_dim]`` over each request's paged context.

    Triton on CUDA, plain torch elsewhere. ``max_query_len`` / ``max_seq_len`` are host-side
    upper bounds (they size launch grids and buffers, so no device value is read back).
    """
    if q.is_cuda and triton is not None:
        return prefill_attention_triton(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                                        scale, max_query_len, max_seq_len, window, sinks)
    return prefill_attention_reference(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                                       scale, max_query_len, max_seq_len, window, sinks)


def _token_layout(query_start_loc: torch.Tensor, num_tokens: int, max_query_len: int):
    """Per query row: its request, its index inside the request's chunk, and validity."""
    num_reqs = query_start_loc.shape[0] - 1
    tokens = torch.arange(num_tokens, device=query_start_loc.device)
    starts = query_start_loc.long()
    req = torch.searchsorted(starts[1:], tokens, right=True)
    valid = req < num_reqs
    req = req.clamp(max=max(num_reqs - 1, 0))
    local = tokens - starts[req]
    valid &= local < max_query_len
    return req, local, valid


def prefill_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                                seq_lens: torch.Tensor, scale: float, max_query_len: int,
                                max_seq_len: int, window: int = 0,
                                sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch prefill attention in fp32, same contract as ``prefill_attention``.

    Memory is ``R * num_heads * max_query_len * max_seq_len`` scores: a reference and CPU
    path, not meant for long mixed batches on a GPU.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_reqs = block_tables.shape[0]
    _, block_size, kv_heads, _ = k_cache.shape
    group = num_heads // kv_heads
    if num_tokens == 0 or num_reqs == 0 or max_query_len == 0:
        return torch.zeros_like(q)
    req, local, valid = _token_layout(query_start_loc, num_tokens, max_query_len)
    # Padding rows are parked in one spare slot past the padded layout.
    slot = torch.where(valid, req * max_query_len + local, num_reqs * max_query_len)
    q_pad = q.new_zeros(num_reqs * max_query_len + 1, num_heads, head_dim, dtype=torch.float32)
    q_pad.index_copy_(0, slot, q.float())
    q_pad = q_pad[:-1].reshape(num_reqs, max_query_len, kv_heads, group, head_dim)

    num_ctx_blocks = -(-max_seq_len // block_size)
    blocks = block_tables[:, :num_ctx_blocks].long().clamp(0, k_cache.shape[0] - 1)
    k = k_cache[blocks].reshape(num_reqs, -1, kv_heads, head_dim)[:, :max_seq_len].float()
    v = v_cache[blocks].reshape(num_reqs, -1, kv_heads, head_dim)[:, :max_seq_len].float()
    scores = torch.einsum("rqhgd,rkhd->rhgqk", q_pad, k) * scale

    seq = seq_lens.long()
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    q_pos = (seq - q_lens)[:, None] + torch.arange(max_query_len, device=q.device)[None, :]
    key_pos = torch.arange(k.shape[1], device=q.device)
    allowed = (key_pos[None, None, :] <= q_pos[:, :, None]) & (key_pos[None, None, :] < seq[:, None, None])
    if window > 0:
        allowed &= key_pos[None, None, :] > q_pos[:, :, None] - window
    allowed = allowed[:, None, None, :, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)
    sink = None if sinks is None else sinks.float().reshape(1, kv_heads, group, 1, 1)
    if sink is not None:
        row_max = torch.maximum(row_max, sink)
    probs = torch.exp(scores - row_max) * allowed
    denom = probs.sum(dim=-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink - row_max)
    probs = probs / denom.clamp(min=torch.finfo(torch.float32).tiny)
    out_pad = torch.einsum("rhgqk,rkhd->rqhgd", probs, v).reshape(num_reqs * max_query_len, num_heads, head_dim)
    out_pad = torch.cat([out_pad, out_pad.new_zeros(1, num_heads, head_dim)])
    return out_pad.index_select(0, slot).to(q.dtype)


def packed_by_default(group: int, element_size: int) -> bool:
    """Whether ``prefill_attention_triton`` runs the packed kernel when not told: grouped
    queries (``group`` q heads per kv head) in a 16-bit dtype. MHA gains nothing from
    packing, and fp32 tiles of group x tokens rows leave too few registers."""
    return group > 1 and element_size == 2


def default_prefill_launch(head_dim: int, element_size: int, max_query_len: int, packed: bool = False,
                           group: int = 1) -> dict:
    """The kernel's tile and launch defaults for a head_dim, element size (bytes), the
    step's longest chunk, the kernel variant and the query group.

    Per-head kernel, tuned on the H200 (tools/tune_prefill_attention.py,
    docs/bench/prefill_attention_tuning_h200.json): 128-row tiles with 8 warps for 16-bit
    chunks longer than 64 tokens at head_dim <= 128, within 1% of each shape's best; short
    chunks (mixed steps' decode rows) keep 64-row tiles, which waste less on padding rows.
    Packed kernel (``block_m`` counts rows of block_m // group tokens x group heads, at
    least ``group`` of them): the same 128-row, 8-warp tiles once the longest chunk's rows
    (tokens x group) pass 64, else the fewest rows that hold them; not yet tuned."""
    if packed:
        rows = max(max_query_len, 1) * group
        if element_size >= 4:
            launch = {"block_m": 32, "block_n": 32, "num_warps": 4, "num_stages": None}
        elif rows > 64 and head_dim <= 128:
            launch = {"block_m": 128, "block_n": 64 if head_dim <= 64 else 128, "num_warps": 8, "num_stages": 2}
        else:
            launch = {"block_m": min(64, max(16, _next_power_of_2(rows))), "block_n": 64, "num_warps": 4,
                      "num_stages": None}
        launch["block_m"] = max(launch["block_m"], _next_power_of_2(group))
        return launch
    if element_size >= 4:  # fp32 tiles need twice the registers
        return {"block_m": 32, "block_n": 32, "num_warps": 4, "num_stages": None}
    if max_query_len > 64 and head_dim <= 128:
        return {"block_m": 128, "block_n": 64 if head_dim <= 64 else 128, "num_warps": 8, "num_stages": 2}
    return {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": None}


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _prefill_launch(head_dim: int, element_size: int, max_query_len: int, packed: bool, group: int,
                    block_m: int | None, block_n: int | None, num_warps: int | None,
                    num_stages: int | None) -> dict:
    """``default_prefill_launch`` with the caller's knobs applied and checked."""
    launch = default_prefill_launch(head_dim, element_size, max_query_len, packed, group)
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None:
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
            launch[name] = value
    if num_warps is not None:
        if num_warps < 1 or num_warps & (num_warps - 1):
            raise ValueError(f"num_warps must be a power of two >= 1, got {num_warps}")
        launch["num_warps"] = num_warps
    if num_stages is not None:
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        launch["num_stages"] = num_stages
    if packed and launch["block_m"] < group:
        raise ValueError(f"packed block_m ({launch['block_m']}) must be >= the query group ({group}): "
                         "each program packs block_m // group tokens x group heads")
    return launch


def prefill_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                             seq_lens: torch.Tensor, scale: float, max_query_len: int,
                             max_seq_len: int, window: int = 0,
                             sinks: torch.Tensor | None = None, block_m: int | None = None,
                             block_n: int | None = None, num_warps: int | None = None,
                             num_stages: int | None = None, packed: bool | None = None) -> torch.Tensor:
    """Triton paged flash-attention forward; same contract as ``prefill_attention``.

    ``packed`` picks the kernel: True, one program per (query tile, request, kv head) whose
    rows are the tile's tokens x the group's q heads (each K/V tile loaded once per group);
    False, one program per (query tile, request, q head); None, packed for grouped queries
    in 16-bit dtypes. ``block_m`` (query rows per program; packed: tokens x heads, at least
    the group), ``block_n`` (keys per tile), ``num_warps`` and ``num_stages`` are tuning
    knobs; None takes ``default_prefill_launch``."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    del max_seq_len  # the kernel bounds each program's loop by its own seq_len
    num_tokens, num_heads, head_dim = q.shape
    num_reqs = block_tables.shape[0]
    _, block_size, kv_heads, _ = k_cache.shape
    if num_heads % kv_heads:
        raise ValueError(f"{num_heads} q heads are not a multiple of {kv_heads} kv heads")
    group = num_heads // kv_heads
    if packed is None:
        packed = packed_by_default(group, q.element_size())
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need a contiguous head_dim")
    launch = _prefill_launch(head_dim, q.element_size(), max_query_len, packed, group,
                             block_m, block_n, num_warps, num_stages)
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_reqs == 0 or max_query_len == 0:
        return out
    extra = {"num_warps": launch["num_warps"]}
    if launch["num_stages"] is not None:
        extra["num_stages"] = launch["num_stages"]
    if packed:
        block_q = launch["block_m"] // group
        kernel, grid = _prefill_packed_kernel, (triton.cdiv(max_query_len, block_q), num_reqs, kv_heads)
        extra["BLOCK_Q"] = block_q
    else:
        kernel, grid = _prefill_kernel, (triton.cdiv(max_query_len, launch["block_m"]), num_reqs, num_heads)
    kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
        sinks.float().contiguous() if sinks is not None else out, scale * LOG2E, window if window > 0 else NO_WINDOW,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, KV_BLOCK_SIZE=block_size,
        BLOCK_M=launch["block_m"], BLOCK_N=launch["block_n"],
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),  # tl.dot: K >= 16
        HAS_SINKS=sinks is not None, HAS_WINDOW=window > 0, **extra,
    )
    return out


if triton is not None:
    from inference.kernels.paged_decode_triton import load_paged_kv_tile, sink_epilogue

    @triton.jit
    def _attend_tile(q, k_ptr, v_ptr, block_table_ptr, start, hi, q_pos, window, m_i, l_i, acc, kv_head,
                     offs_d, d_mask, qk_scale, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                     KV_BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
        """One key tile of the online softmax; ``MASKED`` False: every key of the tile is
        visible to every query row (no causal, window or length mask is applied)."""
        tok = start + tl.arange(0, BLOCK_N)
        t_mask = tok < hi
        k, v = load_paged_kv_tile(k_ptr, v_ptr, block_table_ptr, tok, t_mask,
                                  kv_head, offs_d, d_mask, stride_kb, stride_kt, stride_kh,
                                  stride_vb, stride_vt, stride_vh, KV_BLOCK_SIZE)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        if MASKED:
            visible = t_mask[None, :] & (tok[None, :] <= q_pos[:, None]) & (tok[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
        # With a window a row may see no key of a tile: a finite stand-in for its max
        # keeps exp2 at 0 instead of NaN.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        return m_new, l_i, acc

    @triton.jit
    def _attend_context(q, q_pos, first_q, seq_len, window, k_ptr, v_ptr, table, kv_head, offs_d, d_mask, qk_scale,
                        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                        SPAN: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
                        BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
        """Online softmax of ``ROWS`` query rows (positions ``q_pos``, all within the
        ``SPAN`` positions from ``first_q``) over one kv head's paged context: returns the
        running max, denominator and unnormalized output (log2 units)."""
        m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([ROWS], dtype=tl.float32)
        acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        # Keys past the tile's last query are causally invisible to all of its rows, keys
        # before its first query's window to all of them.
        hi = tl.minimum(seq_len, first_q + SPAN)
        lo = tl.maximum(first_q - window + 1, 0)
        # Without a window, the tiles wholly at or before the first query's position are
        # visible to every row of the tile: they skip the mask. The rest (the diagonal
        # band; with a window, every tile) are masked.
        mid = lo
        if not HAS_WINDOW:
            mid = tl.minimum(lo + (first_q + 1 - lo) // BLOCK_N * BLOCK_N, hi)
            for start in range(lo, mid, BLOCK_N):
                m_i, l_i, acc = _attend_tile(q, k_ptr, v_ptr, table, start, hi, q_pos, window, m_i, l_i, acc,
                                             kv_head, offs_d, d_mask, qk_scale, stride_kb, stride_kt, stride_kh,
                                             stride_vb, stride_vt, stride_vh, KV_BLOCK_SIZE, BLOCK_N, False)
        for start in range(mid, hi, BLOCK_N):
            m_i, l_i, acc = _attend_tile(q, k_ptr, v_ptr, table, start, hi, q_pos, window, m_i, l_i, acc,
                                         kv_head, offs_d, d_mask, qk_scale, stride_kb, stride_kt, stride_kh,
                                         stride_vb, stride_vt, stride_vh, KV_BLOCK_SIZE, BLOCK_N, True)
        return m_i, l_i, acc

    @triton.jit
    def _prefill_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, sinks_ptr,
        qk_scale, window,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh, stride_bt,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
    ):
        # Query tiles in reverse: the last tiles of a chunk see the most keys, so the
        # longest programs start first and the short ones fill the tail.
        q_tile = tl.num_programs(0) - 1 - tl.program_id(0)
        req = tl.program_id(1)
        head = tl.program_id(2)
        q_start = tl.load(query_start_loc_ptr + req)
        q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
        if q_tile * BLOCK_M >= q_len:
            return
        seq_len = tl.load(seq_lens_ptr + req)
        ctx_len = seq_len - q_len

        offs_m = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < q_len
        d_mask = offs_d < HEAD_DIM
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        m_i, l_i, acc = _attend_context(q, ctx_len + offs_m, ctx_len + q_tile * BLOCK_M, seq_len, window,
                                        k_ptr, v_ptr, block_tables_ptr + req * stride_bt, head // GROUP, offs_d, d_mask,
                                        qk_scale, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                        BLOCK_M, BLOCK_M, BLOCK_D, KV_BLOCK_SIZE, BLOCK_N, HAS_WINDOW)
        if HAS_SINKS:
            l_i, acc = sink_epilogue(m_i, l_i, acc, sinks_ptr, head + tl.zeros([BLOCK_M], dtype=tl.int32), m_mask)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _prefill_packed_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, sinks_ptr,
        qk_scale, window,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh, stride_bt,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_SINKS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    ):
        """Grouped-query prefill: one program per (query tile, request, kv head), its
        BLOCK_M rows are BLOCK_Q tokens x the GROUP q heads sharing the kv head, so every
        K/V tile is loaded once for the whole group."""
        q_tile = tl.num_programs(0) - 1 - tl.program_id(0)  # longest tiles first, as above
        req = tl.program_id(1)
        kv_head = tl.program_id(2)
        q_start = tl.load(query_start_loc_ptr + req)
        q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
        if q_tile * BLOCK_Q >= q_len:
            return
        seq_len = tl.load(seq_lens_ptr + req)
        ctx_len = seq_len - q_len

        # Token-major rows (row r: token r // GROUP, q head kv_head * GROUP + r % GROUP):
        # a token's GROUP heads are adjacent in q and out ([tokens, heads, head_dim]), so
        # the rows a warp loads or stores together form one contiguous run, where
        # head-major rows would sit num_heads * head_dim apart; with a power-of-two GROUP
        # the row -> token / head split is a shift and a mask. When GROUP does not divide
        # BLOCK_M, the last BLOCK_M - BLOCK_Q * GROUP rows are idle.
        offs_r = tl.arange(0, BLOCK_M)
        local_tok = offs_r // GROUP
        offs_m = q_tile * BLOCK_Q + local_tok
        heads = kv_head * GROUP + offs_r % GROUP
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = (local_tok < BLOCK_Q) & (offs_m < q_len)
        d_mask = offs_d < HEAD_DIM
        rows = (q_start + offs_m).to(tl.int64)
        io_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=io_mask, other=0.0)
        m_i, l_i, acc = _attend_context(q, ctx_len + offs_m, ctx_len + q_tile * BLOCK_Q, seq_len, window,
                                        k_ptr, v_ptr, block_tables_ptr + req * stride_bt, kv_head, offs_d, d_mask,
                                        qk_scale, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                        BLOCK_Q, BLOCK_M, BLOCK_D, KV_BLOCK_SIZE, BLOCK_N, HAS_WINDOW)
        if HAS_SINKS:
            l_i, acc = sink_epilogue(m_i, l_i, acc, sinks_ptr, heads, m_mask)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=io_mask)
