"""Scheduler policy: config, budget, ordering, chunked prefill, admission, finishing, abort.

Preemption and prefix-cache interplay live in test_scheduler_preemption.py, the randomized
simulation in test_scheduler_simulation.py; the shared harness in scheduler_helpers.py.
"""

from __future__ import annotations

import random

import pytest

from inference.cache.block_pool import BlockPool
from inference.errors import InvalidRequestError, NoFreeBlocksError
from inference.request import Request, RequestStatus
from inference.scheduler import Scheduler, SchedulerConfig

# Registered before the import so the helpers' asserts keep pytest's detailed failure reports.
pytest.register_assert_rewrite("tests.inference.scheduler_helpers")
from tests.inference.scheduler_helpers import (  # noqa: E402
    BS,
    NO_LIMIT,
    VOCAB,
    assert_served,
    fake_token,
    make,
    req,
    reference_output,
    run_all,
    step,
)


# ------------------------------------------------------------------ config and queues


@pytest.mark.parametrize("field", ["max_requests", "max_step_tokens", "block_size"])
def test_config_rejects_non_positive_limits(field):
    values = {"max_requests": 1, "max_step_tokens": 1, "block_size": 1, field: 0}
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**values)


def test_block_size_must_match_the_pool():
    with pytest.raises(ValueError, match="block_size"):
        Scheduler(SchedulerConfig(1, 8, BS * 2), BlockPool(8, BS))


def test_add_rejects_duplicates_and_empty_prompts():
    sched, _ = make()
    sched.add(req("a", [1, 2]))
    with pytest.raises(InvalidRequestError, match="'a'"):
        sched.add(req("a", [3]))
    with pytest.raises(InvalidRequestError, match="'e'"):
        sched.add(req("e", []))
    assert (sched.num_waiting, sched.num_running) == (1, 0)


def test_empty_scheduler_schedules_nothing():
    sched, _ = make()
    out = sched.schedule()
    assert out.chunks == [] and out.preempted == [] and out.num_tokens == 0
    assert not sched.has_unfinished()


def test_single_request_prefills_then_decodes_to_its_reference_output():
    sched, pool = make()
    request = req("a", [5, 6, 7, 8, 9], max_new=3)
    sched.add(request)
    out, finished = step(sched)
    assert [(c.start, c.num_tokens, c.samples) for c in out.chunks] == [(0, 5, True)]
    assert (out.num_prefill_requests, out.num_decode_requests) == (1, 0)
    assert finished == [] and request.status is RequestStatus.RUNNING
    out, _ = step(sched)
    assert [(c.start, c.num_tokens, c.is_decode) for c in out.chunks] == [(5, 1, True)]
    run_all(sched)
    assert (request.output_token_ids, request.finish_reason) == reference_output(
        [5, 6, 7, 8, 9], request.sampling_params
    )
    assert request.is_finished and request.block_ids == []
    assert pool.num_available == pool.num_blocks


# ------------------------------------------------------------------ budget and ordering


def test_budget_and_request_limit_hold_every_step():
    sched, _ = make(max_requests=3, max_step_tokens=10)
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randrange(1, 30))] for _ in range(12)]
    requests = [req(f"r{i}", prompt, max_new=5) for i, prompt in enumerate(prompts)]
    for r in requests:
        sched.add(r)
    outputs = run_all(sched)
    assert all(0 < o.num_tokens <= 10 for o in outputs)
    assert all(len(o.chunks) <= 3 for o in outputs)
    assert any(o.num_tokens == 10 for o in outputs)  # the budget is actually used
    for r in requests:
        assert_served(r)


def test_decodes_come_first_and_are_not_starved_by_an_older_prefill():
    sched, _ = make(max_step_tokens=8)
    newer = req("newer", [1, 2], max_new=10, arrival=5)
    older = req("older", list(range(30)), max_new=1, arrival=0)
    sched.add(newer)
    sched.add(older)
    out, _ = step(sched)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [
        ("newer", 2),
        ("older", 6),
    ]
    out, _ = step(sched)
    # Arrival order alone would give the older prefill the whole budget.
    assert [c.request.request_id for c in out.chunks] == ["newer", "older"]
    assert out.chunks[0].is_decode and out.is_decode(out.chunks[0])
    assert (out.num_decode_requests, out.num_prefill_requests, out.num_tokens) == (1, 1, 8)


def test_chunked_prefill_splits_a_long_prompt_across_steps():
    sched, _ = make(max_step_tokens=16)
    long = req("long", list(range(50)), max_new=2)
    sched.add(long)
    chunks = []
    for _ in range(10):  # bounded: a stuck scheduler fails instead of hanging
        if long.num_computed_tokens >= 50:
            break
        out, _ = step(sched)
        chunks += [(c.start, c.num_tokens, c.samples) for c in out.chunks]
    assert chunks == [(0, 16, False), (16, 16, False), (32, 16, False), (48, 2, True)]
    assert len(long.output_token_ids) == 1


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    sched, _ = make(max_step_tokens=16, chunked=False)
    a, b = req("a", range(10), max_new=3), req("b", range(20, 30), max_new=3)
    sched.add(a)
    sched.add(b)
    out, _ = step(sched)
    assert [c.request.request_id for c in out.chunks] == ["a"]
    out, _ = step(sched)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [
        ("a", 10, 1),
        ("b", 0, 10),
    ]


def test_without_chunked_prefill_a_prompt_larger_than_the_budget_is_an_error():
    sched, _ = make(max_step_tokens=16, chunked=False)
    sched.add(req("big", range(17)))
    with pytest.raises(InvalidRequestError, match="'big'.*max_step_tokens"):
        sched.schedule()


# ------------------------------------------------------------------ admission


