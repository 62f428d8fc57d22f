"""StepBatch fills the static per-step tensors the model and the recorder read."""

from __future__ import annotations

import pytest
import torch

from inference.request import Request, SamplingParams
from inference.scheduled_step import ScheduledChunk
from inference.step_batch import StepBatch, TokenFeed


def _batch() -> StepBatch:
    return StepBatch(max_step_tokens=16, max_requests=4, max_blocks_per_request=8, block_size=4,
                     dummy_block_id=99, device=torch.device("cpu"))


def _decode(req: Request) -> ScheduledChunk:
    return ScheduledChunk(req, req.num_tokens - 1, 1, True)


def test_block_table_row_rewritten_when_the_request_gets_a_new_block_list():
    req = Request("a", list(range(2, 12)), SamplingParams(), output_token_ids=[7])
    req.block_ids = [5, 6, 7]
    req.num_computed_tokens = 10
    batch = _batch()
    batch.prepare([_decode(req)])
    assert batch.block_tables[0, :3].tolist() == [5, 6, 7]
    req.block_ids.append(8)                  # grown in place: only the new block is written
    batch.prepare([_decode(req)])
    assert batch.block_tables[0, :4].tolist() == [5, 6, 7, 8]
    # Preempted and re-admitted: a new list that shares its first blocks (prefix hits) but
    # not the rest, of the same length; the row must not keep the stale ids.
    req.block_ids = [5, 6, 11, 12]
    batch.prepare([_decode(req)])
    assert batch.block_tables[0, :4].tolist() == [5, 6, 11, 12]


def test_decode_rows_and_padding():
    reqs = []
    for i, (n_prompt, blocks) in enumerate([(5, [3, 4]), (9, [1, 2, 0])]):
        r = Request(str(i), list(range(2, 2 + n_prompt)), SamplingParams(), output_token_ids=[40 + i])
        r.block_ids = blocks
        r.num_computed_tokens = n_prompt
        reqs.append(r)
    batch = _batch()
    step = batch.prepare([_decode(r) for r in reqs], num_padded_tokens=4)
    assert step.input_ids.tolist() == [40, 41, 0, 0]
    assert step.positions.tolist() == [5, 9, 0, 0]
    assert step.token_to_block.tolist() == [4, 0, 99, 99]      # position 5 -> block 1; 9 -> block 2
    assert step.token_to_offset.tolist() == [1, 1, 0, 0]
    assert step.attn.seq_lens.tolist() == [6, 10, 0, 0]        # padding rows attend to nothing
    assert step.attn.slot_mapping.tolist() == [17, 1, 396, 396]
    assert step.logits_indices.tolist() == [0, 1]


def test_each_step_fills_its_own_staging_slot():
    """A step still queued on the GPU reads its inputs from its own slot: preparing the
    next step never writes into the slot the previous one uploaded from."""
    batch = _batch()
    a = Request("a", [2, 3, 4], SamplingParams(), output_token_ids=[50])
    b = Request("b", [5, 6, 7], SamplingParams(), output_token_ids=[60])
    a.block_ids, b.block_ids = [1], [2]
    batch.prepare([_decode(a)])
    first_slot = batch._slots[0].arrays["input_ids"]
    assert first_slot[0] == 50
    batch.prepare([_decode(b)])
    assert first_slot[0] == 50 and batch._slots[1].arrays["input_ids"][0] == 60
    assert batch.input_ids[0].item() == 60


def test_pending_input_tokens_are_fed_from_the_previous_steps_device_tokens():
    batch = _batch()
    decoding = Request("d", [2, 3, 4], SamplingParams(), output_token_ids=[9])
    decoding.block_ids = [1, 2]
    decoding.num_pending_tokens = 1          # its token at position 4 is still on the device
    prefill = Request("p", [11, 12, 13], SamplingParams())
    prefill.block_ids = [3]
    chunks = [ScheduledChunk(decoding, 4, 1, True), ScheduledChunk(prefill, 0, 3, True)]
    assert chunks[0].input_pending and chunks[0].is_decode and not chunks[1].input_pending
    previous_tokens = torch.tensor([77, 123])
    step = batch.prepare(chunks, feed=TokenFeed(previous_tokens, {decoding: 1}))
    assert step.input_ids.tolist() == [123, 11, 12, 13]
    assert step.token_to_block.tolist() == [2, 3, 3, 3] and step.token_to_offset.tolist() == [0, 0, 1, 2]
    with pytest.raises(RuntimeError, match="'d'.*pending input token"):
        batch.prepare(chunks, feed=TokenFeed(previous_tokens, {}))
