"""Fused small ops of the decoder layer (Triton), each replacing a chain of torch kernels:

- ``qk_norm_rotary``: from the fused q/k/v projection output, q and k with their RMSNorm
  (per head, or over the whole projection) and neox rotary (full or partial) applied, in
  one launch, written as the contiguous [T, heads, head_dim] tensors attention consumes;
- ``add_rms_norm``: the residual add and the next RMSNorm in one pass (the sum and the
  normalised sum, both in the activation dtype).

Each computes what the torch modules compute, in the same order of roundings: RMSNorm in
fp32 rounded once to the activation dtype (the weight first cast to that dtype, as
``RMSNorm`` does), rotary of the rounded normalised values in fp32 rounded once, the
residual sum rounded before it is normalised. Reductions and fused multiply-adds may
differ from torch's in the last fp32 bits. Zero-centred norms (hybrids) are not covered
(their modules keep the torch path).

No host sync; grids and allocations depend on shapes only (CUDA-graph safe).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the modules keep their torch paths
    triton = None
    tl = None

NORM_MODES = {"none": 0, "per_head": 1, "full": 2}
MAX_ROW = 16384            # elements of one program's tile (heads x head_dim, or the hidden size)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _require_launchable(x: torch.Tensor, what: str) -> None:
    if triton is None:
        raise RuntimeError(f"{what} needs Triton")
    if not (x.is_cuda or _interpreting()):
        raise ValueError(f"{what} runs on CUDA tensors (or under TRITON_INTERPRET=1)")


def qk_norm_rotary_supported(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether one program's tile holds a token's q (or k) heads."""
    return triton is not None and _pow2(max(num_heads, num_kv_heads)) * _pow2(head_dim) <= MAX_ROW


