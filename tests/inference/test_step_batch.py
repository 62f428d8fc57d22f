"""StepBatch fills the static per-step tensors the model and the recorder read."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from inference.request import Request, SamplingParams
from inference.scheduled_step import ScheduledChunk
from inference.step_batch import StepBatch, TokenFeed
from tests.inference import step_batch_cases as cases


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


# --- the packed upload: fields, copies, staging lifetime -------------------------------------

def _cases_batch(hybrid: bool, min_bytes_saved_per_op: int | None = None, device: str = "cpu") -> StepBatch:
    extra = {} if min_bytes_saved_per_op is None else dict(min_bytes_saved_per_op=min_bytes_saved_per_op)
    return StepBatch(max_step_tokens=cases.MAX_TOKENS, max_requests=cases.MAX_REQUESTS,
                     max_blocks_per_request=cases.MAX_BLOCKS, block_size=cases.BLOCK, dummy_block_id=cases.DUMMY_BLOCK,
                     device=torch.device(device), dummy_state_slot=cases.DUMMY_SLOT if hybrid else None, **extra)


@pytest.mark.parametrize("hybrid", [False, True], ids=["attention", "hybrid"])
@pytest.mark.parametrize("min_saved", [None, 0, 200], ids=["default", "always-split", "sometimes"])
def test_random_steps_fill_every_field_as_the_chunks_say(hybrid, min_saved):
    """Decode, padded decode, prefill, mixed and padded mixed steps, one after another on one
    batch (its staging ring and block-table row caches live on): every field's used rows
    equal a row-by-row computation from the chunks, and so do the step's views."""
    batch = _cases_batch(hybrid, min_saved)
    gen = cases.StepCases(seed=7 + hybrid, hybrid=hybrid, device=torch.device("cpu"))
    kinds = set()
    for _ in range(120):
        case = gen.step()
        step = batch.prepare(case.chunks, **case.kwargs)
        assert cases.mismatches(case, cases.snapshot(batch)) == [], case.kind
        want = case.expected
        assert step.input_ids.tolist() == want["input_ids"] and step.positions.tolist() == want["positions"]
        assert step.attn.slot_mapping.tolist() == want["slot_mapping"]
        assert step.attn.query_start_loc.tolist() == want["query_start_loc"]
        assert step.attn.seq_lens.tolist() == want["seq_lens"]
        assert step.logits_indices.tolist() == want["logits_indices"]
        assert len(step.attn.block_tables) == len(want["seq_lens"])
        if hybrid:
            assert step.recurrent.state_slots.tolist() == case.kwargs["state_slots"]
        kinds.add(case.kind)
    assert kinds == {"decode", "padded decode", "prefill", "mixed", "padded mixed"}


def test_fields_keep_their_address_dtype_and_shape():
    batch, gen = _cases_batch(True, 0), cases.StepCases(seed=3, hybrid=True, device=torch.device("cpu"))
    t, r, b = cases.MAX_TOKENS, cases.MAX_REQUESTS, cases.MAX_BLOCKS
    spec = {name: ((t,), torch.int64) for name in cases.FIELDS[:5]}
    spec.update(query_start_loc=((r + 1,), torch.int32), seq_lens=((r,), torch.int32),
                logits_indices=((r,), torch.int64), feed_rows=((r,), torch.int64), feed_sources=((r,), torch.int64),
                state_slots=((r,), torch.int64), has_initial_state=((r,), torch.bool),
                block_tables=((r, b), torch.int32))
    before = {name: getattr(batch, name).data_ptr() for name in spec}
    assert len(set(before.values())) == len(spec)
    batch.point_at_dummy_block()
    for _ in range(30):
        case = gen.step()
        batch.prepare(case.chunks, **case.kwargs)
    for name, (shape, dtype) in spec.items():
        tensor = getattr(batch, name)
        assert (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype, tensor.is_contiguous()) == (
            before[name], shape, dtype, True), name


