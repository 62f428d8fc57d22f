"""Scheduler: token budget, chunked prefill, admission, preemption, prefix hits, finishing.

A fake sampler picks each token as a fixed function of the sequence so far, so the tokens a
request ends with do not depend on how it was scheduled; every scenario can be checked
against plain one-token-at-a-time generation.
"""

from __future__ import annotations

import random

import pytest

from inference.block_pool import BlockPool
from inference.errors import InvalidRequestError, NoFreeBlocksError
from inference.request import Request, RequestStatus, SamplingParams
from inference.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

BS = 4
VOCAB = 50
NO_LIMIT = 10**9


def fake_token(tokens: list[int]) -> int:
    return (sum(tokens[-3:]) * 7 + len(tokens)) % VOCAB


def make(
    num_blocks=64, max_requests=8, max_step_tokens=32, chunked=True, caching=True, **callbacks
) -> tuple[Scheduler, BlockPool]:
    pool = BlockPool(num_blocks, BS, enable_prefix_caching=caching)
    config = SchedulerConfig(max_requests, max_step_tokens, BS, chunked_prefill=chunked)
    return Scheduler(config, pool, **callbacks), pool


def req(rid: str, prompt, max_new=4, arrival=0, **params) -> Request:
    sampling = SamplingParams(max_new_tokens=max_new, **params)
    return Request(rid, list(prompt), sampling, arrival_index=arrival)


def step(sched: Scheduler, eos=None, max_model_len=NO_LIMIT, sampler=fake_token):
    out = sched.schedule()
    for chunk in out.chunks:  # what the engine relies on before running the forward
        assert chunk.start == chunk.request.num_computed_tokens
        assert len(chunk.request.block_ids) * BS >= chunk.start + chunk.num_tokens
    sampled = {
        c.request.request_id: sampler(c.request.all_token_ids) for c in out.chunks if c.samples
    }
    finished = sched.update(out, sampled, eos, max_model_len)
    sched.check_invariants()
    sched.block_pool.check_invariants()
    return out, finished


def run_all(sched: Scheduler, max_steps=10_000, **kw) -> list[SchedulerOutput]:
    outputs = []
    while sched.has_unfinished():
        assert len(outputs) < max_steps, "scheduler made no progress"
        outputs.append(step(sched, **kw)[0])
    return outputs


def reference_output(prompt, params: SamplingParams, eos=None, max_model_len=NO_LIMIT):
    """One token at a time, no scheduler: what every request must end with."""
    tokens, out = list(prompt), []
    while True:
        token = fake_token(tokens + out)
        out.append(token)
        if (token == eos and not params.ignore_eos) or token in params.stop_token_ids:
            return out, "stop"
        if len(out) >= params.max_new_tokens or len(tokens) + len(out) >= max_model_len:
            return out, "length"


def assert_served(request: Request, eos=None, max_model_len=NO_LIMIT) -> None:
    params = request.sampling_params
    expected = reference_output(request.prompt_token_ids, params, eos, max_model_len)
    assert (request.output_token_ids, request.finish_reason) == expected, request.request_id


def chunk_of(out: SchedulerOutput, rid: str):
    matches = [c for c in out.chunks if c.request.request_id == rid]
    assert len(matches) <= 1
    return matches[0] if matches else None


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


# ------------------------------------------------------------------ finishing


def _finish_one(params: dict, sampler=fake_token, eos=None, max_model_len=NO_LIMIT):
    finished_seen = []

    def on_finish(request: Request) -> None:
        assert request.status is RequestStatus.FINISHED and request.finish_reason is not None
        held = [sched.block_pool.ref_count(b) for b in request.block_ids]
        assert held and all(ref > 0 for ref in held)
        finished_seen.append(request)

    sched, pool = make(on_finish=on_finish)
    request = req("x", [1, 2, 3], **params)
    sched.add(request)
    run_all(sched, eos=eos, max_model_len=max_model_len, sampler=sampler)
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
    sched.update(out, {"a": 1}, None, NO_LIMIT)
    with pytest.raises(ValueError, match="'a'"):
        sched.update(out, {"a": 1}, None, NO_LIMIT)


