"""Preallocated per-step tensors: the batch layout the model and the routing recorder read.

Every device tensor is a view into one step buffer allocated once, at its maximum size, and
updated in place each step, so CUDA graphs can capture reads of it and the recorder can
rely on stable storage.

Inputs travel through a ring of host staging slots (pinned on CUDA), each laid out as the
device buffer (``inference.step_upload``). A step fills one slot, packs what it uses and
enqueues ONE non-blocking copy from it, then one to three device ops put the packed rows in
place (one for a decode step, unless trimming its block table saves more than an op
costs); the slot is written again only after the event recorded behind that copy has
completed, so a step still queued on the GPU never reads the inputs of a later one, however
far the host runs ahead. Pending input tokens are then gathered from the previous step's
device tokens (two more ops).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from inference.model.context import AttentionMetadata
from inference.model.recurrent.metadata import RecurrentMetadata
from inference.scheduled_step import ScheduledChunk
from inference.step_upload import MIN_BYTES_SAVED_PER_OP, StagingSlot, StepLayout, UploadWindow
from routing_replay.phase_timer import PhaseTimer

_TOKEN_FIELDS = ("input_ids", "positions", "token_to_block", "token_to_offset", "slot_mapping")


@dataclass
class PreparedStep:
    """One step's view of the static tensors (first ``num_padded_tokens`` rows)."""

    num_tokens: int
    num_padded_tokens: int
    input_ids: torch.Tensor
    positions: torch.Tensor
    token_to_block: torch.Tensor
    token_to_offset: torch.Tensor
    attn: AttentionMetadata
    logits_indices: torch.Tensor        # [S] rows whose logits are sampled, in ``sampling_chunks`` order
    sampling_chunks: list[ScheduledChunk]
    recurrent: RecurrentMetadata | None = None    # hybrid models: the same sequences' state slots


@dataclass(frozen=True)
class TokenFeed:
    """Input tokens still on the device: the previous step's sampled ``tokens``, row
    ``source_rows[request]`` for each request whose chunk has ``input_pending``."""

    tokens: torch.Tensor                # int64 [S_prev] on the device
    source_rows: Mapping[object, int]   # Request -> row of ``tokens``