def test_admission_is_limited_by_max_requests():
    sched, _ = make(max_requests=2)
    requests = [req(f"r{i}", [i + 1] * 3, max_new=2) for i in range(3)]
    for r in requests:
        sched.add(r)
    out, _ = step(sched)
    assert [c.request.request_id for c in out.chunks] == ["r0", "r1"]
    assert (sched.num_running, sched.num_waiting) == (2, 1)
    out, finished = step(sched)
    assert {r.request_id for r in finished} == {"r0", "r1"}
    assert "r2" not in [c.request.request_id for c in out.chunks]  # slots were full
    out, _ = step(sched)
    assert [c.request.request_id for c in out.chunks] == ["r2"]


def test_admission_waits_for_blocks_and_never_preempts():
    sched, pool = make(num_blocks=4)
    first = req("first", range(12), max_new=2)  # 3 blocks, then a 4th for position 12
    second = req("second", range(20, 28), max_new=2)  # needs 2 blocks
    sched.add(first)
    sched.add(second)
    out, _ = step(sched)
    assert [c.request.request_id for c in out.chunks] == ["first"]
    assert out.preempted == [] and second.status is RequestStatus.WAITING
    assert pool.num_available == 1
    run_all(sched)
    assert first.num_preemptions == 0 and second.num_preemptions == 0
    assert second.finish_reason == "length"


def test_requests_added_while_others_run_are_served():
    sched, _ = make(max_step_tokens=8)
    early = req("early", range(6), max_new=6)
    sched.add(early)
    step(sched)
    step(sched)
    late = req("late", range(30, 40), max_new=3)
    sched.add(late)
    out, _ = step(sched)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("early", 1), ("late", 7)]
    run_all(sched)
    for r in (early, late):
        assert_served(r)


def test_a_request_that_cannot_fit_the_whole_pool_is_an_error_not_a_hang():
    sched, _ = make(num_blocks=2)
    sched.add(req("huge", range(12)))
    with pytest.raises(NoFreeBlocksError, match="'huge'"):
        sched.schedule()
    chunked, _ = make(num_blocks=2, max_step_tokens=4)
    chunked.add(req("huge", range(12)))
    with pytest.raises(NoFreeBlocksError, match="'huge'"):
        for _ in range(4):
            step(chunked)


# ------------------------------------------------------------------ finishing


def _finish_one(params: dict, sampler=fake_token, eos=None, max_model_len=NO_LIMIT):
    finished_seen = []

    def on_finish(request: Request) -> None:
        assert request.status is RequestStatus.FINISHED and request.finish_reason is not None
        held = [sched.block_pool.ref_count(b) for b in request.block_ids]
        assert held and all(ref > 0 for ref in held)
        finished_seen.append(request)

    sched, pool = make(on_finish=on_finish, eos=eos, max_model_len=max_model_len)
    request = req("x", [1, 2, 3], **params)
    sched.add(request)
    run_all(sched, sampler=sampler)
    assert finished_seen == [request] and request.block_ids == []
    assert pool.num_available == pool.num_blocks
    return request


def test_eos_stops_unless_ignored():
    always_eos = lambda tokens: 7  # noqa: E731
    stopped = _finish_one({"max_new": 5}, sampler=always_eos, eos=7)
    assert (stopped.output_token_ids, stopped.finish_reason) == ([7], "stop")
    ignored = _finish_one({"max_new": 5, "ignore_eos": True}, sampler=always_eos, eos=7)
    assert (ignored.output_token_ids, ignored.finish_reason) == ([7] * 5, "length")


def test_stop_token_ids_stop_even_with_ignore_eos():
    counting = lambda tokens: len(tokens)  # noqa: E731  # 3, 4, 5, ...
    params = {"max_new": 10, "stop_token_ids": (6,), "ignore_eos": True}
    request = _finish_one(params, sampler=counting)
    assert (request.output_token_ids, request.finish_reason) == ([3, 4, 5, 6], "stop")


def test_length_by_max_new_tokens_and_by_max_model_len():
    by_new = _finish_one({"max_new": 4})
    assert (len(by_new.output_token_ids), by_new.finish_reason) == (4, "length")
    by_len = _finish_one({"max_new": 100}, max_model_len=9)
    assert (by_len.num_tokens, by_len.finish_reason) == (9, "length")


def test_finished_requests_come_back_in_chunk_order():
    sched, _ = make()
    for rid in ("p", "q", "r"):
        sched.add(req(rid, [1, 2], max_new=1))
    out, finished = step(sched)
    assert [r.request_id for r in finished] == [c.request.request_id for c in out.chunks]
    assert [r.request_id for r in finished] == ["p", "q", "r"]


def test_update_rejects_an_output_applied_twice():
    sched, _ = make()
    sched.add(req("a", range(8), max_new=5))
    out = sched.schedule()
    sched.update(out, {"a": 1})
    with pytest.raises(ValueError, match="'a'.*already applied"):
        sched.update(out, {"a": 1})


# ------------------------------------------------------------------ abort


def test_abort_removes_running_and_waiting_requests_and_frees_blocks():
    sched, pool = make(max_requests=1)
    running, waiting = req("run", range(10), max_new=5), req("wait", range(5), max_new=5)
    sched.add(running)
    sched.add(waiting)
    out = sched.schedule()
    assert sched.abort("run") is running
    assert running.status is RequestStatus.FINISHED and running.block_ids == []
    assert sched.update(out, {"run": 3}) == []  # stale chunk is ignored
    assert running.output_token_ids == []
    assert sched.abort("wait") is waiting and sched.abort("nope") is None
    assert not sched.has_unfinished()
    assert pool.num_available == pool.num_blocks
    sched.check_invariants()
