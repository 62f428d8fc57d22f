"""Mamba2's selective state-space recurrence (SSD), in plain torch, fp32 math.

Per head h with state S [head_dim, state_size], discretised step dt_t > 0, A_h < 0, and the
B_t, C_t [state_size] of the head's group:

    S <- exp(dt_t A_h) S + dt_t x_t B_t^T;   y_t = S C_t + D_h x_t

Three forms with one meaning, as for the delta rule: ``ssd_recurrent`` (token by token),
``ssd_chunked`` (the state-space-duality chunked form: a masked decay "attention" inside a
chunk, one state update per chunk; the prefill path) and ``ssd_step`` (one token for each
of a batch of sequences whose states live in pool slots; the decode path, CUDA-graph
capturable). ``ssd_varlen`` serves a packed step. ``dt`` is the discretised step (after
softplus and clamping, see ``discretize_dt``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inference.model.recurrent.metadata import RecurrentMetadata

RECURRENT = "recurrent"
CHUNKED = "chunked"


def discretize_dt(dt: torch.Tensor, dt_bias: torch.Tensor, dt_min: float = 0.0,
                  dt_max: float | None = None) -> torch.Tensor:
    """clamp(softplus(dt + dt_bias), dt_min, dt_max) in fp32."""
    return F.softplus(dt.float() + dt_bias.float()).clamp(min=dt_min, max=dt_max)


def _per_head(b: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., G, N] -> fp32 [..., H, N]: each group serves H // G consecutive heads."""
    return b.float().repeat_interleave(num_heads // b.shape[-2], dim=-2)


def _check_shapes(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                  d: torch.Tensor | None) -> None:
    heads = x.shape[-2]
    if dt.shape != x.shape[:-1]:
        raise ValueError(f"dt {tuple(dt.shape)} must be {tuple(x.shape[:-1])}")
    if b.shape != c.shape or b.shape[:-2] != x.shape[:-2] or heads % b.shape[-2]:
        raise ValueError(f"B {tuple(b.shape)} and C {tuple(c.shape)} must be [{', '.join(map(str, x.shape[:-2]))}, "
                         f"groups dividing {heads}, state_size]")
    if a.shape != (heads,) or (d is not None and d.shape != (heads,)):
        raise ValueError(f"A and D must be [{heads}], got {tuple(a.shape)} and {None if d is None else tuple(d.shape)}")


def _initial_state(state: torch.Tensor | None, x: torch.Tensor, state_size: int) -> torch.Tensor:
    if state is None:
        return x.new_zeros(x.shape[-2], x.shape[-1], state_size, dtype=torch.float32)
    return state.float().clone()


def _skip(y: torch.Tensor, x: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
    return y if d is None else y + x.float() * d.float()[:, None]


def ssd_recurrent(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                  d: torch.Tensor | None = None, state: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, token by token. x [T, H, P]; dt [T, H]; A, D [H]; B, C [T, G, N];
    state [H, P, N] or None (zeros). Returns (y [T, H, P] in x's dtype, final state fp32)."""
    _check_shapes(x, dt, a, b, c, d)
    heads = x.shape[1]
    bh, ch = _per_head(b, heads), _per_head(c, heads)
    dtf = dt.float()
    decay, xdt = (dtf * a.float()).exp(), x.float() * dtf[..., None]
    s = _initial_state(state, x, b.shape[-1])
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        s = s * decay[t, :, None, None] + xdt[t, :, :, None] * bh[t, :, None, :]
        y[t] = torch.einsum("hpn,hn->hp", s, ch[t])
    return _skip(y, x, d).to(x.dtype), s


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                d: torch.Tensor | None = None, state: torch.Tensor | None = None,
                chunk_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``ssd_recurrent``, computed chunk by chunk."""
    _check_shapes(x, dt, a, b, c, d)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    length, heads = x.shape[:2]
    dtf = dt.float()
    # Head-major [H, T, ...]; zero padding (dt 0: no decay, no input) leaves the state as it is.
    pad = (-length) % chunk_size
    xdt, bh, ch = (F.pad(t.transpose(0, 1), (0, 0, 0, pad))
                   for t in (x.float() * dtf[..., None], _per_head(b, heads), _per_head(c, heads)))
    log_decay = F.pad((dtf * a.float()).t(), (0, pad))                    # [H, T]
    n, cs = log_decay.shape[1] // chunk_size, chunk_size
    xdt, bh, ch = (t.reshape(heads, n, cs, -1) for t in (xdt, bh, ch))
    cum = log_decay.reshape(heads, n, cs).cumsum(dim=-1)

    causal = torch.ones(cs, cs, dtype=torch.bool, device=x.device).tril()
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    y = ((ch @ bh.transpose(-1, -2)) * decay) @ xdt                       # within-chunk terms
    c_decayed = ch * cum.exp()[..., None]
    x_decayed = xdt * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()

    s = _initial_state(state, x, b.shape[-1])                             # [H, P, N]
    for i in range(n):
        y[:, i] += c_decayed[:, i] @ s.transpose(-1, -2)
        s = s * chunk_decay[:, i, None, None] + x_decayed[:, i].transpose(-1, -2) @ bh[:, i]
    y = y.reshape(heads, n * cs, -1)[:, :length].transpose(0, 1)
    return _skip(y, x, d).to(x.dtype), s


def ssd_step(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
             d: torch.Tensor | None, states: torch.Tensor, state_slots: torch.Tensor,
             has_initial_state: torch.Tensor) -> torch.Tensor:
    """One token for each of R sequences: x [R, H, P]; dt [R, H]; B, C [R, G, N]. Reads and
    rewrites ``states`` [num_slots + 1, H, P, N] at ``state_slots`` [R]. Returns y [R, H, P].
    No host data is read: CUDA-graph capturable."""
    _check_shapes(x, dt, a, b, c, d)
    heads = x.shape[1]
    dtf = dt.float()
    s = states.index_select(0, state_slots).float()
    s = torch.where(has_initial_state[:, None, None, None], s, torch.zeros((), device=s.device))
    s = (s * (dtf * a.float()).exp()[..., None, None]
         + (x.float() * dtf[..., None])[..., None] * _per_head(b, heads)[..., None, :])
    states.index_copy_(0, state_slots, s.to(states.dtype))
    y = torch.einsum("rhpn,rhn->rhp", s, _per_head(c, heads))
    return (y if d is None else y + x.float() * d.float()[:, None]).to(x.dtype)


def ssd_varlen(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
               d: torch.Tensor | None, states: torch.Tensor, meta: RecurrentMetadata,
               mode: str = CHUNKED, chunk_size: int = 128) -> torch.Tensor:
    """A packed step ([num_tokens, ...] inputs laid out by ``meta``): single-token sequences
    in one batched ``ssd_step``, longer ones through the ``mode`` form one by one."""
    if mode not in (CHUNKED, RECURRENT):
        raise ValueError(f"mode must be {CHUNKED!r} or {RECURRENT!r}, got {mode!r}")
    if meta.decode_only:
        n = meta.num_sequences
        return ssd_step(x[:n], dt[:n], a, b[:n], c[:n], d, states, meta.state_slots, meta.has_initial_state)
    form = ssd_chunked if mode == CHUNKED else ssd_recurrent
    kwargs = {"chunk_size": chunk_size} if mode == CHUNKED else {}
    return meta.apply_per_sequence(
        x.new_empty(meta.num_tokens, *x.shape[1:]), states,
        lambda rows, slots, has_initial: ssd_step(x[rows], dt[rows], a, b[rows], c[rows], d, states, slots,
                                                  has_initial),
        lambda rows, initial: form(x[rows], dt[rows], a, b[rows], c[rows], d, initial, **kwargs))
