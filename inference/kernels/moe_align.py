"""Sort (token, k) pairs by expert into BLOCK_M-aligned segments, on the device.

The fused MoE GEMMs (``fused_moe.py``) give each program ``BLOCK_M`` rows that all belong
to one expert. ``moe_align_block_size`` lays the ``P = T * topk`` pairs out that way:

- ``sorted_pair_ids [num_blocks * BLOCK_M]`` int32: expert ``e``'s pairs occupy one
  segment starting at a multiple of ``BLOCK_M``; each segment is padded up to a multiple of
  ``BLOCK_M`` with the sentinel ``P``. Entries at or past ``num_padded`` are also ``P``.
- ``block_expert_ids [num_blocks]`` int32: the expert of every block (blocks at or past
  ``num_padded`` hold some valid expert id and are never computed).
- ``num_padded [1]`` int32: the used length, a multiple of ``BLOCK_M``.

All sizes come from shapes only: ``num_blocks = cdiv(P + min(E, P) * (BLOCK_M - 1),
BLOCK_M)`` bounds the padded length (each non-empty expert adds fewer than ``BLOCK_M``
padding slots), so nothing reads a count on the host and CUDA graphs can capture it.

The Triton version ranks pairs within their expert with atomics, so the order of pairs
inside a segment may vary between runs; every pair's GEMM row is computed independently
of its neighbours, so results do not. The torch version (a stable sort) runs anywhere.
Expert ids must lie in ``[0, E)``: the Triton kernels skip others (no out-of-bounds
write), which leaves those pairs without a slot.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use the torch version
    triton = None
    tl = None

ALIGN_BLOCK = 256          # pairs per program of the count / scatter kernels
ALIGN_MATRIX_ELEMENTS = 8192  # bound on [pairs x experts] one-hot tiles held in registers


def padded_pair_capacity(num_pairs: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """(num_blocks, length of ``sorted_pair_ids``) for ``num_pairs`` pairs: shapes only."""
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    num_blocks = -(-bound // block_m)
    return num_blocks, num_blocks * block_m


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int,
                         block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_pair_ids, block_expert_ids, num_padded) for ``topk_ids [T, k]``; Triton on
    CUDA (or under TRITON_INTERPRET=1), the torch version elsewhere."""
    if triton is not None and (topk_ids.is_cuda or _interpreting()):
        return moe_align_block_size_triton(topk_ids, num_experts, block_m)
    return moe_align_block_size_reference(topk_ids, num_experts, block_m)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def moe_align_block_size_reference(topk_ids: torch.Tensor, num_experts: int,
                                   block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable-sort version with the same outputs; sync-free on CUDA as well."""
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    num_blocks, capacity = padded_pair_capacity(num_pairs, num_experts, block_m)
    device = topk_ids.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    start = counts.cumsum(0) - counts
    order = torch.argsort(flat, stable=True)
    expert_of_sorted = flat[order]
    rank = torch.arange(num_pairs, device=device) - start[expert_of_sorted]
    sorted_ids = torch.full((capacity,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, padded_start[expert_of_sorted] + rank, order.to(torch.int32))
    block_starts = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).clamp_(max=num_experts - 1)
    num_padded = padded_end[-1:].to(torch.int32)
    return sorted_ids, block_expert.to(torch.int32), num_padded


def moe_align_block_size_triton(topk_ids: torch.Tensor, num_experts: int,
                                block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three launches: zero the counts, count + rank (+ sentinel fill), scatter."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    flat = topk_ids.reshape(-1)
    num_pairs = flat.numel()
    num_blocks, capacity = padded_pair_capacity(num_pairs, num_experts, block_m)
    device = topk_ids.device
    sorted_ids = torch.empty(capacity, dtype=torch.int32, device=device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=device)
    if num_pairs == 0:
        return sorted_ids, block_expert, torch.zeros(1, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    ranks = torch.empty(num_pairs, dtype=torch.int32, device=device)
    _count_rank_kernel[(triton.cdiv(capacity, ALIGN_BLOCK),)](
        flat, counts, ranks, sorted_ids, num_pairs, capacity, num_experts, BLOCK=ALIGN_BLOCK)
    block_e = triton.next_power_of_2(num_experts)
    block = max(16, min(ALIGN_BLOCK, ALIGN_MATRIX_ELEMENTS // block_e))
    grid = triton.cdiv(max(num_pairs, num_blocks), block)
    _scatter_kernel[(grid,)](
        flat, counts, ranks, sorted_ids, block_expert, num_padded, num_pairs, num_blocks, num_experts,
        BLOCK_M=block_m, BLOCK=block, BLOCK_E=block_e)
    return sorted_ids, block_expert, num_padded


if triton is not None:

    @triton.jit(do_not_specialize=["num_pairs", "capacity"])
    def _count_rank_kernel(ids_ptr, counts_ptr, ranks_ptr, sorted_ptr, num_pairs, capacity, num_experts,
                           BLOCK: tl.constexpr):
        """Rank of each pair among its expert's pairs (atomic ticket), and the sentinel in
        every slot of ``sorted_pair_ids`` (the scatter kernel, launched after, overwrites the
        slots of real pairs)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(sorted_ptr + offs, tl.full([BLOCK], 0, tl.int32) + num_pairs, mask=offs < capacity)
        pair_mask = offs < num_pairs
        expert = tl.load(ids_ptr + offs, mask=pair_mask, other=0).to(tl.int32)
        valid = pair_mask & (expert >= 0) & (expert < num_experts)
        rank = tl.atomic_add(counts_ptr + expert, 1, mask=valid)
        tl.store(ranks_ptr + offs, rank, mask=valid)

    @triton.jit
    def _padded_layout(counts_ptr, num_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
        """Per-expert padded segment sizes and inclusive ends, over ``BLOCK_E`` lanes."""
        offs_e = tl.arange(0, BLOCK_E)
        counts = tl.load(counts_ptr + offs_e, mask=offs_e < num_experts, other=0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        return offs_e, padded, tl.cumsum(padded, 0)

    @triton.jit(do_not_specialize=["num_pairs", "num_blocks"])
    def _scatter_kernel(ids_ptr, counts_ptr, ranks_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
                        num_pairs, num_blocks, num_experts,
                        BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
        """Program p places pairs [p*BLOCK, (p+1)*BLOCK) and labels blocks of the same range
        with their expert; every program recomputes the (small) exclusive scan over experts
        instead of sharing it, so one launch suffices."""
        pid = tl.program_id(0)
        offs_e, padded, padded_end = _padded_layout(counts_ptr, num_experts, BLOCK_M, BLOCK_E)
        padded_start = padded_end - padded
        offs = pid * BLOCK + tl.arange(0, BLOCK)

        pair_mask = offs < num_pairs
        expert = tl.load(ids_ptr + offs, mask=pair_mask, other=0).to(tl.int32)
        valid = pair_mask & (expert >= 0) & (expert < num_experts)
        rank = tl.load(ranks_ptr + offs, mask=valid, other=0)
        # Register tensors cannot be indexed by a tensor: select the start with a one-hot sum.
        one_hot = offs_e[None, :] == expert[:, None]
        start = tl.sum(tl.where(one_hot, padded_start[None, :], 0), axis=1)
        tl.store(sorted_ptr + start + rank, offs.to(tl.int32), mask=valid)

        block_start = offs * BLOCK_M
        owner = tl.sum((padded_end[None, :] <= block_start[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + offs, tl.minimum(owner, num_experts - 1), mask=offs < num_blocks)
        if pid == 0:
            tl.store(num_padded_ptr, tl.sum(padded, axis=0))