# ------------------------------------------------------------------ abort


def test_abort_removes_running_and_waiting_requests_and_frees_blocks():
    sched, pool = make(max_requests=1)
    running, waiting = req("run", range(10), max_new=5), req("wait", range(5), max_new=5)
    sched.add(running)
    sched.add(waiting)
    out = sched.schedule()
    assert sched.abort("run") is running
    assert running.status is RequestStatus.FINISHED and running.block_ids == []
    assert sched.update(out, {"run": 3}, None, NO_LIMIT) == []  # stale chunk is ignored
    assert running.output_token_ids == []
    assert sched.abort("wait") is waiting and sched.abort("nope") is None
    assert not sched.has_unfinished()
    assert pool.num_available == pool.num_blocks
    sched.check_invariants()


# ------------------------------------------------------------------ randomized simulation


class _KVModel:
    """Which sequence prefix each (block, offset) slot holds, to prove that cached and
    shared blocks always hold exactly the KV a request expects."""

    def __init__(self) -> None:
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}

    def check_and_write(self, chunk, pool: BlockPool, newly_admitted: bool) -> None:
        request, tokens = chunk.request, chunk.request.all_token_ids
        if newly_admitted:  # the computed prefix came from the cache
            for p in range(chunk.start):
                slot = (request.block_ids[p // BS], p % BS)
                assert self.slots.get(slot) == tuple(tokens[: p + 1]), (request.request_id, p)
        for p in range(chunk.start, chunk.start + chunk.num_tokens):
            block = request.block_ids[p // BS]
            assert pool.ref_count(block) == 1, "writing into a shared block"
            self.slots[(block, p % BS)] = tuple(tokens[: p + 1])


def test_randomized_simulation_serves_every_request_exactly():
    rng = random.Random(7)
    eos, max_model_len, num_requests = 0, 48, 300
    sched, pool = make(num_blocks=16, max_requests=6, max_step_tokens=20)
    kv = _KVModel()
    bases = [[rng.randrange(1, VOCAB) for _ in range(24)] for _ in range(3)]
    pending = []
    for i in range(num_requests):
        shared = rng.choice(bases)[: rng.randrange(0, 20)]
        prompt = shared + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 12))]
        params = {"max_new": rng.randrange(1, 20), "ignore_eos": rng.random() < 0.2}
        if rng.random() < 0.2:
            params["stop_token_ids"] = (rng.randrange(1, VOCAB),)
        pending.append(req(f"r{i}", prompt, arrival=i, **params))
    added, aborted, steps, preemptions = [], set(), 0, 0
    while pending or sched.has_unfinished():
        for _ in range(rng.randrange(0, 4) if pending else 0):
            added.append(pending.pop(0))
            sched.add(added[-1])
        if added and rng.random() < 0.01:
            victim = rng.choice(added)
            if not victim.is_finished and sched.abort(victim.request_id) is victim:
                aborted.add(victim.request_id)
        running_before = {id(r) for r in added if r.status is RequestStatus.RUNNING}
        out = sched.schedule()
        preemptions += len(out.preempted)
        assert out.num_tokens <= 20 and len(out.chunks) <= 6
        kinds = [c.is_decode for c in out.chunks]
        assert kinds == sorted(kinds, reverse=True)  # decodes first
        for chunk in out.chunks:
            newly_admitted = id(chunk.request) not in running_before
            assert not (newly_admitted and out.preempted), "admitted in a step that preempted"
            kv.check_and_write(chunk, pool, newly_admitted)
        sampled = {
            c.request.request_id: fake_token(c.request.all_token_ids)
            for c in out.chunks
            if c.samples
        }
        sched.update(out, sampled, eos, max_model_len)
        sched.check_invariants()
        pool.check_invariants()
        steps += 1
        assert steps < 20_000, "simulation did not converge"
    assert preemptions > 0 and len(aborted) > 0  # the hard paths were exercised
    assert any(r.num_cached_tokens > 0 for r in added)
    for r in added:
        assert r.is_finished and r.block_ids == []
        if r.request_id not in aborted:
            assert_served(r, eos, max_model_len)
    assert pool.num_available == pool.num_blocks
