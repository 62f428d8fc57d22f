"""Decode-step kernels of the recurrent layers: one token per sequence, state in a pool slot.

Each kernel reads a sequence's state from ``states[state_slots[r]]``, advances it by one
token and writes it back in place (a sequence with ``has_initial_state[r]`` False starts
from zeros), so the state is streamed through once per step: the decode step's dominant
memory traffic. Launch grids depend on shapes only and nothing is read on the host, so the
kernels are CUDA-graph capturable; padding rows of a captured batch point at the pool's
dummy slot. The plain-torch references with the same contract are
``inference.model.recurrent.delta_rule.gated_delta_rule_step`` and
``inference.model.recurrent.ssd.ssd_step``.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch forms need no Triton
    triton = None
    tl = None

L2NORM_EPS = 1e-6


def triton_available() -> bool:
    """Whether these kernels can be launched at all (GPU or TRITON_INTERPRET=1)."""
    return triton is not None


if triton is not None:
    @triton.jit
    def _gated_delta_rule_step_kernel(
            q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, state_ptr, slot_ptr, init_ptr,
            sq_r, sq_h, sk_r, sk_h, sv_r, sv_h, sg_r, sb_r, so_r, so_h, ss_slot, ss_h, ss_k,
            scale, eps,
            GROUP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        r = tl.program_id(0)
        hv = tl.program_id(1)
        offs_k = tl.arange(0, BK)
        offs_v = tl.program_id(2) * BV + tl.arange(0, BV)
        mk = offs_k < DK
        mv = offs_v < DV
        hk = hv // GROUP
        slot = tl.load(slot_ptr + r).to(tl.int64)
        keep = tl.load(init_ptr + r)
        q = tl.load(q_ptr + r * sq_r + hk * sq_h + offs_k, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + r * sk_r + hk * sk_h + offs_k, mask=mk, other=0.0).to(tl.float32)
        q = q * (1.0 / tl.sqrt(tl.sum(q * q, axis=0) + eps)) * scale
        k = k * (1.0 / tl.sqrt(tl.sum(k * k, axis=0) + eps))
        v = tl.load(v_ptr + r * sv_r + hv * sv_h + offs_v, mask=mv, other=0.0).to(tl.float32)
        decay = tl.exp(tl.load(g_ptr + r * sg_r + hv).to(tl.float32))
        beta = tl.load(beta_ptr + r * sb_r + hv).to(tl.float32)
        s_ptrs = state_ptr + slot * ss_slot + hv * ss_h + offs_k[:, None] * ss_k + offs_v[None, :]
        mask = mk[:, None] & mv[None, :]
        s = tl.where(keep != 0, tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32), 0.0) * decay
        delta = (v - tl.sum(s * k[:, None], axis=0)) * beta
        s = s + k[:, None] * delta[None, :]
        tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=mask)
        o = tl.sum(s * q[:, None], axis=0)
        tl.store(o_ptr + r * so_r + hv * so_h + offs_v, o.to(o_ptr.dtype.element_ty), mask=mv)

    @triton.jit
    def _ssd_step_kernel(
            x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, y_ptr, state_ptr, slot_ptr, init_ptr,
            sx_r, sx_h, sdt_r, sb_r, sb_g, sc_r, sc_g, sy_r, sy_h, ss_slot, ss_h, ss_p,
            HEADS_PER_GROUP: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
            BP: tl.constexpr, BN: tl.constexpr, HAS_D: tl.constexpr):
        r = tl.program_id(0)
        h = tl.program_id(1)
        offs_p = tl.program_id(2) * BP + tl.arange(0, BP)
        offs_n = tl.arange(0, BN)
        mp = offs_p < P
        mn = offs_n < N
        grp = h // HEADS_PER_GROUP
        slot = tl.load(slot_ptr + r).to(tl.int64)
        keep = tl.load(init_ptr + r)
        x = tl.load(x_ptr + r * sx_r + h * sx_h + offs_p, mask=mp, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + r * sdt_r + h).to(tl.float32)
        decay = tl.exp(dt * tl.load(a_ptr + h).to(tl.float32))
        b = tl.load(b_ptr + r * sb_r + grp * sb_g + offs_n, mask=mn, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + r * sc_r + grp * sc_g + offs_n, mask=mn, other=0.0).to(tl.float32)
        s_ptrs = state_ptr + slot * ss_slot + h * ss_h + offs_p[:, None] * ss_p + offs_n[None, :]
        mask = mp[:, None] & mn[None, :]
        s = tl.where(keep != 0, tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32), 0.0) * decay
        s = s + (x * dt)[:, None] * b[None, :]
        tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=mask)
        y = tl.sum(s * c[None, :], axis=1)
        if HAS_D:
            y = y + tl.load(d_ptr + h).to(tl.float32) * x
        tl.store(y_ptr + r * sy_r + h * sy_h + offs_p, y.to(y_ptr.dtype.element_ty), mask=mp)


def _unit_last_stride(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def _check_states(states: torch.Tensor, state_slots: torch.Tensor, has_initial_state: torch.Tensor,
                  rows: int) -> None:
    if not states.is_contiguous():
        raise ValueError("states must be contiguous (a pool tensor or one layer's slice of it)")
    if state_slots.shape != (rows,) or has_initial_state.shape != (rows,):
        raise ValueError(f"state_slots {tuple(state_slots.shape)} and has_initial_state "
                         f"{tuple(has_initial_state.shape)} must have one entry per row ({rows})")


def gated_delta_rule_step_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                                 beta: torch.Tensor, states: torch.Tensor, state_slots: torch.Tensor,
                                 has_initial_state: torch.Tensor) -> torch.Tensor:
    """Same contract as ``delta_rule.gated_delta_rule_step``: q, k [R, Hk, Dk]; v [R, Hv, Dv];
    g, beta [R, Hv]; ``states`` [num_slots + 1, Hv, Dk, Dv] updated in place; returns o."""
    rows, num_k_heads, dk = q.shape
    _, num_v_heads, dv = v.shape
    _check_states(states, state_slots, has_initial_state, rows)
    q, k, v, g, beta = _unit_last_stride(q, k, v, g, beta)
    o = torch.empty_like(v)
    if rows == 0:
        return o
    bk = triton.next_power_of_2(dk)
    bv = min(32, triton.next_power_of_2(dv))
    grid = (rows, num_v_heads, triton.cdiv(dv, bv))
    _gated_delta_rule_step_kernel[grid](
        q, k, v, g, beta, o, states, state_slots, has_initial_state,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0),
        beta.stride(0), o.stride(0), o.stride(1), states.stride(0), states.stride(1), states.stride(2),
        dk ** -0.5, L2NORM_EPS,
        GROUP=num_v_heads // num_k_heads, DK=dk, DV=dv, BK=bk, BV=bv, num_warps=4)
    return o


def ssd_step_triton(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                    d: torch.Tensor | None, states: torch.Tensor, state_slots: torch.Tensor,
                    has_initial_state: torch.Tensor) -> torch.Tensor:
    """Same contract as ``ssd.ssd_step``: x [R, H, P]; dt [R, H] (discretised); A, D [H];
    B, C [R, G, N]; ``states`` [num_slots + 1, H, P, N] updated in place; returns y."""
    rows, heads, head_dim = x.shape
    groups, state_size = b.shape[1:]
    _check_states(states, state_slots, has_initial_state, rows)
    x, dt, b, c = _unit_last_stride(x, dt, b, c)
    a = a.contiguous()
    y = torch.empty_like(x)
    if rows == 0:
        return y
    bn = triton.next_power_of_2(state_size)
    bp = min(16, triton.next_power_of_2(head_dim))
    grid = (rows, heads, triton.cdiv(head_dim, bp))
    _ssd_step_kernel[grid](
        x, dt, a, b, c, a if d is None else d.contiguous(), y, states, state_slots, has_initial_state,
        x.stride(0), x.stride(1), dt.stride(0), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        y.stride(0), y.stride(1), states.stride(0), states.stride(1), states.stride(2),
        HEADS_PER_GROUP=heads // groups, P=head_dim, N=state_size, BP=bp, BN=bn, HAS_D=d is not None,
        num_warps=4)
    return y
