"""Fused small ops of the decoder layer (Triton), each replacing a chain of torch kernels:

- ``qk_norm_rotary``: from the fused q/k/v projection output, q and k with their RMSNorm
  (per head, or over the whole projection) and neox rotary (full or partial) applied, in
  one launch, written as the contiguous [T, heads, head_dim] tensors attention consumes;
  ``qk_norm_rotary_write_kv``: the same q, with this step's k (normed and rotated) and v
  written straight into the paged KV caches at the slot mapping (``write_kv``'s contract)
  by the same launch instead of being returned;
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
    half = _check_qk_inputs(qkv, num_heads, num_kv_heads, head_dim, cos, sin, norm, q_weight, k_weight)
    t = qkv.shape[0]
    q = torch.empty(t, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(t, num_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _launch(qkv, q, k, None, num_heads, num_kv_heads, head_dim, cos, sin, half, norm, q_weight, k_weight, eps)
    return q, k


def qk_norm_rotary_write_kv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                            cos: torch.Tensor | None, sin: torch.Tensor | None, norm: str,
                            q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                            k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """``qk_norm_rotary``'s q; its k and the v part of ``qkv`` go into ``k_cache`` /
    ``v_cache`` [num_blocks + 1, block_size, num_kv_heads, head_dim] at flat slot
    ``slot_mapping[i]`` (int64, block * block_size + offset) for the first
    ``len(slot_mapping)`` rows, the values ``qk_norm_rotary`` then ``write_kv`` would store
    (the caches hold ``qkv``'s dtype, so nothing is rounded again). Slots are not checked
    (that would sync): padding rows must point into the dummy block, and a slot two rows
    share gets either row. ``kv_write_supported`` says which layouts this takes."""
    _require_launchable(qkv, "qk_norm_rotary_write_kv")
    half = _check_qk_inputs(qkv, num_heads, num_kv_heads, head_dim, cos, sin, norm, q_weight, k_weight)
    problem = _kv_write_problem(k_cache, v_cache, slot_mapping, num_kv_heads, head_dim, qkv.dtype, qkv.shape[0])
    if problem is None and not (k_cache.device == v_cache.device == slot_mapping.device == qkv.device):
        problem = "the caches, slot mapping and qkv must be on one device"
    if problem is not None:
        raise ValueError(f"qk_norm_rotary_write_kv: {problem}")
    q = torch.empty(qkv.shape[0], num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _launch(qkv, q, None, (k_cache, v_cache, slot_mapping), num_heads, num_kv_heads, head_dim, cos, sin, half,
            norm, q_weight, k_weight, eps)
    return q


def kv_write_supported(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       num_kv_heads: int, head_dim: int, dtype: torch.dtype, num_rows: int) -> bool:
    """Whether ``qk_norm_rotary_write_kv`` takes these caches for ``num_rows`` rows of a
    ``dtype`` projection (anything else keeps ``write_kv``)."""
    return _kv_write_problem(k_cache, v_cache, slot_mapping, num_kv_heads, head_dim, dtype, num_rows) is None


def _kv_write_problem(k_cache, v_cache, slot_mapping, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                      num_rows: int) -> str | None:
    row = (num_kv_heads, head_dim)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or tuple(cache.shape[2:]) != row or cache.shape[:2] != k_cache.shape[:2]:
            return f"{name} must be [num_blocks + 1, block_size, {num_kv_heads}, {head_dim}] like k_cache, " \
                   f"got {tuple(cache.shape)}"
        if cache.dtype != dtype:
            return f"{name} must hold the projection's dtype {dtype} (a cast is write_kv's job), got {cache.dtype}"
        if cache.stride(3) != 1:
            return f"{name} must be contiguous in its last dim, got strides {cache.stride()}"
    if slot_mapping.dim() != 1 or slot_mapping.dtype != torch.int64 or slot_mapping.stride(0) != 1:
        return f"slot_mapping must be a contiguous int64 vector, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}"
    if slot_mapping.shape[0] > num_rows:
        return f"slot_mapping has {slot_mapping.shape[0]} slots for {num_rows} rows"
    return None


def _check_qk_inputs(qkv, num_heads: int, num_kv_heads: int, head_dim: int, cos, sin, norm: str,
                     q_weight, k_weight) -> int:
    """Validate ``qk_norm_rotary``'s inputs; returns the rotated half-width (0: no rotary)."""
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width or qkv.stride(1) != 1:
        raise ValueError(f"qk_norm_rotary: qkv must be [T, {width}] with unit column stride, got "
                         f"{tuple(qkv.shape)} strides {qkv.stride()}")
    if norm not in NORM_MODES:
        raise ValueError(f"qk_norm_rotary: norm must be one of {sorted(NORM_MODES)}, got {norm!r}")
    half = _rotary_half(cos, sin, qkv.shape[0], head_dim)
    if norm != "none":
        sizes = (head_dim, head_dim) if norm == "per_head" else (num_heads * head_dim, num_kv_heads * head_dim)
        for w, n in zip((q_weight, k_weight), sizes):
            if w is None or w.shape != (n,) or not w.is_contiguous():
                raise ValueError(f"qk_norm_rotary: {norm} norm needs contiguous weights of [{n}], got "
                                 f"{None if w is None else tuple(w.shape)}")
    if _pow2(max(num_heads, num_kv_heads)) * _pow2(head_dim) > MAX_ROW:
        raise ValueError(f"qk_norm_rotary: {num_heads} heads x {head_dim} is over one program's {MAX_ROW} elements")
    return half


def _launch(qkv, q, k, kv_write, num_heads: int, num_kv_heads: int, head_dim: int, cos, sin, half: int,
            norm: str, q_weight, k_weight, eps: float) -> None:
    """One program per (row, part): part 0 writes q; part 1 computes k and stores it into
    ``k`` and / or (``kv_write`` = (k_cache, v_cache, slot_mapping)) the k cache; part 2
    (with ``kv_write`` only) copies the row's v into the v cache."""
    t = qkv.shape[0]
    if t == 0:
        return
    cos2 = cos.reshape(t, half) if half else qkv
    sin2 = sin.reshape(t, half) if half else qkv
    if kv_write is not None:
        k_cache, v_cache, slots = kv_write
        cache_args = (k_cache, v_cache, slots, slots.shape[0], k_cache.shape[1], *k_cache.stride()[:3],
                      *v_cache.stride()[:3])
    else:
        cache_args = (qkv, qkv, qkv, 0, 1, 0, 0, 0, 0, 0, 0)
    block_h, block_d = triton.next_power_of_2(max(num_heads, num_kv_heads)), triton.next_power_of_2(head_dim)
    _qk_norm_rotary_kernel[(t, 2 if kv_write is None else 3)](
        qkv, q, k if k is not None else qkv, cos2, sin2, q_weight if q_weight is not None else qkv,
        k_weight if k_weight is not None else qkv, *cache_args,
        qkv.stride(0), cos2.stride(0) if half else 0, num_heads, num_kv_heads, eps,
        HEAD_DIM=head_dim, HALF=half, NORM=NORM_MODES[norm], BLOCK_H=block_h, BLOCK_D=block_d,
        STORE_K=k is not None, WRITE_KV=kv_write is not None,
        num_warps=8 if block_h * block_d >= 4096 else 4)


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
    def _norm_rotary_part(src, w_ptr, cos_row, sin_row, n_heads, eps,
                          HEAD_DIM: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < n_heads) & (d < HEAD_DIM)
        out_ty = src.dtype.element_ty
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
        return x.to(out_ty)

    @triton.jit
    def _store_cache_row(cache_ptr, x, slot_ptr, row, num_slots, block_size, s_block, s_offset, s_head, n_heads,
                         HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        if row < num_slots:     # rows past the slot mapping are not written (write_kv's rows[:n])
            slot = tl.load(slot_ptr + row)
            h = tl.arange(0, BLOCK_H)[:, None]
            d = tl.arange(0, BLOCK_D)[None, :]
            dst = cache_ptr + (slot // block_size) * s_block + (slot % block_size) * s_offset + h * s_head + d
            tl.store(dst, x, mask=(h < n_heads) & (d < HEAD_DIM))

    @triton.jit
    def _qk_norm_rotary_kernel(qkv_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr,
                               kc_ptr, vc_ptr, slot_ptr, num_slots, block_size, kc_s0, kc_s1, kc_s2,
                               vc_s0, vc_s1, vc_s2, stride_t, stride_rope, num_heads, num_kv_heads, eps,
                               HEAD_DIM: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr,
                               BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                               STORE_K: tl.constexpr, WRITE_KV: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
        src = qkv_ptr + row * stride_t
        cos_row = cos_ptr + row * stride_rope
        sin_row = sin_ptr + row * stride_rope
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        kv_mask = (h < num_kv_heads) & (d < HEAD_DIM)
        if part == 0:
            x = _norm_rotary_part(src, qw_ptr, cos_row, sin_row, num_heads, eps,
                                  HEAD_DIM, HALF, NORM, BLOCK_H, BLOCK_D)
            tl.store(q_ptr + row * num_heads * HEAD_DIM + h * HEAD_DIM + d, x, mask=(h < num_heads) & (d < HEAD_DIM))
        elif part == 1:
            x = _norm_rotary_part(src + num_heads * HEAD_DIM, kw_ptr, cos_row, sin_row, num_kv_heads, eps,
                                  HEAD_DIM, HALF, NORM, BLOCK_H, BLOCK_D)
            if STORE_K:
                tl.store(k_ptr + row * num_kv_heads * HEAD_DIM + h * HEAD_DIM + d, x, mask=kv_mask)
            if WRITE_KV:
                _store_cache_row(kc_ptr, x, slot_ptr, row, num_slots, block_size, kc_s0, kc_s1, kc_s2,
                                 num_kv_heads, HEAD_DIM, BLOCK_H, BLOCK_D)
        else:
            if WRITE_KV:        # v is stored as projected: no norm, no rotary, no rounding
                v = tl.load(src + (num_heads + num_kv_heads) * HEAD_DIM + h * HEAD_DIM + d, mask=kv_mask)
                _store_cache_row(vc_ptr, v, slot_ptr, row, num_slots, block_size, vc_s0, vc_s1, vc_s2,
                                 num_kv_heads, HEAD_DIM, BLOCK_H, BLOCK_D)

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
