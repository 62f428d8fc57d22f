"""The gated delta rule's three forms agree with each other and with transformers' torch
reference (``torch_recurrent_gated_delta_rule``), fp32."""

from __future__ import annotations

import pytest
import torch

from inference.model.recurrent import RecurrentMetadata
from inference.model.recurrent.delta_rule import (
    gated_delta_rule_chunked,
    gated_delta_rule_recurrent,
    gated_delta_rule_step,
    gated_delta_rule_varlen,
)

TOL = dict(rtol=1e-5, atol=1e-5)


def inputs(length, hk=2, hv=4, dk=8, dv=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(length, hk, dk, generator=gen)
    k = torch.randn(length, hk, dk, generator=gen)
    v = torch.randn(length, hv, dv, generator=gen)
    g = -torch.rand(length, hv, generator=gen) * 0.7
    beta = torch.rand(length, hv, generator=gen)
    state = torch.randn(hv, dk, dv, generator=gen)
    return q, k, v, g, beta, state


def test_recurrent_form_matches_transformers_reference():
    hf = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    q, k, v, g, beta, s0 = inputs(13)
    out, state = gated_delta_rule_recurrent(q, k, v, g, beta, s0)
    ref_out, ref_state = hf.torch_recurrent_gated_delta_rule(
        q[None], k[None], v[None], g[None], beta[None], initial_state=s0[None], output_final_state=True,
        use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(out, ref_out[0], **TOL)
    torch.testing.assert_close(state, ref_state[0], **TOL)


@pytest.mark.parametrize("length,chunk", [(1, 4), (7, 4), (16, 4), (37, 8), (37, 64), (50, 1)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_form_equals_recurrent_form(length, chunk, with_state):
    q, k, v, g, beta, s0 = inputs(length, seed=length)
    s0 = s0 if with_state else None
    out_r, state_r = gated_delta_rule_recurrent(q, k, v, g, beta, s0)
    out_c, state_c = gated_delta_rule_chunked(q, k, v, g, beta, s0, chunk_size=chunk)
    torch.testing.assert_close(out_c, out_r, **TOL)
    torch.testing.assert_close(state_c, state_r, **TOL)


def test_chunked_form_with_equal_query_and_value_heads():
    q, k, v, g, beta, s0 = inputs(19, hk=3, hv=3, dk=5, dv=7, seed=3)
    out_r, state_r = gated_delta_rule_recurrent(q, k, v, g, beta, s0)
    out_c, state_c = gated_delta_rule_chunked(q, k, v, g, beta, s0, chunk_size=8)
    torch.testing.assert_close(out_c, out_r, **TOL)
    torch.testing.assert_close(state_c, state_r, **TOL)


def test_chunked_form_carries_state_across_calls():
    q, k, v, g, beta, s0 = inputs(30, seed=4)
    whole, final = gated_delta_rule_chunked(q, k, v, g, beta, s0, chunk_size=8)
    first, mid = gated_delta_rule_chunked(q[:11], k[:11], v[:11], g[:11], beta[:11], s0, chunk_size=8)
    second, end = gated_delta_rule_chunked(q[11:], k[11:], v[11:], g[11:], beta[11:], mid, chunk_size=8)
    torch.testing.assert_close(torch.cat([first, second]), whole, **TOL)
    torch.testing.assert_close(end, final, **TOL)


def test_step_updates_only_its_slots_and_equals_one_recurrent_token():
    rows = 3
    gen = torch.Generator().manual_seed(5)
    q, k, v, g, beta, _ = inputs(rows, seed=5)
    states = torch.randn(6, 4, 8, 6, generator=gen)
    before = states.clone()
    slots, init = torch.tensor([4, 1, 2]), torch.tensor([True, False, True])
    out = gated_delta_rule_step(q, k, v, g, beta, states, slots, init)
    for r in range(rows):
        s0 = before[slots[r]] if init[r] else None
        ref_out, ref_state = gated_delta_rule_recurrent(q[r:r + 1], k[r:r + 1], v[r:r + 1], g[r:r + 1],
                                                        beta[r:r + 1], s0)
        torch.testing.assert_close(out[r], ref_out[0], **TOL)
        torch.testing.assert_close(states[slots[r]], ref_state, **TOL)
    torch.testing.assert_close(states[[0, 3, 5]], before[[0, 3, 5]], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["chunked", "recurrent"])
def test_varlen_mixed_step_equals_per_sequence_forms(mode):
    lens, slots, init = [5, 1, 12, 1], [3, 0, 1, 4], [True, True, False, False]
    q, k, v, g, beta, _ = inputs(sum(lens), seed=6)
    states = torch.randn(6, 4, 8, 6, generator=torch.Generator().manual_seed(7))
    before = states.clone()
    meta = RecurrentMetadata.build(lens, slots, init)
    out = gated_delta_rule_varlen(q, k, v, g, beta, states, meta, mode=mode, chunk_size=4)
    for r in range(len(lens)):
        rows = meta.sequence_rows(r)
        s0 = before[slots[r]] if init[r] else None
        ref_out, ref_state = gated_delta_rule_recurrent(q[rows], k[rows], v[rows], g[rows], beta[rows], s0)
        torch.testing.assert_close(out[rows], ref_out, **TOL)
        torch.testing.assert_close(states[slots[r]], ref_state, **TOL)


def test_bad_shapes_and_arguments_are_refused():
    q, k, v, g, beta, _ = inputs(4)
    with pytest.raises(ValueError, match="same shape"):
        gated_delta_rule_recurrent(q, k[:, :1], v, g, beta)
    with pytest.raises(ValueError, match="multiple"):
        gated_delta_rule_chunked(q, k, v[:, :3], g[:, :3], beta[:, :3])
    with pytest.raises(ValueError, match="chunk_size"):
        gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=0)
    with pytest.raises(ValueError, match="share a state slot"):
        RecurrentMetadata.build([1, 2], [3, 3], [True, True])
    with pytest.raises(ValueError, match="at least one token"):
        RecurrentMetadata.build([0], [3], [True])