class _Copies(TorchDispatchMode):
    """copy_ calls while active: (bytes, whether source and destination share a storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[int, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            same = dst.untyped_storage().data_ptr() == src.untyped_storage().data_ptr()
            self.copies.append((src.numel() * src.element_size(), same))
        return func(*args, **(kwargs or {}))


def _decode_step(batch: StepBatch, num_requests: int, num_blocks: int, padded: int):
    reqs = []
    for i in range(num_requests):
        req = Request(str(i), list(range(2, 2 + 4 * num_blocks - 2)), SamplingParams(), output_token_ids=[9])
        req.block_ids = list(range(i * num_blocks, (i + 1) * num_blocks))
        reqs.append(req)
    copies = _Copies()
    with copies:
        batch.prepare([_decode(r) for r in reqs], num_padded_tokens=padded)
    uploads = [n for n, same in copies.copies if not same]
    return uploads, sum(same for _, same in copies.copies)


def test_a_decode_step_is_one_copy_and_one_unpack_op():
    """As the step_upload docstring says: one copy of 8 * k * P + 4 * P * max_blocks bytes
    (k = 10 lanes, P padded rows), one op unpacking it; trimmed block tables (when that saves
    enough) add one op and send only the used columns."""
    batch = StepBatch(max_step_tokens=512, max_requests=64, max_blocks_per_request=300, block_size=4,
                      dummy_block_id=9999, device=torch.device("cpu"))
    for b, padded in ((1, 1), (3, 4), (16, 16)):
        assert _decode_step(batch, b, 7, padded) == ([8 * 10 * padded + 4 * padded * 300], 1)
    # 64 rows x 300 blocks: whole rows are 75 KiB, 4 KiB for the 16 columns used.
    trimming = StepBatch(max_step_tokens=512, max_requests=64, max_blocks_per_request=300, block_size=4,
                         dummy_block_id=9999, device=torch.device("cpu"), min_bytes_saved_per_op=64 << 10)
    assert _decode_step(trimming, 64, 16, 64) == ([8 * 10 * 64 + 4 * 64 * 16], 2)
    assert _decode_step(trimming, 4, 16, 4) == ([8 * 10 * 4 + 4 * 4 * 300], 1)


class _PendingEvent:
    """Stands for a copy still running: pending ``polls`` times; asserts the slot it guards
    is unchanged each time it is asked."""

    def __init__(self, slot, polls: int) -> None:
        self.slot, self.polls, self.asked = slot, polls, 0
        self.frozen = slot.buffer.clone()

    def query(self) -> bool:
        assert torch.equal(self.slot.buffer, self.frozen), "staging slot written while its upload was pending"
        self.asked += 1
        return self.asked > self.polls


def test_a_staging_slot_is_not_written_before_its_upload_event_completed():
    batch, gen = _cases_batch(False), cases.StepCases(seed=11, hybrid=False, device=torch.device("cpu"))
    first = gen.step("decode")
    batch.prepare(first.chunks, **first.kwargs)            # slot 0
    event = batch._slots[0].uploaded = _PendingEvent(batch._slots[0], polls=3)
    second = gen.step("prefill")
    batch.prepare(second.chunks, **second.kwargs)          # slot 1: no wait
    assert event.asked == 0
    third = gen.step("decode")
    batch.prepare(third.chunks, **third.kwargs)            # slot 0 again: waits for the event first
    assert event.asked == 4 and batch._slots[0].uploaded is None
    assert cases.mismatches(third, cases.snapshot(batch)) == []


def test_steps_that_do_not_fit_are_refused():
    batch, gen = _cases_batch(False), cases.StepCases(seed=5, hybrid=False, device=torch.device("cpu"))
    case = gen.step("decode")
    with pytest.raises(ValueError, match="less than"):
        batch.prepare(case.chunks, num_padded_tokens=len(case.chunks) - 1)
    with pytest.raises(ValueError, match="does not fit"):
        batch.prepare(case.chunks, num_padded_tokens=cases.MAX_REQUESTS + 1)


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-hybrid-gdn"])
def test_no_step_reads_a_row_it_did_not_fill(make_engine, reference, monkeypatch, preset):
    """Before every step each staging lane is poisoned (0x7f bytes: ids and lengths far out
    of range, flags set), and so are block-table columns past the blocks the slot's row
    cache keeps. The packed upload carries whole lane prefixes, so the rows a step leaves
    unfilled (past a decode's rows after a long prefill, logits / feed rows past the used
    ones, padding table rows) reach the device poisoned: any kernel or gather reading one
    would index out of range or change tokens / routing. Padded decode and prefill paths."""
    import numpy as np
    from inference.presets import build_model, get_preset
    from inference.step_upload import StagingSlot

    fill = StagingSlot.wait_until_free
    poisoned = []

    def poison_then_fill(slot):
        fill(slot)
        slot._lanes.view(np.uint8)[...] = 0x7F
        table = slot.arrays["block_tables"]
        for r, owner in enumerate(slot.row_owners):
            table[r, 0 if owner is None else owner[1]:] = 0x7F7F7F7F
        poisoned.append(slot)

    monkeypatch.setattr(StagingSlot, "wait_until_free", poison_then_fill)
    model = build_model(get_preset(preset), seed=0)
    rng = np.random.default_rng(40)
    prompts = [rng.integers(2, 512, size=int(n)).tolist() for n in (37, 3, 20, 9, 2, 28)]
    engine = make_engine(model=model, record_routing=True, max_requests=6, max_step_tokens=48, padded_decode=True,
                         padded_prefill=preset == "tiny-moe")
    results = engine.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert len(poisoned) == len(engine.step_log.entries) > 6
    for r in results:
        assert r.output_token_ids == reference.greedy(model, r.prompt_token_ids, 6, None, True)
        expected = reference.routing(model, r.prompt_token_ids, r.output_token_ids).numpy()
        np.testing.assert_array_equal(r.routing.astype(np.int64), expected)
