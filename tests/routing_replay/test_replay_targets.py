"""Recorded routing -> replay targets: token order, padding, packing, placeholders, layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from routing_replay import RoutingMeta, expand_to_all_layers, load_routing, save_routing
from routing_replay.replay_targets import (check_targets, complete_rows, moe_layer_columns, packed_targets,
                                           padded_targets, per_layer, sequence_parallel_slice)

LAYERS, TOPK, EXPERTS = 3, 2, 8


def _routing(rows: int, seed: int) -> np.ndarray:
    """Random rows of distinct experts, [rows, LAYERS, TOPK] uint8 like the engine writes."""
    rng = np.random.default_rng(seed)
    return np.stack([np.stack([rng.permutation(EXPERTS)[:TOPK] for _ in range(LAYERS)]) for _ in range(rows)]).astype(np.uint8)


def _assert_valid_rows(targets: np.ndarray) -> None:
    check_targets(targets, EXPERTS, TOPK)   # raises on repeated or out-of-range experts


def test_missing_last_row_copies_the_previous_row():
    r = _routing(5, 0)
    full = complete_rows(r.astype(np.int64), 6)
    assert full.shape == (6, LAYERS, TOPK)
    np.testing.assert_array_equal(full[:5], r)
    np.testing.assert_array_equal(full[5], r[4])


def test_truncated_sequence_drops_rows_and_too_few_rows_fail():
    r = _routing(9, 1).astype(np.int64)
    np.testing.assert_array_equal(complete_rows(r, 4), r[:4])
    with pytest.raises(ValueError, match="routing has 9 rows for a 12-token sequence"):
        complete_rows(r, 12)


@pytest.mark.parametrize("order", ["sb", "bs"])
def test_padded_batch_puts_each_token_where_the_router_sees_it(order):
    routings = [_routing(n, seed) for seed, n in enumerate([6, 3, 9])]
    seq = 12
    targets = padded_targets(routings, seq, order=order)
    batch = len(routings)
    assert targets.shape == (LAYERS, batch * seq, TOPK) and targets.dtype == np.int64
    for b, r in enumerate(routings):
        for s in range(r.shape[0] + 1):
            row = s * batch + b if order == "sb" else b * seq + s
            expected = r[min(s, r.shape[0] - 1)]            # the last token copies the row before
            np.testing.assert_array_equal(targets[:, row], expected)
    _assert_valid_rows(targets)


def test_padding_rows_hold_distinct_placeholder_experts():
    targets = padded_targets([_routing(2, 0)], 6, order="bs")
    for s in range(3, 6):
        np.testing.assert_array_equal(targets[:, s], np.tile(np.arange(TOPK), (LAYERS, 1)))


def test_left_padding_aligns_sequences_to_the_end():
    r = _routing(3, 2)
    targets = padded_targets([r, _routing(7, 3)], 8, left_padding=True, order="bs")
    np.testing.assert_array_equal(targets[:, 4:7], r.transpose(1, 0, 2))
    np.testing.assert_array_equal(targets[:, 7], r[-1])


def test_explicit_num_tokens_and_too_long_sequence():
    r = _routing(6, 4)
    targets = padded_targets([r], 5, num_tokens=[5], order="sb")
    np.testing.assert_array_equal(targets.transpose(1, 0, 2), r[:5])
    with pytest.raises(ValueError, match="more than seq_len"):
        padded_targets([r], 5)


def test_packed_sequences_follow_cu_seqlens_with_padded_slots():
    a, b = _routing(4, 5), _routing(2, 6)
    plain = packed_targets([a, b])
    assert plain.shape == (LAYERS, 5 + 3, TOPK)
    np.testing.assert_array_equal(plain[:, :4].transpose(1, 0, 2), a)
    np.testing.assert_array_equal(plain[:, 5:7].transpose(1, 0, 2), b)
    padded = packed_targets([a, b], cu_seqlens=[0, 8, 12])
    np.testing.assert_array_equal(padded[:, 8:10].transpose(1, 0, 2), b)
    np.testing.assert_array_equal(padded[:, 5:8], np.broadcast_to(np.arange(TOPK), (LAYERS, 3, TOPK)))
    _assert_valid_rows(padded)
    with pytest.raises(ValueError, match="slot 0 holds 3 tokens"):
        packed_targets([a, b], cu_seqlens=[0, 3, 12])


def test_sequence_parallel_slices_tile_the_whole_batch():
    targets = padded_targets([_routing(7, 7), _routing(5, 8)], 8, order="sb")
    parts = [sequence_parallel_slice(targets, rank, 4) for rank in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), targets)
    # rank 1 holds sequence positions 2..3 of both sequences in [seq, batch] order
    np.testing.assert_array_equal(parts[1], targets[:, 4:8])
    with pytest.raises(ValueError, match="cannot split 16 tokens over 3 ranks"):
        sequence_parallel_slice(targets, 0, 3)


@pytest.mark.parametrize("fill", [-1, 0])
def test_all_layer_layout_gives_the_same_targets(tmp_path, fill):
    moe_layers = [1, 3, 4]
    meta = RoutingMeta(moe_layer_indices=moe_layers, num_layers=5, num_experts=EXPERTS, topk=TOPK,
                       block_size=16, dtype="uint8")
    routings = {"a": _routing(5, 9), "b": _routing(3, 10)}
    routings["a"][0] = 0                       # expert 0 is a real id, not a filler
    save_routing(tmp_path, routings, meta)
    loaded, meta = load_routing(tmp_path)
    expanded = [expand_to_all_layers(loaded[k], meta, fill=fill) for k in ("a", "b")]
    assert all((e[:, [0, 2]] == fill).all() for e in expanded)
    direct = padded_targets([loaded["a"], loaded["b"]], 6)
    np.testing.assert_array_equal(padded_targets(expanded, 6, moe_layer_indices=meta.moe_layer_indices), direct)
    np.testing.assert_array_equal(packed_targets(expanded, moe_layer_indices=moe_layers), packed_targets(list(loaded.values())))


def test_moe_layers_are_never_guessed_from_the_content():
    meta = RoutingMeta(moe_layer_indices=[1, 2], num_layers=3, num_experts=EXPERTS, topk=TOPK, block_size=4,
                       dtype="uint8")
    minus_one = expand_to_all_layers(_routing(4, 0)[:, :2], meta)
    with pytest.raises(ValueError, match="negative ids.*pass moe_layer_indices"):
        padded_targets([minus_one], 5)
    zero_filled = expand_to_all_layers(_routing(4, 0)[:, :2], meta, fill=0)
    # indistinguishable from a 3-layer MoE-only array: it passes here and the replay hooks
    # refuse it by its layer count (tests/routing_replay/test_interop.py)
    assert padded_targets([zero_filled], 5).shape[0] == 3


def test_bad_layouts_are_refused():
    all_layer = np.full((3, 4, TOPK), -1, dtype=np.int16)
    all_layer[:, 1] = 2
    all_layer[0, 2] = 5                            # indices claiming layer 2 is dense while it routes
    with pytest.raises(ValueError, match="one fill value, 0 or -1"):
        moe_layer_columns(all_layer, [1])
    mixed = np.zeros((3, 4, TOPK), dtype=np.int16)
    mixed[:, 3] = -1                               # 0 in one dense layer, -1 in another
    with pytest.raises(ValueError, match="one fill value"):
        moe_layer_columns(mixed, [1])
    with pytest.raises(ValueError, match="covering layer 5"):
        moe_layer_columns(all_layer, [1, 5])
    with pytest.raises(ValueError, match="sorted, unique"):
        moe_layer_columns(all_layer, [2, 1])
    with pytest.raises(ValueError, match="negative expert ids"):
        moe_layer_columns(all_layer, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="disagree"):
        padded_targets([_routing(3, 0), _routing(3, 1)[:, :2]], 5)


def test_check_targets_rejects_repeats_and_out_of_range():
    good = padded_targets([_routing(3, 11)], 4)
    check_targets(good, EXPERTS, TOPK)
    repeated = good.copy()
    repeated[0, 1] = [3, 3]
    with pytest.raises(ValueError, match="repeats an expert"):
        check_targets(repeated, EXPERTS)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        check_targets(good, 4)
    with pytest.raises(ValueError, match="top-2 rows"):
        check_targets(good, EXPERTS, topk=4)


def test_per_layer_gives_contiguous_int64_tensors():
    targets = padded_targets([_routing(4, 12), _routing(2, 13)], 5, order="sb")
    layers = per_layer(targets)
    assert len(layers) == LAYERS
    for j, t in enumerate(layers):
        assert t.dtype == torch.int64 and t.is_contiguous() and t.shape == (10, TOPK)
        np.testing.assert_array_equal(t.numpy(), targets[j])
