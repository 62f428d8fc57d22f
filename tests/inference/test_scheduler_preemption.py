"""Scheduler preemption and its interplay with the prefix cache.

Every scenario checks, through the fake sampler of scheduler_helpers, that a preempted or
cache-hit request still ends with its one-token-at-a-time reference output.
"""

from __future__ import annotations

import pytest

from inference.request import Request, RequestStatus

# Registered before the import so the helpers' asserts keep pytest's detailed failure reports.
pytest.register_assert_rewrite("tests.inference.scheduler_helpers")
from tests.inference.scheduler_helpers import (  # noqa: E402
    BS,
    assert_served,
    chunk_of,
    make,
    req,
    run_all,
    step,
)


# ------------------------------------------------------------------ preemption


def test_preemption_frees_the_newest_request_after_the_callback_and_it_resumes():
    seen = []

    def on_preempt(request: Request) -> None:
        pool = sched.block_pool
        assert request.block_ids and all(pool.ref_count(b) > 0 for b in request.block_ids)
        assert request.status is RequestStatus.RUNNING
        seen.append((request.request_id, list(request.block_ids), request.num_computed_tokens,
                     list(request.output_token_ids)))

    sched, pool = make(num_blocks=6, on_preempt=on_preempt)
    a = req("a", range(1, 9), max_new=12, arrival=0)
    b = req("b", range(11, 19), max_new=12, arrival=1)
    sched.add(a)
    sched.add(b)
    outputs = []
    while not b.num_preemptions:
        assert len(outputs) < 50, "b was never preempted"
        outputs.append(step(sched)[0])
    assert outputs[-1].preempted == [b] and chunk_of(outputs[-1], "b") is None
    assert [s[0] for s in seen] == ["b"]
    _, blocks_at_preempt, computed_at_preempt, outputs_at_preempt = seen[0]
    assert computed_at_preempt > 8 and len(blocks_at_preempt) * BS >= computed_at_preempt
    assert b.status is RequestStatus.WAITING and b.block_ids == [] and b.num_computed_tokens == 0
    assert b.output_token_ids == outputs_at_preempt  # kept, to be recomputed as prompt
    assert a.num_preemptions == 0

    resumed = []
    for out in run_all(sched):
        chunk = chunk_of(out, "b")
        if chunk is not None and not resumed:
            resumed.append((chunk.start, chunk.start + chunk.num_tokens, chunk.samples))
    start, end, samples = resumed[0]
    # One chunk recomputes prompt and kept outputs; only then is a new token sampled.
    assert (end, samples) == (8 + len(outputs_at_preempt), True)
    assert start % BS == 0 and 0 < start < end  # a prefix hit, and the last token is redone
    assert b.num_cached_tokens == 0  # recorded on first admission only
    for r in (a, b):
        assert_served(r)
    assert pool.num_available == pool.num_blocks


def test_a_preempted_request_goes_back_to_the_front_of_the_queue():
    sched, _ = make(num_blocks=4, max_requests=2)
    a = req("a", range(1, 9), max_new=3, arrival=0)
    b = req("b", range(11, 18), max_new=3, arrival=1)
    c = req("c", [30, 31], max_new=1, arrival=2)  # small enough to slip in ahead of b
    for r in (a, b, c):
        sched.add(r)
    first_step: dict[str, tuple[int, int]] = {}
    for index, out in enumerate(run_all(sched)):
        if out.preempted:
            assert out.preempted == [b] and first_step.keys() == {"a", "b"}
            first_step.pop("b")
        for position, chunk in enumerate(out.chunks):
            first_step.setdefault(chunk.request.request_id, (index, position))
    assert b.num_preemptions == 1
    assert first_step["b"] < first_step["c"]  # resumed b is served before the later c


def test_the_newest_request_preempts_itself_when_it_is_the_one_short_of_blocks():
    sched, _ = make(num_blocks=4)
    a = req("a", range(6), max_new=5, arrival=0)  # position 6 still fits in its 2nd block
    b = req("b", range(10, 18), max_new=5, arrival=1)  # position 8 needs a 3rd block
    sched.add(a)
    sched.add(b)
    step(sched)
    out, _ = step(sched)
    assert out.preempted == [b]
    assert [c.request.request_id for c in out.chunks] == ["a"]
    run_all(sched)
    assert b.finish_reason == "length" and len(b.output_token_ids) == 5


def test_preempting_an_already_scheduled_request_withdraws_its_chunk():
    sched, _ = make(num_blocks=3, max_step_tokens=8)
    newer = req("newer", [1, 2, 3], max_new=4, arrival=1)
    older = req("older", list(range(20, 32)), max_new=1, arrival=0)
    sched.add(newer)
    sched.add(older)
    step(sched)  # newer: 3 tokens, 1 block; older: 5 tokens, 2 blocks; pool full
    out, _ = step(sched)
    # newer's decode was scheduled first, then older's chunk needed its block.
    assert out.preempted == [newer]
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("older", 5, 7)]
    assert out.num_tokens <= 8
    run_all(sched)
    for r in (newer, older):
        assert_served(r)


# ------------------------------------------------------------------ prefix cache


def test_prefix_hits_skip_cached_blocks_but_never_the_last_token():
    sched, pool = make()
    prompt = list(range(1, 19))  # 18 tokens: 4 full blocks
    sched.add(req("first", prompt, max_new=1))
    run_all(sched)
    again = req("again", prompt, max_new=1)
    sched.add(again)
    out, _ = step(sched)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(16, 2)]
    assert again.num_cached_tokens == 16 and again.num_computed_tokens == 18

    aligned = list(range(1, 17))  # exactly 4 blocks: the 4th holds the last token
    sched.add(req("aligned", aligned, max_new=1))
    out, _ = step(sched)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(12, 4)]
    assert pool.num_available == pool.num_blocks


def test_running_requests_share_prefix_blocks():
    sched, pool = make()
    owner = req("owner", list(range(1, 13)), max_new=20)
    sched.add(owner)
    step(sched)
    sharer = req("sharer", list(range(1, 9)) + [40, 41, 42], max_new=2)
    sched.add(sharer)
    out, _ = step(sched)
    assert sharer.block_ids[:2] == owner.block_ids[:2]
    assert sharer.block_ids[2] != owner.block_ids[2]
    assert [pool.ref_count(b) for b in owner.block_ids[:3]] == [2, 2, 1]
    assert chunk_of(out, "sharer").start == 8 and sharer.num_cached_tokens == 8


def test_prefix_caching_off_recomputes_everything():
    sched, _ = make(caching=False)
    prompt = list(range(1, 19))
    sched.add(req("first", prompt, max_new=1))
    run_all(sched)
    again = req("again", prompt, max_new=1)
    sched.add(again)
    out, _ = step(sched)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(0, 18)]
    assert again.num_cached_tokens == 0
