"""How a step's inputs reach the device: every static step tensor is a typed view into one
byte buffer, and a step's inputs travel in ONE host-to-device copy.

Layout (``StepLayout``; the same byte offsets in the device buffer and in every staging slot):

    [ lanes: k x pitch ][ scratch ][ block table: max_requests x max_blocks_per_request int32 ]

- A *lane* holds one 1-D field at a 16-byte aligned offset: the token lanes input_ids,
  positions, token_to_block, token_to_offset, slot_mapping (int64, max_step_tokens rows),
  then the request lanes query_start_loc, seq_lens, logits_indices, feed_rows, feed_sources
  and, for hybrid models, state_slots and has_initial_state (k = 10, or 12). ``pitch``
  holds the longest field and ``8 * max(max_step_tokens, max_requests)`` bytes. On the
  device the lanes are the static tensors the graphs read; in a staging slot they are
  where the host fills the step (the fill code sees the same typed views as before).
- A step uses a prefix of each lane: ``P`` words of each token lane (its padded token
  rows) and ``R`` words of each request lane (its request rows; no request field needs
  more than a word per row, ``query_start_loc``'s extra row fits in its int32 pairs). The
  host packs those prefixes contiguously into the scratch area, ending where the block
  table starts; on the device one copy op writes the packed [k, P] words back into the
  lanes. Request lanes travel at the token width P (one op) unless ``R < P`` saves
  ``MIN_BYTES_SAVED_PER_OP`` (256 KiB) of copy, as in a large prefill step (then two ops).
- Block-table rows ``[0, R)`` travel whole and in place: they follow the packed lanes in
  memory, so lanes and table rows are one contiguous byte range. When whole rows would
  carry 256 KiB more than their used columns (``C``: the step's longest block list, e.g. a
  decode batch of 64 at 2,560 blocks per row), the host packs the [R, C] corner in front
  of the packed lanes instead and one more op copies it into the table. Either way the
  columns a row uses are sent; those past its blocks are never read (kernels stop at the
  row's ``seq_len``), as before.

Per step: ONE copy, then one to three unpack ops (``UploadWindow.num_unpack_ops``), plus
the token feed's index_select + index_copy_ when inputs are pending (``StepBatch``). A
decode step at batch B (padded to the graph size P >= B) copies ``8 * k * P + 4 * P *
max_blocks_per_request`` bytes with one unpack op, or ``8 * k * P + 4 * P * C`` with two when
that saves 256 KiB. With 2,560 blocks per row (40,960 positions, block 16), 2k-token
contexts and k = 10 (measured by ``tools/bench_step_upload.py`` on CPU): batch 1 copies
10,320 bytes with one op, batch 16 165,120 bytes with one op, batch 64 38,400 bytes and
batch 256 153,600 bytes with two; the per-tensor scheme this replaced made 11 copies (13
for hybrids) of 10,316 / 164,996 / 659,972 / 2,639,876 bytes. Device rows past a field's
used rows may receive stale staging bytes: nothing reads them (before, they kept stale
device values).

Why packing and not copying the used ranges in place: a token lane is ``8 *
max_step_tokens`` bytes long (64 KiB at 8,192 tokens), so a decode step's used prefixes
lie 64 KiB apart: in-place copies need one copy per token field (six or more in all), and
one range over all of them would copy ~320 KiB + the table rows for a batch of one.
Packing costs one small numpy copy on the host and one small copy kernel on the device.
The device scratch is shared by every step: an upload into it is ordered after the
previous step's unpack ops because both run on the current stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from inference.device_wait import wait_for_event

MIN_BYTES_SAVED_PER_OP = 256 << 10  # ~5 us of PCIe Gen5: more than one more small copy kernel costs


def _align(n: int, to: int = 16) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class UploadWindow:
    """One step's copy: bytes ``[start, stop)`` of the staging slot go to the same offsets of
    the device buffer. At ``lanes_at`` the token lanes' first ``token_words`` words, then
    the request lanes' first ``request_words``; with ``table_cols`` > 0 block-table rows
    ``[0, table_rows)`` are packed at ``start`` to that many columns, else they travel
    whole, in place (``stop`` is then past the table's start)."""

    start: int
    stop: int
    lanes_at: int
    token_words: int
    request_words: int
    table_rows: int
    table_cols: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start

    @property
    def num_unpack_ops(self) -> int:
        return 1 + (self.token_words != self.request_words) + (self.table_cols > 0)


class StepLayout:
    """Byte offsets of every step field in one buffer. Invariant: every offset is 16-byte
    aligned; lanes (token lanes first) are ``pitch`` bytes apart from offset 0; the scratch
    area after them holds every lane's ``pitch`` bytes plus a whole block table; the block
    table starts at ``table_offset`` right after it."""

    def __init__(self, token_lanes: dict[str, tuple[int, torch.dtype]],
                 request_lanes: dict[str, tuple[int, torch.dtype]], max_requests: int, max_blocks_per_request: int, max_lane_words: int,
                 min_bytes_saved_per_op: int = MIN_BYTES_SAVED_PER_OP) -> None:
        if not token_lanes or max_requests < 1 or max_blocks_per_request < 1 or max_lane_words < 1:
            raise ValueError("a step layout needs token lanes, max_requests >= 1, max_blocks_per_request >= 1 "
                             "and max_lane_words >= 1")
        self.lanes = {**token_lanes, **request_lanes}
        self.num_lanes, self.num_token_lanes = len(self.lanes), len(token_lanes)
        self.max_lane_words = max_lane_words
        longest = max(rows * dtype.itemsize for rows, dtype in self.lanes.values())
        self.pitch = _align(max(longest, 8 * max_lane_words))
        self.table_shape = (max_requests, max_blocks_per_request)
        self.row_bytes = 4 * max_blocks_per_request
        table_bytes = _align(max_requests * self.row_bytes)
        self.table_offset = 2 * self.num_lanes * self.pitch + table_bytes
        self.nbytes = self.table_offset + table_bytes
        self.min_bytes_saved_per_op = min_bytes_saved_per_op

    def tensors(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of a uint8 ``buffer`` laid out this way: each lane and ``block_tables``."""
        if buffer.dtype != torch.uint8 or buffer.numel() != self.nbytes:
            raise ValueError(f"a step buffer is {self.nbytes} bytes of uint8, got {buffer.numel()} of {buffer.dtype}")
        views = {}
        for i, (name, (rows, dtype)) in enumerate(self.lanes.items()):
            views[name] = buffer[i * self.pitch: i * self.pitch + rows * dtype.itemsize].view(dtype)
        table = buffer[self.table_offset: self.table_offset + self.table_shape[0] * self.row_bytes]
        views["block_tables"] = table.view(torch.int32).view(self.table_shape)
        return views

    def lane_words(self, buffer: torch.Tensor) -> torch.Tensor:
        """The lanes of ``buffer`` as int64 words [k, pitch / 8] (what the unpack ops write)."""
        return buffer[: self.num_lanes * self.pitch].view(torch.int64).view(self.num_lanes, self.pitch // 8)

    def window(self, token_words: int, request_words: int, table_rows: int, table_cols: int) -> UploadWindow:
        """The copy of a step using the first ``token_words`` words of every token lane,
        ``request_words`` of every request lane and ``table_cols`` columns of block-table
        rows ``[0, table_rows)``. Request lanes travel at the token width (one unpack op)
        and table rows whole unless the narrower copy saves ``min_bytes_saved_per_op``."""
        rows, cols = self.table_shape
        if (not 1 <= min(token_words, request_words) <= max(token_words, request_words) <= self.max_lane_words
                or not 0 <= table_rows <= rows or not 0 <= table_cols <= cols):
            raise ValueError(f"a step of {token_words} / {request_words} lane words and a {table_rows} x "
                             f"{table_cols} block table does not fit the layout ({self.max_lane_words} words, "
                             f"{rows} x {cols} table)")
        num_request_lanes = self.num_lanes - self.num_token_lanes
        if 8 * num_request_lanes * (token_words - request_words) < self.min_bytes_saved_per_op:
            token_words = request_words = max(token_words, request_words)
        lanes_at = self.table_offset - 8 * (self.num_token_lanes * token_words + num_request_lanes * request_words)
        whole = table_rows * self.row_bytes
        packed = _align(table_rows * table_cols * 4, 8)
        if table_cols and whole - packed >= self.min_bytes_saved_per_op:
            return UploadWindow(lanes_at - packed, self.table_offset, lanes_at, token_words, request_words,
                                table_rows, table_cols)
        return UploadWindow(lanes_at, self.table_offset + whole, lanes_at, token_words, request_words, table_rows, 0)

    def lane_groups(self, window: UploadWindow) -> list[tuple[slice, int, int]]:
        """(lanes, words, word offset from ``lanes_at``) of each packed group: one when
        every lane travels at the same width."""
        kt, wt, wr = self.num_token_lanes, window.token_words, window.request_words
        if wt == wr:
            return [(slice(0, self.num_lanes), wt, 0)]
        return [(slice(0, kt), wt, 0), (slice(kt, self.num_lanes), wr, kt * wt)]

    def unpack(self, buffer: torch.Tensor, lanes: torch.Tensor, block_tables: torch.Tensor,
               window: UploadWindow) -> None:
        """After ``window`` landed in the device ``buffer``: its packed lane groups (and
        trimmed block-table corner) into the static ``lanes`` / ``block_tables`` views of it."""
        packed = buffer[window.lanes_at: self.table_offset].view(torch.int64)
        for group, words, at in self.lane_groups(window):
            num = group.stop - group.start
            lanes[group, :words].copy_(packed[at: at + num * words].view(num, words))
        if window.table_cols:
            r, c = window.table_rows, window.table_cols
            block_tables[:r, :c].copy_(buffer[window.start: window.start + 4 * r * c].view(torch.int32).view(r, c))


class StagingSlot:
    """One pinned (on CUDA) host buffer in the ``StepLayout``: the host fills its lanes and
    block table through ``arrays`` (numpy views), ``pack`` lays a step's window out, and a
    copy reads it. Invariant: never written while ``uploaded`` (the event recorded after the
    copy out of it) has not completed."""

    def __init__(self, layout: StepLayout, pin: bool) -> None:
        self.layout = layout
        self.buffer = torch.zeros(layout.nbytes, dtype=torch.uint8, pin_memory=pin)
        self.arrays = {name: t.numpy() for name, t in layout.tensors(self.buffer).items()}
        self._bytes = self.buffer.numpy()
        self._lanes = layout.lane_words(self.buffer).numpy()
        # Per block-table row: (block_ids list, blocks written) of its last writer in this slot.
        self.row_owners: list[tuple | None] = [None] * layout.table_shape[0]
        self.uploaded: torch.cuda.Event | None = None

    def wait_until_free(self) -> None:
        if self.uploaded is not None:
            wait_for_event(self.uploaded)   # returns at once unless the GPU lags a whole ring behind
            self.uploaded = None

    def pack(self, window: UploadWindow) -> None:
        """Lay ``window`` out: the first words of every lane (and the trimmed block-table
        corner) packed where the window says; whole block-table rows are already in place."""
        packed = self._bytes[window.lanes_at: self.layout.table_offset].view(np.int64)
        for group, words, at in self.layout.lane_groups(window):
            num = group.stop - group.start
            packed[at: at + num * words].reshape(num, words)[...] = self._lanes[group, :words]
        if window.table_cols:
            r, c = window.table_rows, window.table_cols
            corner = self._bytes[window.start: window.start + 4 * r * c].view(np.int32)
            corner.reshape(r, c)[...] = self.arrays["block_tables"][:r, :c]
