"""Fused MoE experts in Triton: two grouped GEMMs over expert-aligned blocks of pairs.

Same contract as ``moe_experts_reference`` (``moe_grouped.py``): ``x [T, H]``, ``topk_ids
[T, k]``, ``topk_weights [T, k]``, ``w13 [E, 2I, H]`` (gate rows, then up rows), ``w2 [E,
H, I]``; returns ``[T, H]`` in ``x.dtype``. bf16 / fp16 / fp32 with fp32 accumulation
(``input_precision="ieee"``: fp32 runs exact-fp32 dots, not TF32; 16-bit inputs use the
tensor cores either way).

Pipeline (six launches, no host sync, sizes from shapes only, so graph-capturable); each
stage is a public function so the tuner can time the GEMMs separately:

1. ``align_pairs`` (``moe_align_block_size``, three launches): pairs sorted by expert
   into ``block_m``-aligned segments.
2. ``gate_up_swiglu``: each program takes ``block_m`` sorted pairs of one expert and a
   ``block_n`` slice of the intermediate dimension, accumulates the gate and the up tile
   side by side, and stores ``silu(gate) * up`` (the SwiGLU epilogue) at the pairs'
   sorted positions, so the down GEMM reads contiguous rows.
3. ``down_weighted``: the same blocks against ``w2``; the epilogue multiplies by the pair's
   routing weight (fp32) and stores the row at the pair's own index ``t * k + j``.
4. top-k reduction in one pass: ``[T, k, H] -> [T, H]`` summed in fp32. Every pair row is
   written exactly once, so nothing is zeroed and no atomics make results order-dependent.

Up to a tuned token count (``fused_moe_configs.select_plan``; 2 without a tuned value, or the
caller's ``small_batch_max_tokens``) the small-batch path of ``fused_moe_small.py`` runs
instead: two launches over the pairs in routing order, the top-k sum fused into the down
kernel, the same roundings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from inference.kernels.fused_moe_configs import (
    FusedMoEConfig,
    GemmTiles,
    SmallMoEConfig,
    check_small_batch_max_tokens,
    select_plan,
)
from inference.kernels.fused_moe_small import small_moe_experts
from inference.kernels.moe_align import moe_align_block_size

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the dispatcher never picks this path there
    triton = None
    tl = None

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fused_moe_supported(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether ``fused_moe_experts`` can run on these tensors (dtype, layout, device)."""
    if triton is None or not (x.is_cuda or _interpreting()):
        return False
    if not (x.dtype == w13.dtype == w2.dtype and x.dtype in SUPPORTED_DTYPES):
        return False
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[1] != 2 * w2.shape[2] or w13.shape[2] != w2.shape[1]:
        return False
    return w13.stride(-1) == 1 and w2.stride(-1) == 1


def fused_moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                      w13: torch.Tensor, w2: torch.Tensor,
                      config: FusedMoEConfig | SmallMoEConfig | None = None,
                      small_batch_max_tokens: int | None = None) -> torch.Tensor:
    """Weighted sum of each token's top-k experts with the fused Triton kernels.

    ``config`` pins the path and its tiles: a ``FusedMoEConfig`` runs the aligned path, a
    ``SmallMoEConfig`` the small-batch one; None lets ``fused_moe_configs.select_plan``
    choose from the token count and the tuned files, with ``small_batch_max_tokens`` as the
    small path's threshold (None: the tuned one; 0: never). Expert ids must lie in ``[0, E)``.
    """
    _check_inputs(x, topk_ids, topk_weights, w13, w2)
    check_small_batch_max_tokens(small_batch_max_tokens)
    if config is not None and small_batch_max_tokens is not None:
        raise ValueError("fused MoE: pass config (a pinned path) or small_batch_max_tokens (a threshold), not both")
    num_tokens, hidden = x.shape
    topk = topk_ids.shape[1]
    if num_tokens == 0:
        return torch.empty_like(x)
    if config is None:
        config = select_plan(num_tokens, topk, w13.shape[0], hidden, w2.shape[2], x.dtype, x.device,
                             max_tokens=small_batch_max_tokens)
    if isinstance(config, SmallMoEConfig):
        return small_moe_experts(x, topk_ids, topk_weights, w13, w2, config)
    layout = align_pairs(topk_ids, w13.shape[0], config.block_m)
    h = gate_up_swiglu(x, w13, layout, config.gate_up)
    y = down_weighted(h, w2, topk_weights, layout, config.down)
    if topk == 1:
        return y
    # torch sums bf16 / fp16 in fp32 and rounds once.
    return y.view(num_tokens, topk, hidden).sum(dim=1)


@dataclass(frozen=True)
class PairLayout:
    """(token, k) pairs sorted by expert in ``block_m``-aligned blocks (``moe_align.py``);
    both GEMMs read it, so they share ``block_m``."""

    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    num_padded: torch.Tensor
    block_m: int
    topk: int

    @property
    def num_blocks(self) -> int:
        return self.block_expert.shape[0]


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> PairLayout:
    sorted_ids, block_expert, num_padded = moe_align_block_size(topk_ids, num_experts, block_m)
    return PairLayout(sorted_ids, block_expert, num_padded, block_m, topk_ids.shape[1])


