"""The gated delta rule (Gated DeltaNet's recurrence), in plain torch, fp32 math.

Per value head, with the state S [head_k_dim, head_v_dim], unit-norm scaled query q_t and
unit-norm key k_t of the head's query/key group, decay g_t <= 0 and step beta_t in (0, 1):

    S <- exp(g_t) S;   S <- S + k_t (beta_t (v_t - S^T k_t))^T;   o_t = S^T q_t

Three forms with one meaning: ``gated_delta_rule_recurrent`` (token by token),
``gated_delta_rule_chunked`` (the WY / UT-transform chunked form: a triangular solve per
chunk, then one state update per chunk; the prefill path) and ``gated_delta_rule_step``
(one token for each of a batch of sequences whose states live in slots of a pool; the
decode path, CUDA-graph capturable). ``gated_delta_rule_varlen`` serves a packed step.
Queries and keys are L2-normalised (eps 1e-6, as in transformers and FLA) and queries
scaled by head_k_dim ** -0.5 inside every form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inference.model.recurrent.metadata import RecurrentMetadata

L2NORM_EPS = 1e-6
RECURRENT = "recurrent"
CHUNKED = "chunked"


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2NORM_EPS)


def _normalized_qk(q: torch.Tensor, k: torch.Tensor, num_v_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., Hk, Dk] -> fp32 [..., Hv, Dk]: L2 norm, query scaling, one copy per value head."""
    group = num_v_heads // q.shape[-2]
    q = _l2norm(q.float()) * q.shape[-1] ** -0.5
    k = _l2norm(k.float())
    if group > 1:
        q = q.repeat_interleave(group, dim=-2)
        k = k.repeat_interleave(group, dim=-2)
    return q, k


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> None:
    if q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    if v.shape[:-2] != q.shape[:-2] or v.shape[-2] % q.shape[-2]:
        raise ValueError(f"v {tuple(v.shape)} must share q's leading dims and have a multiple of its "
                         f"{q.shape[-2]} heads")
    if g.shape != v.shape[:-1] or beta.shape != v.shape[:-1]:
        raise ValueError(f"g {tuple(g.shape)} and beta {tuple(beta.shape)} must be {tuple(v.shape[:-1])}")


def _initial_state(state: torch.Tensor | None, v: torch.Tensor, head_k_dim: int) -> torch.Tensor:
    heads, head_v_dim = v.shape[-2:]
    if state is None:
        return v.new_zeros(heads, head_k_dim, head_v_dim, dtype=torch.float32)
    return state.float().clone()


