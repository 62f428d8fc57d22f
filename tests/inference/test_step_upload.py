"""StepLayout: aligned fields, and every step's copy window stays inside the scratch area and
the block-table rows it carries."""

from __future__ import annotations

import itertools

import pytest
import torch

from inference.step_upload import StepLayout, StagingSlot


def _layout(min_saved: int) -> StepLayout:
    tokens = {name: (40, torch.int64) for name in ("a", "b", "c")}
    requests = dict(q=(9, torch.int32), s=(8, torch.int32), f=(8, torch.bool))
    return StepLayout(tokens, requests, max_requests=8, max_blocks_per_request=13, max_lane_words=40,
                      min_bytes_saved_per_op=min_saved)


def test_fields_are_aligned_disjoint_views_of_one_buffer():
    layout = _layout(0)
    views = layout.tensors(torch.zeros(layout.nbytes, dtype=torch.uint8))
    spans = []
    for name, view in views.items():
        offset = view.storage_offset() * view.element_size()
        assert offset % 16 == 0, name
        spans.append((offset, offset + view.numel() * view.element_size()))
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert views["block_tables"].shape == (8, 13) and views["q"].shape == (9,) and views["f"].dtype == torch.bool


@pytest.mark.parametrize("min_saved", [0, 64, 1 << 30])
def test_every_window_lies_in_the_scratch_area_and_the_rows_it_carries(min_saved):
    layout = _layout(min_saved)
    scratch_start = layout.num_lanes * layout.pitch
    for tw, rw, rows, cols in itertools.product((1, 7, 40), (1, 3, 8), (0, 1, 8), (0, 5, 13)):
        w = layout.window(tw, rw, rows, cols)
        assert scratch_start <= w.start <= w.lanes_at < layout.table_offset, (tw, rw, rows, cols)
        assert w.lanes_at % 8 == 0 and w.start % 8 == 0
        assert w.stop == (layout.table_offset if w.table_cols else layout.table_offset + rows * layout.row_bytes)
        assert w.token_words >= tw and w.request_words >= rw and 1 <= w.num_unpack_ops <= 3
        if w.table_cols:
            assert w.table_cols == cols and w.lanes_at - w.start >= 4 * rows * cols


def test_pack_then_unpack_moves_exactly_the_used_prefixes():
    layout = _layout(0)
    slot = StagingSlot(layout, pin=False)
    for name, array in slot.arrays.items():
        array[...] = (torch.arange(array.size) % 100 + 1).reshape(array.shape).numpy()
    device = torch.zeros(layout.nbytes, dtype=torch.uint8)
    window = layout.window(6, 2, 3, 4)
    assert (window.token_words, window.request_words, window.table_cols) == (6, 2, 4)
    slot.pack(window)
    device[window.start: window.stop] = slot.buffer[window.start: window.stop]
    views = layout.tensors(device)
    layout.unpack(device, layout.lane_words(device), views["block_tables"], window)
    assert views["a"].tolist() == list(range(1, 7)) + [0] * 34
    assert views["q"].tolist() == [1, 2, 3, 4] + [0] * 5            # 2 words: 4 int32 rows
    assert views["f"].all()                                       # 2 words cover all 8 flags
    assert views["block_tables"][:3, :4].tolist() == [[1, 2, 3, 4], [14, 15, 16, 17], [27, 28, 29, 30]]
    assert views["block_tables"][:3, 4:].sum() == 0 and views["block_tables"][3:].sum() == 0


def test_bad_layouts_and_windows_are_refused():
    with pytest.raises(ValueError, match="token lanes"):
        StepLayout({}, {}, max_requests=4, max_blocks_per_request=2, max_lane_words=4)
    layout = _layout(0)
    with pytest.raises(ValueError, match="does not fit"):
        layout.window(41, 1, 1, 1)
    with pytest.raises(ValueError, match="does not fit"):
        layout.window(4, 1, 9, 1)
    with pytest.raises(ValueError, match="uint8"):
        layout.tensors(torch.zeros(layout.nbytes, dtype=torch.int8))