class StepBatch:
    """Static tensors of ``max_step_tokens`` token rows and ``max_requests`` request rows.
    Invariant: token rows past ``num_tokens`` point at the dummy block with offset 0;
    block-table row r starts with the block ids of the step's r-th request. With
    ``dummy_state_slot`` (hybrid models) ``state_slots[r]`` / ``has_initial_state[r]`` are
    request r's state slot and whether it continues from it; padding request rows name the
    dummy slot, so a captured decode graph only ever writes that slot for them."""

    def __init__(self, *, max_step_tokens: int, max_requests: int, max_blocks_per_request: int,
                 block_size: int, dummy_block_id: int, device: torch.device, num_staging_slots: int = 2,
                 dummy_state_slot: int | None = None, min_bytes_saved_per_op: int = MIN_BYTES_SAVED_PER_OP) -> None:
        self.block_size = block_size
        self.dummy_block_id = dummy_block_id
        self.dummy_state_slot = dummy_state_slot
        self.max_blocks_per_request = max_blocks_per_request
        self.max_step_tokens, self.max_requests = max_step_tokens, max_requests
        self.device = device
        t, r = max_step_tokens, max_requests
        token_lanes = {name: (t, torch.int64) for name in _TOKEN_FIELDS}
        request_lanes = dict(query_start_loc=(r + 1, torch.int32), seq_lens=(r, torch.int32),
                             logits_indices=(r, torch.int64), feed_rows=(r, torch.int64), feed_sources=(r, torch.int64))
        self.state_slots = self.has_initial_state = None
        if dummy_state_slot is not None:
            request_lanes.update(state_slots=(r, torch.int64), has_initial_state=(r, torch.bool))
        self._layout = StepLayout(token_lanes, request_lanes, r, max_blocks_per_request, max_lane_words=max(t, r),
                                  min_bytes_saved_per_op=min_bytes_saved_per_op)
        self._buffer = torch.zeros(self._layout.nbytes, dtype=torch.uint8, device=device)
        for name, view in self._layout.tensors(self._buffer).items():
            setattr(self, name, view)
        self._lanes = self._layout.lane_words(self._buffer)
        pin = device.type == "cuda"
        self._slots = [StagingSlot(self._layout, pin) for _ in range(max(1, num_staging_slots))]
        self._next_slot = 0

    def point_at_dummy_block(self) -> None:
        """Valid inputs for a graph capture: every token row reads and writes the dummy block
        only, every request row has one token of context in it and (hybrid models) the
        dummy state slot, fresh. (A later ``prepare`` uploads every row it uses from its
        staging slot, so nothing it caches goes stale.)"""
        dummy = self.dummy_block_id
        self.input_ids.zero_(); self.positions.zero_(); self.token_to_offset.zero_()
        self.token_to_block.fill_(dummy)
        self.slot_mapping.fill_(dummy * self.block_size)
        self.block_tables.fill_(dummy)
        self.seq_lens.fill_(1)
        if self.state_slots is not None:
            self.state_slots.fill_(self.dummy_state_slot)
            self.has_initial_state.fill_(False)

    def prepare(self, chunks: list[ScheduledChunk], num_padded_tokens: int | None = None,
                feed: TokenFeed | None = None, timer: PhaseTimer | None = None,
                state_slots: list[int] | None = None, pad_requests: bool = True) -> PreparedStep:
        """Fill the static tensors for ``chunks``: host work into the next staging slot,
        then one non-blocking copy and the unpack op(s), then ``feed`` applied on the device.

        With ``num_padded_tokens`` the token rows are padded to that count (padding rows
        read and write the dummy block). For decode graphs (one token per request) the
        request rows are padded to the same count too: padding rows have seq_len 0 and are
        never read; ``pad_requests=False`` (piecewise graphs of mixed steps) keeps the
        step's own request rows. ``state_slots`` (hybrid models: each chunk's state slot)
        fills the recurrent rows."""
        t = timer.now() if timer is not None else 0.0
        slot = self._slots[self._next_slot]
        self._next_slot = (self._next_slot + 1) % len(self._slots)
        slot.wait_until_free()
        host = slot.arrays
        num_reqs = len(chunks)
        padded_reqs = num_padded_tokens if num_padded_tokens is not None and pad_requests else num_reqs
        single = all(c.num_tokens == 1 for c in chunks)
        self._check_size(num_reqs if single else sum(c.num_tokens for c in chunks), num_padded_tokens,
                         max(num_reqs, padded_reqs))
        n, starts, seq_lens = self._fill_single_tokens(host, chunks) if single else self._fill_chunks(host, chunks)
        table_cols = self._fill_block_tables(slot, chunks)
        sampling = [c for c in chunks if c.samples]
        logits_rows = [starts[r + 1] - 1 for r, c in enumerate(chunks) if c.samples]
        padded = n if num_padded_tokens is None else num_padded_tokens
        for name, fill in (("input_ids", 0), ("positions", 0), ("token_to_block", self.dummy_block_id),
                           ("token_to_offset", 0)):
            host[name][n:padded] = fill
        host["slot_mapping"][:padded] = host["token_to_block"][:padded] * self.block_size + host["token_to_offset"][:padded]
        host["query_start_loc"][: num_reqs + 1] = starts
        host["query_start_loc"][num_reqs + 1: padded_reqs + 1] = n
        host["seq_lens"][:num_reqs] = seq_lens
        host["seq_lens"][num_reqs:padded_reqs] = 0
        host["logits_indices"][: len(logits_rows)] = logits_rows
        num_fed = self._fill_feed(host, chunks, starts, feed)
        initial = self._fill_states(host, chunks, state_slots, padded_reqs)
        if timer is not None:
            t = timer.lap("stage_prepare", "inputs", t)
        # A request row is at most one word (query_start_loc's extra row fits in the int32 pairs).
        self._upload(slot, self._layout.window(max(padded, 1), max(padded_reqs, num_reqs, 1), padded_reqs, table_cols))
        if num_fed:
            self.input_ids.index_copy_(0, self.feed_rows[:num_fed], feed.tokens.index_select(0, self.feed_sources[:num_fed]))
        if timer is not None:
            timer.lap("stage_prepare", "upload", t)
        attn = AttentionMetadata(
            slot_mapping=self.slot_mapping[:padded], block_tables=self.block_tables[:padded_reqs],
            query_start_loc=self.query_start_loc[: padded_reqs + 1], seq_lens=self.seq_lens[:padded_reqs],
            query_start_loc_host=starts, seq_lens_host=seq_lens,
            max_query_len=max((c.num_tokens for c in chunks), default=0), max_seq_len=max(seq_lens, default=0),
            decode_only=single)
        recurrent = None
        if initial is not None:
            recurrent = RecurrentMetadata(
                query_start_loc=self.query_start_loc[: num_reqs + 1], state_slots=self.state_slots[:num_reqs],
                has_initial_state=self.has_initial_state[:num_reqs], query_start_loc_host=starts,
                state_slots_host=list(state_slots), has_initial_state_host=initial, decode_only=attn.decode_only)
        return PreparedStep(
            num_tokens=n, num_padded_tokens=padded, input_ids=self.input_ids[:padded],
            positions=self.positions[:padded], token_to_block=self.token_to_block[:padded],
            token_to_offset=self.token_to_offset[:padded], attn=attn,
            logits_indices=self.logits_indices[: len(logits_rows)], sampling_chunks=sampling, recurrent=recurrent)

    def _fill_states(self, host: dict[str, np.ndarray], chunks: list[ScheduledChunk],
                     state_slots: list[int] | None, padded_reqs: int) -> list[bool] | None:
        """Request rows' state slots and initial-state flags (a chunk past position 0
        continues from its slot: a later chunk, a decode, or a restored checkpoint)."""
        if (state_slots is None) != (self.dummy_state_slot is None):
            raise ValueError("state_slots are given exactly for the steps of a hybrid model's batch")
        if state_slots is None:
            return None
        if len(state_slots) != len(chunks):
            raise ValueError(f"{len(state_slots)} state slots for {len(chunks)} chunks")
        n = len(chunks)
        initial = [c.start > 0 for c in chunks]
        host["state_slots"][:n] = state_slots
        host["state_slots"][n:padded_reqs] = self.dummy_state_slot
        host["has_initial_state"][:n] = initial
        host["has_initial_state"][n:padded_reqs] = False
        return initial

    def _fill_single_tokens(self, host: dict[str, np.ndarray], chunks: list[ScheduledChunk]) -> tuple[int, list[int], list[int]]:
        """Decode steps: one token per request, filled with list comprehensions (the
        per-request host cost is what limits large decode batches). A pending input token
        is written as 0 here and fed on the device."""
        bs, n = self.block_size, len(chunks)
        positions = [c.start for c in chunks]
        host["input_ids"][:n] = [0 if c.input_pending else c.request.token_slice(c.start, c.start + 1)[0] for c in chunks]
        host["positions"][:n] = positions
        host["token_to_block"][:n] = [c.request.block_ids[c.start // bs] for c in chunks]
        host["token_to_offset"][:n] = [p % bs for p in positions]
        return n, list(range(n + 1)), [p + 1 for p in positions]

    def _fill_chunks(self, host: dict[str, np.ndarray], chunks: list[ScheduledChunk]) -> tuple[int, list[int], list[int]]:
        bs = self.block_size
        n, starts, seq_lens = 0, [0], []
        for chunk in chunks:
            req, k = chunk.request, chunk.num_tokens
            pos = np.arange(chunk.start, chunk.start + k)
            blocks = np.asarray(req.block_ids, dtype=np.int64)
            host["input_ids"][n:n + k] = 0 if chunk.input_pending else req.token_slice(chunk.start, chunk.start + k)
            host["positions"][n:n + k] = pos
            host["token_to_block"][n:n + k] = blocks[pos // bs]
            host["token_to_offset"][n:n + k] = pos % bs
            n += k
            starts.append(n)
            seq_lens.append(chunk.start + k)
        return n, starts, seq_lens

    @staticmethod
    def _fill_feed(host: dict[str, np.ndarray], chunks: list[ScheduledChunk], starts: list[int],
                   feed: TokenFeed | None) -> int:
        """Rows (token offsets) of pending input tokens and where ``feed.tokens`` holds them."""
        k = 0
        for r, chunk in enumerate(chunks):
            if chunk.input_pending:
                source = feed.source_rows.get(chunk.request) if feed is not None else None
                if source is None:
                    raise RuntimeError(f"request {chunk.request.request_id!r}: its pending input token "
                                       "was not sampled by the step launched just before")
                host["feed_rows"][k] = starts[r]
                host["feed_sources"][k] = source
                k += 1
        return k

    @staticmethod
    def _fill_block_tables(slot: StagingSlot, chunks: list[ScheduledChunk]) -> int:
        """Row r gets request r's block ids. A row whose last writer in this slot was the
        very same ``block_ids`` list only receives the blocks appended since: the scheduler
        only ever appends to a request's list and replaces the list object when it
        re-admits, preempts or finishes the request (and ``row_owners`` keeps the old list
        alive, so identity is never reused). Columns past a row's blocks are never read
        (kernels stop at seq_len), so they are not cleared. Returns the longest row's length:
        the columns the step's table uses."""
        table = slot.arrays["block_tables"]
        owners = slot.row_owners
        longest = 0
        for r, chunk in enumerate(chunks):
            blocks = chunk.request.block_ids
            owner = owners[r]
            written = owner[1] if owner is not None and owner[0] is blocks and owner[1] <= len(blocks) else 0
            if written < len(blocks):
                table[r, written:len(blocks)] = blocks[written:]
            owners[r] = (blocks, len(blocks))
            longest = max(longest, len(blocks))
        return longest

    def _check_size(self, num_tokens: int, num_padded_tokens: int | None, num_request_rows: int) -> None:
        padded = num_tokens if num_padded_tokens is None else num_padded_tokens
        if padded < num_tokens:
            raise ValueError(f"num_padded_tokens={padded} is less than the step's {num_tokens} tokens")
        if padded > self.max_step_tokens or num_request_rows > self.max_requests:
            raise ValueError(f"a step of {padded} token rows and {num_request_rows} request rows does not fit "
                             f"max_step_tokens={self.max_step_tokens}, max_requests={self.max_requests}")

    def _upload(self, slot: StagingSlot, window: UploadWindow) -> None:
        """The one copy of ``window`` out of ``slot``, the event behind it, the unpack op(s)."""
        slot.pack(window)
        cuda = self.device.type == "cuda"
        self._buffer[window.start: window.stop].copy_(slot.buffer[window.start: window.stop], non_blocking=cuda)
        if cuda:
            slot.uploaded = torch.cuda.Event()
            slot.uploaded.record()
        self._layout.unpack(self._buffer, self._lanes, self.block_tables, window)
