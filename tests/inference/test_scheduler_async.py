"""Scheduler with a step in flight: step N+1 is scheduled before step N's output is applied
(asynchronous scheduling). Pending tokens, the extra chunk of a request that stopped, blocks
held until the last chunk lands, preemption and aborts in flight."""

from __future__ import annotations

import pytest

from inference.request import RequestStatus

pytest.register_assert_rewrite("tests.inference.scheduler_helpers")
from tests.inference.scheduler_helpers import (  # noqa: E402
    FakeDevice,
    assert_served,
    check_launch,
    make,
    req,
    run_all_async,
)


def test_decode_reads_the_pending_token_and_the_host_learns_it_a_step_later():
    sched, _ = make()
    a = req("a", [1, 2, 3], max_new=4, ignore_eos=True)
    sched.add(a)
    device = FakeDevice()
    first = sched.schedule()
    sampled_first = device.launch(first)
    assert a.num_pending_tokens == 1 and a.output_token_ids == []
    second = sched.schedule()          # before the first step's output is applied
    check_launch(second)
    (chunk,) = second.chunks
    assert (chunk.start, chunk.num_tokens, chunk.input_pending, chunk.is_decode) == (3, 1, True, True)
    sampled_second = device.launch(second)
    sched.update(first, sampled_first)
    assert a.output_token_ids == [sampled_first["a"]] and a.num_pending_tokens == 1
    sched.update(second, sampled_second)
    assert len(a.output_token_ids) == 2 and a.num_pending_tokens == 0
    sched.check_invariants()


def test_a_request_whose_pending_token_is_its_last_is_not_scheduled_again():
    sched, _ = make()
    a = req("a", [1, 2, 3], max_new=1)
    sched.add(a)
    first = sched.schedule()
    assert first.chunks[0].samples
    assert sched.schedule().chunks == []      # max_new_tokens reached by the pending token
    sched.update(first, FakeDevice().launch(first))
    assert a.is_finished and a.finish_reason == "length"


def test_extra_chunk_of_a_stopped_request_is_discarded_and_its_blocks_wait_for_it():
    stop_at_first = lambda tokens: 7  # noqa: E731
    sched, pool = make(eos=7)
    a = req("a", [1, 2, 3, 4], max_new=10)
    sched.add(a)
    device = FakeDevice(stop_at_first)
    first = sched.schedule()
    out_first = device.launch(first)
    second = sched.schedule()                 # a does not know yet that it stopped
    out_second = device.launch(second)
    assert [c.request for c in second.chunks] == [a]
    finished = sched.update(first, out_first)
    assert finished == [a] and a.output_token_ids == [7] and a.finish_reason == "stop"
    assert a.block_ids == [] and sched.num_retiring_blocks == 2 and pool.num_in_use == 2
    sched.check_invariants()
    assert sched.update(second, out_second) == []      # the extra token is dropped
    assert a.output_token_ids == [7]
    assert sched.num_retiring_blocks == 0 and pool.num_available == pool.num_blocks
    sched.check_invariants()


def test_abort_with_a_chunk_in_flight_frees_blocks_when_it_lands():
    sched, pool = make()
    a = req("a", range(10), max_new=5)
    sched.add(a)
    first = sched.schedule()
    sampled = FakeDevice().launch(first)
    assert sched.abort("a") is a
    assert pool.num_in_use == 3 and sched.num_retiring_blocks == 3
    assert sched.update(first, sampled) == [] and a.output_token_ids == []
    assert pool.num_available == pool.num_blocks and sched.num_retiring_blocks == 0
    sched.check_invariants()


def test_preempted_request_receives_its_pending_token_and_may_finish_while_waiting():
    preempted = []
    sched, pool = make(num_blocks=4, on_preempt=preempted.append, eos=9)
    old = req("old", [1, 2, 3, 4, 5, 6, 7], max_new=10, arrival=0)
    new = req("new", [11, 12, 13, 14, 15, 16, 17, 18], max_new=10, arrival=1)
    sched.add(old)
    sched.add(new)
    device = FakeDevice(lambda tokens: 9 if tokens[0] == 11 else 3)   # "new" stops at once
    first = sched.schedule()
    assert [c.request for c in first.chunks] == [old, new]
    out_first = device.launch(first)
    second = sched.schedule()     # old needs a block at position 7: new (in flight) is preempted
    assert preempted == [new] and new.status is RequestStatus.WAITING and new.num_pending_tokens == 1
    assert [c.request for c in second.chunks] == [old]
    out_second = device.launch(second)
    finished = sched.update(first, out_first)
    assert finished == [new] and new.output_token_ids == [9] and new.finish_reason == "stop"
    sched.check_invariants()
    sched.update(second, out_second)
    assert pool.num_in_use == len(old.block_ids)
    sched.check_invariants()


def test_a_preempted_request_with_a_chunk_in_flight_is_not_readmitted_before_it_lands():
    sched, _ = make(num_blocks=4, max_step_tokens=32)
    old = req("old", [1, 2, 3, 4, 5, 6, 7], max_new=10, arrival=0, ignore_eos=True)
    new = req("new", [11, 12, 13, 14, 15, 16, 17, 18], max_new=10, arrival=1, ignore_eos=True)
    sched.add(old)
    sched.add(new)
    device = FakeDevice()
    first = sched.schedule()
    out_first = device.launch(first)
    second = sched.schedule()
    assert second.preempted == [new]
    sched.abort("old")                         # room for new right away...
    third_before_landing = sched.schedule()
    assert third_before_landing.chunks == []   # ...but its chunk of the first step is in flight
    sched.update(first, out_first)
    sched.update(second, device.launch(second))
    sched.update(third_before_landing, {})
    third = sched.schedule()
    # Its prompt blocks were hashed when the first step was scheduled and hold that step's
    # KV now that it landed: the re-admission hits them and computes the sampled token only.
    assert [c.request for c in third.chunks] == [new] and (third.chunks[0].start, third.chunks[0].num_tokens) == (8, 1)
    assert new.num_pending_tokens == 1 and len(new.output_token_ids) == 1


@pytest.mark.parametrize("num_blocks", [6, 9, 40])
def test_async_run_serves_everything_exactly_under_memory_pressure(num_blocks):
    sched, pool = make(num_blocks=num_blocks, max_requests=4, max_step_tokens=12, eos=5)
    requests = [req(f"r{i}", [(i * 7 + j) % 40 + 1 for j in range(3 + i % 5)], max_new=2 + i % 6,
                    arrival=i, ignore_eos=i % 3 == 0) for i in range(12)]
    for r in requests:
        sched.add(r)
    run_all_async(sched)
    for r in requests:
        assert_served(r, eos=5)
    assert pool.num_available == pool.num_blocks and sched.num_retiring_blocks == 0
