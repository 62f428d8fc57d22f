"""Short causal depthwise conv1d with a carried state, as in front of Gated DeltaNet and Mamba2.

Channel c of token t is ``act(bias[c] + sum_j weight[c, j] * x[t - (K - 1) + j, c])``, where
inputs before the sequence's first token come from its conv state: the last ``K - 1``
inputs it has seen (oldest first; zeros for a fresh sequence). After the call the state
holds the last ``K - 1`` inputs including this call's, so a sequence can be fed in any
split (prefill chunks, then one token per decode step) with identical outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inference.model.recurrent.metadata import RecurrentMetadata


def _activate(out: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return out
    if activation != "silu":
        raise ValueError(f"conv1d activation must be 'silu' or None, got {activation!r}")
    return F.silu(out)


def causal_conv1d_step(x: torch.Tensor, conv_states: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None, state_slots: torch.Tensor,
                       has_initial_state: torch.Tensor, activation: str | None = "silu") -> torch.Tensor:
    """One new token per sequence, batched: x [R, C] -> [R, C]; updates ``conv_states``
    [num_slots + 1, C, K - 1] at ``state_slots`` [R] in place. No host data is read, so it
    is CUDA-graph capturable (padding rows should all point at the dummy slot)."""
    prev = conv_states.index_select(0, state_slots)
    prev = torch.where(has_initial_state[:, None, None], prev, torch.zeros((), dtype=prev.dtype, device=prev.device))
    window = torch.cat([prev, x[:, :, None].to(prev.dtype)], dim=-1)          # [R, C, K]
    conv_states.index_copy_(0, state_slots, window[:, :, 1:])
    out = F.conv1d(window.to(weight.dtype), weight[:, None, :], bias, groups=weight.shape[0])[:, :, 0]
    return _activate(out, activation).to(x.dtype)


def causal_conv1d_sequence(x: torch.Tensor, conv_state: torch.Tensor | None, weight: torch.Tensor,
                           bias: torch.Tensor | None, activation: str | None = "silu"
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: x [T, C], conv_state [C, K - 1] or None (zeros) -> (out [T, C], new state)."""
    channels, kernel = weight.shape
    if conv_state is None:
        conv_state = x.new_zeros(channels, kernel - 1)
    full = torch.cat([conv_state.to(x.dtype), x.t()], dim=-1)                # [C, K - 1 + T]
    out = F.conv1d(full[None].to(weight.dtype), weight[:, None, :], bias, groups=channels)[0]
    return _activate(out, activation).t().to(x.dtype), full[:, full.shape[1] - (kernel - 1):]


def causal_conv1d_varlen(x: torch.Tensor, conv_states: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None, meta: RecurrentMetadata,
                         activation: str | None = "silu") -> torch.Tensor:
    """A packed step: x [num_tokens, C] (rows laid out by ``meta``) -> [num_tokens, C];
    each sequence's conv state slot is read (when it has an initial state) and rewritten."""
    if x.shape[0] < meta.num_tokens:
        raise ValueError(f"x has {x.shape[0]} rows, the step has {meta.num_tokens} tokens")
    if meta.decode_only:
        n = meta.num_sequences
        return causal_conv1d_step(x[:n], conv_states, weight, bias, meta.state_slots,
                                  meta.has_initial_state, activation)
    out = torch.empty_like(x[: meta.num_tokens])
    for r, slot in enumerate(meta.state_slots_host):
        rows = meta.sequence_rows(r)
        state = conv_states[slot] if meta.has_initial_state_host[r] else None
        out[rows], new_state = causal_conv1d_sequence(x[rows], state, weight, bias, activation)
        conv_states[slot] = new_state.to(conv_states.dtype)
    return out
