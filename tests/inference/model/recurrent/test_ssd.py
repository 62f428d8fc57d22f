"""Mamba2 SSD's three forms agree with each other and with transformers' torch reference
(``mamba2_chunk_scan``, ``mamba2_selective_state_update``), fp32."""

from __future__ import annotations

import pytest
import torch

from inference.model.recurrent import RecurrentMetadata
from inference.model.recurrent.ssd import discretize_dt, ssd_chunked, ssd_recurrent, ssd_step, ssd_varlen

TOL = dict(rtol=1e-5, atol=1e-4)


def inputs(length, heads=4, head_dim=6, groups=2, state_size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(length, heads, head_dim, generator=gen)
    dt_raw = torch.randn(length, heads, generator=gen)
    dt_bias = torch.rand(heads, generator=gen) - 0.5
    a = -torch.rand(heads, generator=gen) * 2 - 0.1
    b = torch.randn(length, groups, state_size, generator=gen)
    c = torch.randn(length, groups, state_size, generator=gen)
    d = torch.randn(heads, generator=gen)
    state = torch.randn(heads, head_dim, state_size, generator=gen)
    return x, dt_raw, dt_bias, a, b, c, d, state


def test_chunked_form_matches_transformers_reference():
    hf = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    x, dt_raw, dt_bias, a, b, c, d, s0 = inputs(21)
    out, state = ssd_chunked(x, discretize_dt(dt_raw, dt_bias, 0.001), a, b, c, d, s0, chunk_size=8)
    ref_out, ref_state = hf.mamba2_chunk_scan(
        x[None], dt_raw[None], a, b[None], c[None], chunk_size=16, D=d, dt_bias=dt_bias, initial_states=s0[None],
        dt_softplus=True, dt_limit=(0.001, float("inf")), return_final_states=True)
    torch.testing.assert_close(out, ref_out[0], **TOL)
    torch.testing.assert_close(state, ref_state[0], **TOL)


def test_step_matches_transformers_selective_state_update():
    hf = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    x, dt_raw, dt_bias, a, b, c, d, s0 = inputs(1, seed=1)
    heads, head_dim, state_size = s0.shape
    ref_state = s0.clone()[None]
    ref = hf.mamba2_selective_state_update(
        ref_state, x, dt_raw[..., None].expand(-1, -1, head_dim), a[:, None, None].expand(-1, head_dim, state_size),
        b, c, d[:, None].expand(-1, head_dim), dt_bias=dt_bias[:, None].expand(-1, head_dim), dt_softplus=True)
    states = torch.zeros(3, heads, head_dim, state_size)
    states[2] = s0
    out = ssd_step(x, discretize_dt(dt_raw, dt_bias), a, b, c, d, states, torch.tensor([2]), torch.tensor([True]))
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(states[2], ref_state[0], **TOL)


@pytest.mark.parametrize("length,chunk", [(1, 4), (7, 4), (16, 4), (37, 8), (37, 128), (20, 1)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_form_equals_recurrent_form(length, chunk, with_state):
    x, dt_raw, dt_bias, a, b, c, d, s0 = inputs(length, seed=length)
    dt = discretize_dt(dt_raw, dt_bias)
    s0 = s0 if with_state else None
    out_r, state_r = ssd_recurrent(x, dt, a, b, c, d, s0)
    out_c, state_c = ssd_chunked(x, dt, a, b, c, d, s0, chunk_size=chunk)
    torch.testing.assert_close(out_c, out_r, **TOL)
    torch.testing.assert_close(state_c, state_r, **TOL)


@pytest.mark.parametrize("mode", ["chunked", "recurrent"])
def test_varlen_mixed_step_equals_per_sequence_forms(mode):
    lens, slots, init = [1, 9, 1, 4], [2, 5, 0, 1], [True, False, False, True]
    x, dt_raw, dt_bias, a, b, c, d, _ = inputs(sum(lens), seed=9)
    dt = discretize_dt(dt_raw, dt_bias)
    states = torch.randn(6, 4, 6, 8, generator=torch.Generator().manual_seed(3))
    before = states.clone()
    meta = RecurrentMetadata.build(lens, slots, init)
    out = ssd_varlen(x, dt, a, b, c, d, states, meta, mode=mode, chunk_size=4)
    for r in range(len(lens)):
        rows = meta.sequence_rows(r)
        s0 = before[slots[r]] if init[r] else None
        ref_out, ref_state = ssd_recurrent(x[rows], dt[rows], a, b[rows], c[rows], d, s0)
        torch.testing.assert_close(out[rows], ref_out, **TOL)
        torch.testing.assert_close(states[slots[r]], ref_state, **TOL)
    torch.testing.assert_close(states[[3, 4]], before[[3, 4]], rtol=0, atol=0)


def test_discretize_dt_clamps_both_ends():
    dt = discretize_dt(torch.tensor([[-30.0, 0.0, 30.0]]), torch.zeros(3), dt_min=0.01, dt_max=2.0)
    torch.testing.assert_close(dt, torch.tensor([[0.01, 0.6931472, 2.0]]))


def test_bad_shapes_are_refused():
    x, dt_raw, dt_bias, a, b, c, d, _ = inputs(4)
    dt = discretize_dt(dt_raw, dt_bias)
    with pytest.raises(ValueError, match="dt"):
        ssd_recurrent(x, dt[:, :2], a, b, c, d)
    with pytest.raises(ValueError, match="groups"):
        ssd_chunked(x, dt, a, b[:, :, :3], c, d)
    with pytest.raises(ValueError, match="A and D"):
        ssd_recurrent(x, dt, a[:2], b, c, d)
