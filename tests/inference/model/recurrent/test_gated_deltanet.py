"""GatedDeltaNet against transformers' Qwen3.5 / Qwen3-Next layers (random weights, fp32)."""

from __future__ import annotations

import pytest
import torch

from inference.model.recurrent import RecurrentMetadata
from tests.inference.model.recurrent.hf_layers import (
    HIDDEN,
    hf_full,
    hf_gated_deltanet,
    ours_like,
    run_split,
    state_tensors,
)

pytest.importorskip("transformers")
TOL = dict(rtol=1e-4, atol=1e-5)
FAMILIES = ["qwen3_5_moe", "qwen3_next"]


def _x(length: int, seed: int) -> torch.Tensor:
    return torch.randn(length, HIDDEN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["chunked", "recurrent"])
def test_whole_sequence_matches_transformers(family, mode):
    hf = hf_gated_deltanet(family, seed=1)
    x = _x(21, seed=2)
    ours = ours_like(hf)
    torch.testing.assert_close(run_split(ours, x, [21], mode), hf_full(hf, x), **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunks_and_decode_steps_with_carried_state_match_transformers(family):
    """Prefill chunks (shorter and longer than the conv window and the chunk size) then
    decode steps give transformers' whole-sequence outputs."""
    hf = hf_gated_deltanet(family, seed=3)
    x = _x(30, seed=4)
    ours = ours_like(hf)
    expected = hf_full(hf, x)
    torch.testing.assert_close(run_split(ours, x, [2, 11, 1, 9, 1, 1, 1, 3, 1], "chunked"), expected, **TOL)
    torch.testing.assert_close(run_split(ours, x, [17] + [1] * 13, "auto"), expected, **TOL)


def test_packed_step_of_prefills_and_decodes_matches_per_sequence_transformers():
    """One packed step mixing a fresh prompt, a continued prefill chunk and two decodes,
    each in its own slot, gives every sequence transformers' output for its tokens."""
    hf = hf_gated_deltanet("qwen3_5_moe", seed=5)
    ours = ours_like(hf)
    seqs = [_x(n, seed=10 + n) for n in (9, 14, 6, 12)]
    expected = [hf_full(hf, s) for s in seqs]
    conv, rec = state_tensors(ours, 6)
    slots = [4, 0, 5, 2]
    # Step 1: a prefix of sequences 1..3 (sequence 0 has not arrived yet).
    done = [0, 5, 5, 11]
    with torch.no_grad():
        meta = RecurrentMetadata.build([5, 5, 11], slots[1:], [False, False, False])
        ours(torch.cat([seqs[i][:done[i]] for i in (1, 2, 3)]), meta, conv, rec)
        # Step 2: sequence 0 whole, sequence 1 a long chunk, sequences 2 and 3 decode one token.
        lens = [9, 9, 1, 1]
        meta = RecurrentMetadata.build(lens, slots, [False, True, True, True])
        out = ours(torch.cat([seqs[i][done[i]:done[i] + n] for i, n in enumerate(lens)]), meta, conv, rec)
    pieces = out.split(lens)
    for i, n in enumerate(lens):
        torch.testing.assert_close(pieces[i], expected[i][done[i]:done[i] + n], **TOL)


def test_fresh_sequence_ignores_its_slot_and_other_slots_stay_untouched():
    hf = hf_gated_deltanet("qwen3_5_moe", seed=6)
    ours = ours_like(hf)
    x = _x(7, seed=7)
    conv, rec = state_tensors(ours, 3)
    before = conv.clone(), rec.clone()
    with torch.no_grad():
        out = ours(x, RecurrentMetadata.build([7], [1], [False]), conv, rec)
    torch.testing.assert_close(out, hf_full(hf, x), **TOL)
    for new, old in zip((conv, rec), before):
        assert not torch.equal(new[1], old[1])
        torch.testing.assert_close(new[[0, 2, 3]], old[[0, 2, 3]], rtol=0, atol=0)


def test_qwen3_next_weights_are_reordered_not_just_copied():
    """Qwen3-Next's key-head-interleaved projection differs from the fused layout: the
    conversion must permute rows (two key heads make a plain reshape wrong)."""
    hf = hf_gated_deltanet("qwen3_next", seed=8)
    ours = ours_like(hf)
    raw = torch.cat([hf.in_proj_qkvz.weight, hf.in_proj_ba.weight])
    assert ours.in_proj.weight.shape == raw.shape
    assert not torch.equal(ours.in_proj.weight, raw)


def test_missing_projection_weights_raise_a_clear_error():
    ours = ours_like(hf_gated_deltanet("qwen3_5_moe", seed=9))
    with pytest.raises(KeyError, match="in_proj_qkv"):
        ours.load_hf_weights({"conv1d.weight": torch.zeros(1)})


def test_unknown_mode_is_refused():
    ours = ours_like(hf_gated_deltanet("qwen3_5_moe", seed=9))
    conv, rec = state_tensors(ours, 1, fill=0.0)
    with pytest.raises(ValueError, match="mode"):
        ours(_x(3, 1), RecurrentMetadata.build([3], [0], [False]), conv, rec, mode="fast")
