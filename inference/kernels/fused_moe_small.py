"""Small-batch fused MoE experts: two launches, no expert alignment, no separate reduction.

At one or two decode tokens no two (token, k) pairs are likely to share an expert, so the
aligned path's sort (``moe_align.py``, three launches) and its top-k sum (a fourth) are pure
overhead. This path reads ``topk_ids`` directly:

1. ``_small_gate_up_kernel``, grid ``(T * k, cdiv(I, block_n))``: program ``(p, n)`` takes
   pair ``p`` (token ``p // k``, expert ``topk_ids.flat[p]``) and stores
   ``h[p, n-block] = silu(x_t @ gate_e[n-block].T) * (x_t @ up_e[n-block].T)``.
2. ``_small_down_kernel``, grid ``(T, cdiv(H, block_n))``: program ``(t, n)`` holds the tiles
   of all ``k`` experts of token ``t`` at once (``[k, block_n, block_k]``, so every K step
   keeps ``k`` weight streams in flight), and stores ``out[t, n-block] = sum_j w_j * (h[t*k+j]
   @ w2[e_j, n-block].T)`` once.

Same contract and precision as ``fused_moe_experts`` (``fused_moe.py``): the products are
computed as fp32 multiply-adds on upcast tiles (no ``tl.dot``, so fp32 inputs get exact fp32
arithmetic and 16-bit inputs fp32 accumulation, as ``input_precision="ieee"`` there).

Roundings match the aligned path, so 16-bit results of the two paths agree up to fp32
summation order: ``h`` is rounded to ``x.dtype`` (the aligned gate/up kernel stores it so);
each pair's weighted product ``w_j * (h @ w2.T)`` is rounded to ``x.dtype`` before the sum
(the aligned down kernel stores pair rows in ``x.dtype``); the sum over ``k`` runs in fp32
and is rounded once (as torch's ``.sum(dim=1)`` of those rows). Skipping the per-pair
rounding would be slightly closer to the fp32 reference, but then switching paths at the
threshold would change bf16 outputs (and with them sampled tokens) between batch sizes.

Sizes and grids come from shapes only and nothing syncs, so CUDA graphs capture it; ids
must lie in ``[0, E)`` (not checked on the device). Callers pass inputs that
``fused_moe_experts`` has validated.
"""

from __future__ import annotations

import torch

from inference.kernels.fused_moe_configs import SmallMoEConfig

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the dispatcher never picks this path there
    triton = None
    tl = None


def small_moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                      w13: torch.Tensor, w2: torch.Tensor, config: SmallMoEConfig) -> torch.Tensor:
    """``[T, H] -> [T, H]``: the weighted sum of each token's top-k experts in two launches."""
    if x.shape[0] == 0:
        return torch.empty_like(x)
    h = small_gate_up(x, topk_ids, w13, config)
    return small_down(h, topk_ids, topk_weights, w2, config)


