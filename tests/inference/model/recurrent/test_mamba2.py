"""Mamba2Mixer against transformers' NemotronHMamba2Mixer (random weights, fp32)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from inference.model.recurrent import Mamba2Mixer, RecurrentMetadata
from tests.inference.model.recurrent.hf_layers import (
    HIDDEN,
    MAMBA,
    hf_full,
    hf_mamba2,
    ours_like,
    run_split,
    state_tensors,
)

pytest.importorskip("transformers")
TOL = dict(rtol=1e-4, atol=1e-5)


def _x(length: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(length, HIDDEN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["chunked", "recurrent"])
def test_whole_sequence_matches_transformers(mode):
    hf = hf_mamba2(seed=1)
    x = _x(21, seed=2)
    torch.testing.assert_close(run_split(ours_like(hf), x, [21], mode), hf_full(hf, x), **TOL)


def test_chunks_and_decode_steps_with_carried_state_match_transformers():
    hf = hf_mamba2(seed=3)
    x = _x(30, seed=4)
    ours = ours_like(hf)
    expected = hf_full(hf, x)
    torch.testing.assert_close(run_split(ours, x, [2, 11, 1, 9, 1, 1, 1, 3, 1], "chunked"), expected, **TOL)
    torch.testing.assert_close(run_split(ours, x, [17] + [1] * 13, "auto"), expected, **TOL)


def test_dt_clamp_matches_transformers_prefill():
    """A dt_bias far below zero drives softplus under dt_min = 0.001: transformers' prefill
    clamps it there, and so do both of our forms (its own cached decode step does not)."""
    hf = hf_mamba2(seed=5)
    with torch.no_grad():
        hf.dt_bias.fill_(-9.0)
    x = _x(12, seed=6, scale=0.1)
    ours = ours_like(hf)
    expected = hf_full(hf, x)
    unclamped = Mamba2Mixer(HIDDEN, dataclasses.replace(MAMBA, dt_min=0.0)).eval()
    unclamped.load_hf_weights(hf.state_dict())
    assert not torch.allclose(run_split(unclamped, x, [12], "chunked"), expected, **TOL)
    torch.testing.assert_close(run_split(ours, x, [12], "chunked"), expected, **TOL)
    torch.testing.assert_close(run_split(ours, x, [5] + [1] * 7, "recurrent"), expected, **TOL)


def test_packed_step_of_prefills_and_decodes_matches_per_sequence_transformers():
    hf = hf_mamba2(seed=7)
    ours = ours_like(hf)
    seqs = [_x(n, seed=20 + n) for n in (9, 14, 6)]
    expected = [hf_full(hf, s) for s in seqs]
    conv, ssm = state_tensors(ours, 4)
    slots, done = [3, 1, 0], [0, 4, 5]
    with torch.no_grad():
        ours(torch.cat([seqs[1][:4], seqs[2][:5]]), RecurrentMetadata.build([4, 5], [1, 0], [False, False]), conv, ssm)
        lens = [9, 10, 1]
        meta = RecurrentMetadata.build(lens, slots, [False, True, True])
        out = ours(torch.cat([seqs[i][done[i]:done[i] + n] for i, n in enumerate(lens)]), meta, conv, ssm)
    for i, piece in enumerate(out.split(lens)):
        torch.testing.assert_close(piece, expected[i][done[i]:done[i] + lens[i]], **TOL)


def test_checkpoint_bias_mismatch_is_refused():
    hf = hf_mamba2(seed=8)
    ours = Mamba2Mixer(HIDDEN, dataclasses.replace(MAMBA, use_conv_bias=False))
    with pytest.raises(KeyError, match="conv1d.bias"):
        ours.load_hf_weights(hf.state_dict())