def gate_up_swiglu(x: torch.Tensor, w13: torch.Tensor, layout: PairLayout, tiles: GemmTiles) -> torch.Tensor:
    """``silu(x @ gate.T) * (x @ up.T)`` per pair, ``[len(sorted_ids), I]`` at sorted
    positions (rows of padding slots are zero; rows past ``num_padded`` are not written)."""
    if x.stride(1) != 1:
        x = x.contiguous()
    hidden, intermediate = x.shape[1], w13.shape[1] // 2
    h = torch.empty(layout.sorted_ids.shape[0], intermediate, dtype=x.dtype, device=x.device)
    _gate_up_swiglu_kernel[(layout.num_blocks * triton.cdiv(intermediate, tiles.block_n),)](
        x, w13, h, layout.sorted_ids, layout.block_expert, layout.num_padded, x.shape[0] * layout.topk,
        layout.num_blocks, hidden, intermediate, x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        TOPK=layout.topk, BLOCK_M=layout.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        GROUP_M=tiles.group_m, UPCAST=_upcast(x.dtype), num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return h


def down_weighted(h: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, layout: PairLayout,
                  tiles: GemmTiles) -> torch.Tensor:
    """``weight * (h @ w2[e].T)`` per pair, ``[T * k, H]`` at pair index ``t * k + j``."""
    hidden, intermediate = w2.shape[1], w2.shape[2]
    weights = topk_weights.reshape(-1)
    y = torch.empty(weights.shape[0], hidden, dtype=h.dtype, device=h.device)
    _down_weighted_kernel[(layout.num_blocks * triton.cdiv(hidden, tiles.block_n),)](
        h, w2, y, weights, layout.sorted_ids, layout.block_expert, layout.num_padded, weights.shape[0],
        layout.num_blocks, hidden, intermediate, h.stride(0), w2.stride(0), w2.stride(1), y.stride(0),
        BLOCK_M=layout.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m,
        UPCAST=_upcast(h.dtype), num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return y


def _upcast(dtype: torch.dtype) -> bool:
    # The interpreter multiplies bf16 tiles as raw bits; it checks everything else when fed fp32.
    return _interpreting() and dtype == torch.bfloat16


def _check_inputs(x, topk_ids, topk_weights, w13, w2) -> None:
    if triton is None:
        raise RuntimeError("fused_moe_experts needs triton")
    if x.dim() != 2 or topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"fused MoE: need x [T, H] and topk_ids / topk_weights [T, k], got "
                         f"{tuple(x.shape)}, {tuple(topk_ids.shape)}, {tuple(topk_weights.shape)}")
    if topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"fused MoE: {x.shape[0]} tokens but topk_ids has {topk_ids.shape[0]} rows")
    if not fused_moe_supported(x, w13, w2):
        raise ValueError(f"fused MoE does not apply: x {x.dtype} on {x.device}, w13 {w13.dtype} "
                         f"{tuple(w13.shape)}, w2 {w2.dtype} {tuple(w2.shape)} (need one dtype of "
                         f"{SUPPORTED_DTYPES}, w13 [E, 2I, H], w2 [E, H, I] with contiguous rows, CUDA)")
    if w13.shape[2] != x.shape[1]:
        raise ValueError(f"fused MoE: x has hidden size {x.shape[1]}, w13 expects {w13.shape[2]}")


if triton is not None:

    @triton.jit
    def _block_coordinates(num_blocks, n_cols, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(row block, column block) of this program, ``GROUP_M`` row blocks per column sweep
        so consecutive programs share weight tiles."""
        pid = tl.program_id(0)
        num_n = tl.cdiv(n_cols, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(num_blocks - first_m, GROUP_M)
        return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows

    @triton.jit(do_not_specialize=["num_pairs", "num_blocks"])
    def _gate_up_swiglu_kernel(
        x_ptr, w_ptr, h_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
        num_pairs, num_blocks, hidden, inter, stride_xt, stride_we, stride_wn, stride_ht,
        TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_m, pid_n = _block_coordinates(num_blocks, inter, BLOCK_N, GROUP_M)
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + offs_m)
        row_mask = pair < num_pairs
        token = (pair // TOPK).to(tl.int64)
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Columns past the edge wrap onto valid rows of w13 (loads stay unmasked in N);
        # the store drops them.
        rows_n = (offs_n % inter).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :]
        gate_ptrs = w_ptr + expert * stride_we + rows_n[None, :] * stride_wn + offs_k[:, None]
        up_ptrs = gate_ptrs + inter * stride_wn
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(hidden, BLOCK_K)):
            k_mask = offs_k < hidden - k * BLOCK_K
            a = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            gate = tl.load(gate_ptrs, mask=k_mask[:, None], other=0.0)
            up = tl.load(up_ptrs, mask=k_mask[:, None], other=0.0)
            if UPCAST:
                a, gate, up = a.to(tl.float32), gate.to(tl.float32), up.to(tl.float32)
            acc_gate = tl.dot(a, gate, acc_gate, input_precision="ieee")
            acc_up = tl.dot(a, up, acc_up, input_precision="ieee")
            x_ptrs += BLOCK_K
            gate_ptrs += BLOCK_K
            up_ptrs += BLOCK_K
        # silu(g) * u in fp32; padding rows loaded zeros and store zeros.
        h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
        h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_ht + offs_n[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=(offs_n < inter)[None, :])

    @triton.jit(do_not_specialize=["num_pairs", "num_blocks"])
    def _down_weighted_kernel(
        h_ptr, w_ptr, y_ptr, weights_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
        num_pairs, num_blocks, hidden, inter, stride_ht, stride_we, stride_wn, stride_yp,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_m, pid_n = _block_coordinates(num_blocks, hidden, BLOCK_N, GROUP_M)
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + offs_m)
        row_mask = pair < num_pairs
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_n = (offs_n % hidden).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_ht + offs_k[None, :]
        b_ptrs = w_ptr + expert * stride_we + rows_n[None, :] * stride_wn + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(inter, BLOCK_K)):
            k_mask = offs_k < inter - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision="ieee")
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        weight = tl.load(weights_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * weight[:, None]
        y_ptrs = y_ptr + pair.to(tl.int64)[:, None] * stride_yp + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_n < hidden)[None, :])