def gated_delta_rule_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, state: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, token by token. q, k [T, Hk, Dk]; v [T, Hv, Dv]; g, beta [T, Hv];
    state [Hv, Dk, Dv] or None (zeros). Returns (o [T, Hv, Dv] in v's dtype, final state fp32)."""
    _check_shapes(q, k, v, g, beta)
    qn, kn = _normalized_qk(q, k, v.shape[1])
    vf, decay, betaf = v.float(), g.float().exp(), beta.float()
    s = _initial_state(state, v, q.shape[-1])
    out = torch.empty_like(vf)
    for t in range(v.shape[0]):
        s = s * decay[t, :, None, None]
        delta = (vf[t] - torch.einsum("hkv,hk->hv", s, kn[t])) * betaf[t, :, None]
        s = s + kn[t, :, :, None] * delta[:, None, :]
        out[t] = torch.einsum("hkv,hk->hv", s, qn[t])
    return out.to(v.dtype), s


def gated_delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                             beta: torch.Tensor, state: torch.Tensor | None = None,
                             chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``gated_delta_rule_recurrent``, computed chunk by chunk."""
    _check_shapes(q, k, v, g, beta)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    length = v.shape[0]
    qn, kn = _normalized_qk(q, k, v.shape[1])
    # Head-major [H, T, ...]; zero padding (beta 0, decay exp(0) = 1) leaves the state as it is.
    pad = (-length) % chunk_size
    qn, kn, vf = (F.pad(x.transpose(0, 1), (0, 0, 0, pad)) for x in (qn, kn, v.float()))
    gf, betaf = (F.pad(x.float().t(), (0, pad)) for x in (g, beta))
    heads, total = gf.shape
    n, c = total // chunk_size, chunk_size
    qn, kn, vf = (x.reshape(heads, n, c, -1) for x in (qn, kn, vf))
    gf, betaf = gf.reshape(heads, n, c), betaf.reshape(heads, n, c)

    cum = gf.cumsum(dim=-1)                                              # [H, n, C]
    causal = torch.ones(c, c, dtype=torch.bool, device=v.device).tril()
    # exp(cum_i - cum_j) for j <= i; the masked upper part would overflow, so mask before exp.
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    k_beta, v_beta = kn * betaf[..., None], vf * betaf[..., None]
    system = (k_beta @ kn.transpose(-1, -2) * decay).tril(-1)
    eye = torch.eye(c, dtype=system.dtype, device=system.device)
    # (I + strictly-lower) X = rhs turns the chunk's sequential delta updates into matmuls.
    u = torch.linalg.solve_triangular(system + eye, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system + eye, k_beta * cum.exp()[..., None], upper=False,
                                      unitriangular=True)
    intra = (qn @ kn.transpose(-1, -2)) * decay
    q_decayed = qn * cum.exp()[..., None]
    k_decayed = kn * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()                                     # [H, n]

    s = _initial_state(state, v, q.shape[-1])
    out = torch.empty_like(vf)
    for i in range(n):
        v_new = u[:, i] - w[:, i] @ s
        out[:, i] = q_decayed[:, i] @ s + intra[:, i] @ v_new
        s = s * chunk_decay[:, i, None, None] + k_decayed[:, i].transpose(-1, -2) @ v_new
    out = out.reshape(heads, total, -1)[:, :length].transpose(0, 1)
    return out.to(v.dtype), s


def gated_delta_rule_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                          beta: torch.Tensor, states: torch.Tensor, state_slots: torch.Tensor,
                          has_initial_state: torch.Tensor) -> torch.Tensor:
    """One token for each of R sequences: q, k [R, Hk, Dk]; v [R, Hv, Dv]; g, beta [R, Hv].
    Reads and rewrites ``states`` [num_slots + 1, Hv, Dk, Dv] at ``state_slots`` [R] (a
    sequence without an initial state starts from zeros). Returns o [R, Hv, Dv]. No host
    data is read: CUDA-graph capturable."""
    _check_shapes(q, k, v, g, beta)
    qn, kn = _normalized_qk(q, k, v.shape[1])
    s = states.index_select(0, state_slots).float()
    s = torch.where(has_initial_state[:, None, None, None], s, torch.zeros((), device=s.device))
    s = s * g.float().exp()[..., None, None]
    delta = (v.float() - torch.einsum("rhkv,rhk->rhv", s, kn)) * beta.float()[..., None]
    s = s + kn[..., :, None] * delta[..., None, :]
    states.index_copy_(0, state_slots, s.to(states.dtype))
    return torch.einsum("rhkv,rhk->rhv", s, qn).to(v.dtype)


def gated_delta_rule_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                            beta: torch.Tensor, states: torch.Tensor, meta: RecurrentMetadata,
                            mode: str = CHUNKED, chunk_size: int = 64) -> torch.Tensor:
    """A packed step ([num_tokens, heads, dim] inputs laid out by ``meta``): single-token
    sequences go through one batched ``gated_delta_rule_step``, longer ones through the
    ``mode`` form ("chunked" or "recurrent") one by one; every slot is updated in place."""
    if mode not in (CHUNKED, RECURRENT):
        raise ValueError(f"mode must be {CHUNKED!r} or {RECURRENT!r}, got {mode!r}")
    if meta.decode_only:
        n = meta.num_sequences
        return gated_delta_rule_step(q[:n], k[:n], v[:n], g[:n], beta[:n], states, meta.state_slots,
                                     meta.has_initial_state)
    form = gated_delta_rule_chunked if mode == CHUNKED else gated_delta_rule_recurrent
    kwargs = {"chunk_size": chunk_size} if mode == CHUNKED else {}
    return meta.apply_per_sequence(
        v.new_empty(meta.num_tokens, *v.shape[1:]), states,
        lambda rows, slots, has_initial: gated_delta_rule_step(q[rows], k[rows], v[rows], g[rows], beta[rows],
                                                               states, slots, has_initial),
        lambda rows, initial: form(q[rows], k[rows], v[rows], g[rows], beta[rows], initial, **kwargs))