def add_rms_norm_supported(hidden_size: int) -> bool:
    """Whether one program's tile holds a hidden row."""
    return triton is not None and _pow2(hidden_size) <= MAX_ROW


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def qk_norm_rotary(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                   cos: torch.Tensor | None, sin: torch.Tensor | None, norm: str = "none",
                   q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                   eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, num_heads, head_dim] and k [T, num_kv_heads, head_dim] from ``qkv`` [T,
    (num_heads + 2 num_kv_heads) head_dim] (rows [q; k; v], unit column stride): RMSNorm
    ``norm`` ("none", "per_head": weights [head_dim], "full": weights [heads * head_dim])
    then rotary with the fp32 tables ``cos`` / ``sin`` ([T, r/2] or [T, 1, r/2]: the
    first r <= head_dim dims rotate, neox halves), or none when they are None."""
    _require_launchable(qkv, "qk_norm_rotary")
    t = qkv.shape[0]
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width or qkv.stride(1) != 1:
        raise ValueError(f"qk_norm_rotary: qkv must be [T, {width}] with unit column stride, got "
                         f"{tuple(qkv.shape)} strides {qkv.stride()}")
    if norm not in NORM_MODES:
        raise ValueError(f"qk_norm_rotary: norm must be one of {sorted(NORM_MODES)}, got {norm!r}")
    half = _rotary_half(cos, sin, t, head_dim)
    if norm != "none":
        sizes = (head_dim, head_dim) if norm == "per_head" else (num_heads * head_dim, num_kv_heads * head_dim)
        for w, n in zip((q_weight, k_weight), sizes):
            if w is None or w.shape != (n,) or not w.is_contiguous():
                raise ValueError(f"qk_norm_rotary: {norm} norm needs contiguous weights of [{n}], got "
                                 f"{None if w is None else tuple(w.shape)}")
    q = torch.empty(t, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(t, num_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    block_h, block_d = triton.next_power_of_2(max(num_heads, num_kv_heads)), triton.next_power_of_2(head_dim)
    if block_h * block_d > MAX_ROW:
        raise ValueError(f"qk_norm_rotary: {num_heads} heads x {head_dim} is over one program's {MAX_ROW} elements")
    if t == 0:
        return q, k
    cos2 = cos.reshape(t, half) if half else qkv
    sin2 = sin.reshape(t, half) if half else qkv
    _qk_norm_rotary_kernel[(t, 2)](
        qkv, q, k, cos2, sin2, q_weight if q_weight is not None else qkv, k_weight if k_weight is not None else qkv,
        qkv.stride(0), cos2.stride(0) if half else 0, num_heads, num_kv_heads, eps,
        HEAD_DIM=head_dim, HALF=half, NORM=NORM_MODES[norm], BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=8 if block_h * block_d >= 4096 else 4)
    return q, k


def _rotary_half(cos, sin, t: int, head_dim: int) -> int:
    if cos is None and sin is None:
        return 0
    if cos is None or sin is None or cos.shape != sin.shape or cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError("qk_norm_rotary: cos and sin must both be fp32 tables of one shape (or both None)")
    half = cos.shape[-1]
    if cos.numel() != t * half or 2 * half > head_dim or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError(f"qk_norm_rotary: rotary tables must be contiguous [T={t}, r/2] with r <= {head_dim}, "
                         f"got {tuple(cos.shape)}")
    return half


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rmsnorm(s) * weight) with s = x + residual rounded to x's dtype; x, residual
    [T, H] with unit column stride, weight [H]."""
    _require_launchable(x, "add_rms_norm")
    if x.dim() != 2 or residual.shape != x.shape or residual.dtype != x.dtype or weight.shape != (x.shape[1],):
        raise ValueError(f"add_rms_norm: x and residual must be [T, H] of one dtype and weight [H], got "
                         f"{tuple(x.shape)} {x.dtype}, {tuple(residual.shape)} {residual.dtype}, {tuple(weight.shape)}")
    if x.stride(1) != 1 or residual.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError("add_rms_norm: rows must have unit column stride and the weight must be contiguous")
    t, h = x.shape
    block = triton.next_power_of_2(h)
    if block > MAX_ROW:
        raise ValueError(f"add_rms_norm: hidden size {h} is over one program's {MAX_ROW} elements")
    total = torch.empty_like(x, memory_format=torch.contiguous_format)
    normed = torch.empty_like(total)
    if t:
        _add_rms_norm_kernel[(t,)](x, residual, weight, total, normed, x.stride(0), residual.stride(0), h, eps,
                                   BLOCK=block, num_warps=min(16, max(4, block // 512)))
    return total, normed


if triton is not None:

    @triton.jit
    def _norm_rotary_part(src, dst, w_ptr, cos_row, sin_row, n_heads, eps,
                          HEAD_DIM: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < n_heads) & (d < HEAD_DIM)
        out_ty = dst.dtype.element_ty
        x = tl.load(src + h * HEAD_DIM + d, mask=mask, other=0.0).to(tl.float32)
        if HALF > 0:
            in_rot = d < 2 * HALF
            partner = tl.where(d < HALF, d + HALF, d - HALF)
            xp = tl.load(src + h * HEAD_DIM + partner, mask=mask & in_rot, other=0.0).to(tl.float32)
        if NORM == 1:
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
            w = tl.load(w_ptr + d, mask=d < HEAD_DIM, other=0.0).to(out_ty).to(tl.float32)
            x = (x * rstd * w).to(out_ty).to(tl.float32)
            if HALF > 0:
                wp = tl.load(w_ptr + partner, mask=in_rot, other=0.0).to(out_ty).to(tl.float32)
                xp = (xp * rstd * wp).to(out_ty).to(tl.float32)
        if NORM == 2:
            rstd = tl.rsqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / (n_heads * HEAD_DIM) + eps)
            w = tl.load(w_ptr + h * HEAD_DIM + d, mask=mask, other=0.0).to(out_ty).to(tl.float32)
            x = (x * rstd * w).to(out_ty).to(tl.float32)
            if HALF > 0:
                wp = tl.load(w_ptr + h * HEAD_DIM + partner, mask=mask & in_rot, other=0.0).to(out_ty).to(tl.float32)
                xp = (xp * rstd * wp).to(out_ty).to(tl.float32)
        if HALF > 0:
            j = tl.where(d < HALF, d, d - HALF)
            c = tl.load(cos_row + j, mask=in_rot, other=0.0)
            s = tl.load(sin_row + j, mask=in_rot, other=0.0)
            rotated = tl.where(d < HALF, x * c - xp * s, x * c + xp * s)
            x = tl.where(in_rot, rotated, x)
        tl.store(dst + h * HEAD_DIM + d, x.to(out_ty), mask=mask)

    @triton.jit
    def _qk_norm_rotary_kernel(qkv_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr,
                               stride_t, stride_rope, num_heads, num_kv_heads, eps,
                               HEAD_DIM: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr,
                               BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        src = qkv_ptr + row * stride_t
        cos_row = cos_ptr + row * stride_rope
        sin_row = sin_ptr + row * stride_rope
        if tl.program_id(1) == 0:
            _norm_rotary_part(src, q_ptr + row * num_heads * HEAD_DIM, qw_ptr, cos_row, sin_row, num_heads, eps,
                              HEAD_DIM, HALF, NORM, BLOCK_H, BLOCK_D)
        else:
            _norm_rotary_part(src + num_heads * HEAD_DIM, k_ptr + row * num_kv_heads * HEAD_DIM, kw_ptr,
                              cos_row, sin_row, num_kv_heads, eps, HEAD_DIM, HALF, NORM, BLOCK_H, BLOCK_D)

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, sum_ptr, out_ptr, stride_x, stride_r, hidden, eps,
                             BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < hidden
        out_ty = out_ptr.dtype.element_ty
        a = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        s = (a + b).to(out_ty)
        tl.store(sum_ptr + row * hidden + offs, s, mask=mask)
        sf = s.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(sf * sf, axis=0) / hidden + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(out_ty).to(tl.float32)
        tl.store(out_ptr + row * hidden + offs, (sf * rstd * w).to(out_ty), mask=mask)