def small_gate_up(x: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor, config: SmallMoEConfig) -> torch.Tensor:
    """``silu(x_t @ gate.T) * (x_t @ up.T)`` per pair: ``[T * k, I]`` in ``x.dtype``, row
    ``t * k + j`` for pair ``(t, j)``."""
    if x.stride(1) != 1:
        x = x.contiguous()
    ids = topk_ids.reshape(-1)
    hidden, inter = x.shape[1], w13.shape[1] // 2
    tiles = config.gate_up
    h = torch.empty(ids.shape[0], inter, dtype=x.dtype, device=x.device)
    _small_gate_up_kernel[(ids.shape[0], triton.cdiv(inter, tiles.block_n))](
        x, w13, h, ids, hidden, inter, x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        TOPK=topk_ids.shape[1], BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, EVEN_K=hidden % tiles.block_k == 0,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return h


def small_down(h: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w2: torch.Tensor,
               config: SmallMoEConfig) -> torch.Tensor:
    """``sum_j weight_j * (h[t * k + j] @ w2[e_j].T)`` per token: ``[T, H]`` in ``h.dtype``."""
    num_tokens, topk = topk_ids.shape
    ids, weights = topk_ids.reshape(-1), topk_weights.reshape(-1)
    hidden, inter = w2.shape[1], w2.shape[2]
    tiles = config.down
    out = torch.empty(num_tokens, hidden, dtype=h.dtype, device=h.device)
    _small_down_kernel[(num_tokens, triton.cdiv(hidden, tiles.block_n))](
        h, w2, out, ids, weights, hidden, inter, h.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        TOPK=topk, TOPK_P2=triton.next_power_of_2(topk), BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        EVEN_K=inter % tiles.block_k == 0, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out


if triton is not None:

    @triton.jit
    def _small_gate_up_kernel(
        x_ptr, w_ptr, h_ptr, ids_ptr, hidden, inter, stride_xt, stride_we, stride_wn, stride_hp,
        TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        pair = tl.program_id(0)
        token = (pair // TOPK).to(tl.int64)
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        # Columns past the edge wrap onto valid rows (loads stay unmasked in N); the store
        # drops them.
        rows_n = (offs_n % inter).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + token * stride_xt + offs_k
        gate_ptrs = w_ptr + expert * stride_we + rows_n[:, None] * stride_wn + offs_k[None, :]
        up_ptrs = gate_ptrs + inter * stride_wn
        # [BLOCK_N, BLOCK_K] partial sums, reduced once after the loop.
        acc_gate = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in range(0, tl.cdiv(hidden, BLOCK_K)):
            if EVEN_K:
                a = tl.load(x_ptrs)
                gate = tl.load(gate_ptrs)
                up = tl.load(up_ptrs)
            else:
                k_mask = offs_k < hidden - k * BLOCK_K
                a = tl.load(x_ptrs, mask=k_mask, other=0.0)
                gate = tl.load(gate_ptrs, mask=k_mask[None, :], other=0.0)
                up = tl.load(up_ptrs, mask=k_mask[None, :], other=0.0)
            a = a.to(tl.float32)[None, :]
            acc_gate += gate.to(tl.float32) * a
            acc_up += up.to(tl.float32) * a
            x_ptrs += BLOCK_K
            gate_ptrs += BLOCK_K
            up_ptrs += BLOCK_K
        g = tl.sum(acc_gate, axis=1)
        h = g / (1.0 + tl.exp(-g)) * tl.sum(acc_up, axis=1)
        tl.store(h_ptr + pair.to(tl.int64) * stride_hp + offs_n, h.to(h_ptr.dtype.element_ty), mask=offs_n < inter)

    @triton.jit
    def _small_down_kernel(
        h_ptr, w_ptr, out_ptr, ids_ptr, weights_ptr, hidden, inter, stride_hp, stride_we, stride_wn, stride_ot,
        TOPK: tl.constexpr, TOPK_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        offs_j = tl.arange(0, TOPK_P2)
        j_mask = offs_j < TOPK
        pairs = token * TOPK + offs_j
        experts = tl.load(ids_ptr + pairs, mask=j_mask, other=0).to(tl.int64)
        weights = tl.load(weights_ptr + pairs, mask=j_mask, other=0.0).to(tl.float32)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_n = (offs_n % hidden).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        # [TOPK_P2, 1, BLOCK_K] activations, [TOPK_P2, BLOCK_N, BLOCK_K] weights.
        a_ptrs = h_ptr + pairs[:, None, None] * stride_hp + offs_k[None, None, :]
        b_ptrs = (w_ptr + experts[:, None, None] * stride_we + rows_n[None, :, None] * stride_wn
                  + offs_k[None, None, :])
        acc = tl.zeros((TOPK_P2, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in range(0, tl.cdiv(inter, BLOCK_K)):
            mask = j_mask[:, None, None]
            if not EVEN_K:
                mask = mask & (offs_k < inter - k * BLOCK_K)[None, None, :]
            if TOPK == TOPK_P2 and EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                a = tl.load(a_ptrs, mask=mask, other=0.0)
                b = tl.load(b_ptrs, mask=mask, other=0.0)
            acc += b.to(tl.float32) * a.to(tl.float32)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        # Each pair's weighted row rounds to the activation dtype, as the aligned path
        # stores it; padded lanes j >= TOPK are zero.
        pair_rows = (tl.sum(acc, axis=2) * weights[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32)
        out = tl.sum(pair_rows, axis=0)
        tl.store(out_ptr + token * stride_ot + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < hidden)
