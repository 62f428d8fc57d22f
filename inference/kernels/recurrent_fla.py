"""Prefill kernels of the recurrent layers from flash-linear-attention (``fla-core``), optional.

fla-core is pure Python + Triton (a ~1 MB ``py3-none-any`` wheel needing only ``einops``
besides torch and triton), so it travels to a GPU machine as a wheel. Used only on CUDA:

- Gated DeltaNet: ``fla.ops.gated_delta_rule.chunk_gated_delta_rule`` (varlen through
  ``cu_seqlens``, per-sequence initial and final states, grouped value heads, in-kernel
  L2 norm of q and k): exactly our delta rule.
- Mamba2 SSD: ``fla.ops.simple_gla.chunk_simple_gla``, the chunked form of linear
  attention with a scalar per-head decay, which SSD is (q = C, k = B, v = x * dt,
  log-decay g = dt * A, scale 1, state stored V-first = Mamba's [head_dim, state_size]);
  B and C are expanded from groups to heads, the D skip is added outside.

fla 0.6's kernels take a dense ``[N, ...]`` batch of initial states, not slot indices, so
the sequences' states are gathered from the pool first and the final states scattered
back (prefill is compute-bound; decode uses our slot-indexed kernels instead). Host-known
sequence starts are passed as ``cu_seqlens_cpu`` so fla does not read them back.
"""

from __future__ import annotations

import importlib.util

import torch



def fla_available() -> bool:
    """Whether ``fla`` is importable (never imported on the CPU path)."""
    return importlib.util.find_spec("fla") is not None


def _gather_initial(states: torch.Tensor, state_slots: torch.Tensor, has_initial_state: torch.Tensor) -> torch.Tensor:
    init = states.index_select(0, state_slots).float()
    return torch.where(has_initial_state[:, None, None, None], init, torch.zeros((), device=init.device))


def _cu_seqlens(meta) -> tuple[torch.Tensor, torch.Tensor]:
    return meta.query_start_loc.long(), torch.tensor(meta.query_start_loc_host, dtype=torch.long)


def gated_delta_rule_varlen_fla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                                beta: torch.Tensor, states: torch.Tensor, meta) -> torch.Tensor:
    """Same contract as ``delta_rule.gated_delta_rule_varlen`` (``meta`` a RecurrentMetadata)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    n = meta.num_tokens
    cu, cu_cpu = _cu_seqlens(meta)
    init = _gather_initial(states, meta.state_slots, meta.has_initial_state)
    o, final = chunk_gated_delta_rule(
        q[None, :n].contiguous(), k[None, :n].contiguous(), v[None, :n].contiguous(),
        g[None, :n].float().contiguous(), beta[None, :n].contiguous(),
        scale=q.shape[-1] ** -0.5, initial_state=init, output_final_state=True,
        use_qk_l2norm_in_kernel=True, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu)
    states.index_copy_(0, meta.state_slots, final.to(states.dtype))
    return o[0].to(v.dtype)


def ssd_varlen_fla(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                   d: torch.Tensor | None, states: torch.Tensor, meta) -> torch.Tensor:
    """Same contract as ``ssd.ssd_varlen`` (``meta`` a RecurrentMetadata)."""
    from fla.ops.simple_gla import chunk_simple_gla

    n = meta.num_tokens
    x, dt, b, c = x[:n], dt[:n].float(), b[:n], c[:n]
    heads_per_group = x.shape[1] // b.shape[1]
    b_h = b.repeat_interleave(heads_per_group, dim=1)
    c_h = c.repeat_interleave(heads_per_group, dim=1)
    cu, cu_cpu = _cu_seqlens(meta)
    init = _gather_initial(states, meta.state_slots, meta.has_initial_state)
    xdt = (x.float() * dt[..., None]).to(x.dtype)
    y, final = chunk_simple_gla(
        c_h[None].contiguous(), b_h[None].contiguous(), xdt[None].contiguous(),
        g=(dt * a.float())[None].contiguous(), scale=1.0, initial_state=init, output_final_state=True,
        state_v_first=True, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu)
    states.index_copy_(0, meta.state_slots, final.to(states.dtype))
    y = y[0].float()
    if d is not None:
        y = y + x.float() * d.float()[:, None]
    return y.to(x.dtype)
