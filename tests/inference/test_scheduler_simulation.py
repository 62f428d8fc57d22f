"""Randomized scheduler simulation: arrivals, aborts, preemption and prefix hits together.

A shadow model of the KV slots proves that cached and shared blocks always hold the KV a
request expects, and every request that was not aborted ends with its reference output.
"""

from __future__ import annotations

import random

import pytest

from inference.cache.block_pool import BlockPool
from inference.request import RequestStatus

# Registered before the import so the helpers' asserts keep pytest's detailed failure reports.
pytest.register_assert_rewrite("tests.inference.scheduler_helpers")
from tests.inference.scheduler_helpers import (  # noqa: E402
    BS,
    VOCAB,
    FakeDevice,
    assert_served,
    make,
    req,
)


# ------------------------------------------------------------------ randomized simulation


class _KVModel:
    """Which sequence prefix each (block, offset) slot holds, to prove that cached and
    shared blocks always hold exactly the KV a request expects. Tokens come from the fake
    device's record, which may run ahead of what the host has received."""

    def __init__(self, device: FakeDevice) -> None:
        self.device = device
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}

    def check_and_write(self, chunk, pool: BlockPool, newly_admitted: bool, hashes_before: dict) -> None:
        request, tokens = chunk.request, self.device.record_of(chunk.request)
        if newly_admitted:  # the computed prefix came from the cache
            for p in range(chunk.start):
                slot = (request.block_ids[p // BS], p % BS)
                assert self.slots.get(slot) == tuple(tokens[: p + 1]), (request.request_id, p)
        for p in range(chunk.start, chunk.start + chunk.num_tokens):
            block, written = request.block_ids[p // BS], tuple(tokens[: p + 1])
            # A shared block is written only by the chunk whose scheduling hashed it (a request
            # admitted behind it in the same schedule hit it and reads it after this write,
            # checked when its own chunk comes); a block keeping a hash from before never is.
            same_hash = pool.block_hash(block) == hashes_before[block] is not None
            assert pool.ref_count(block) == 1 or not same_hash, "writing into a shared block"
            self.slots[(block, p % BS)] = written


@pytest.mark.parametrize("lag", [0, 1], ids=["sync", "async"])
def test_randomized_simulation_serves_every_request_exactly(lag):
    """``lag=1``: step N's output is applied after step N+1 was scheduled and launched
    (asynchronous scheduling), so requests learn they stopped a step late."""
    rng = random.Random(7)
    eos, max_model_len, num_requests = 0, 48, 300
    sched, pool = make(num_blocks=16, max_requests=6, max_step_tokens=20, eos=eos, max_model_len=max_model_len)
    device = FakeDevice()
    kv = _KVModel(device)
    bases = [[rng.randrange(1, VOCAB) for _ in range(24)] for _ in range(3)]
    pending = []
    for i in range(num_requests):
        shared = rng.choice(bases)[: rng.randrange(0, 20)]
        prompt = shared + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 12))]
        params = {"max_new": rng.randrange(1, 20), "ignore_eos": rng.random() < 0.2}
        if rng.random() < 0.2:
            params["stop_token_ids"] = (rng.randrange(1, VOCAB),)
        pending.append(req(f"r{i}", prompt, arrival=i, **params))
    added, aborted, steps, preemptions, discarded, same_step_hits = [], set(), 0, 0, 0, 0
    in_flight: list = []
    while pending or sched.has_unfinished() or in_flight:
        for _ in range(rng.randrange(0, 4) if pending else 0):
            added.append(pending.pop(0))
            sched.add(added[-1])
        if added and rng.random() < 0.01:
            victim = rng.choice(added)
            if not victim.is_finished and sched.abort(victim.request_id) is victim:
                aborted.add(victim.request_id)
        running_before = {id(r) for r in added if r.status is RequestStatus.RUNNING}
        hashes_before = {b: pool.block_hash(b) for b in range(pool.num_blocks)}
        out = sched.schedule()
        preemptions += len(out.preempted)
        assert out.num_tokens <= 20 and len(out.chunks) <= 6
        kinds = [c.is_decode for c in out.chunks]
        assert kinds == sorted(kinds, reverse=True)  # decodes first
        for chunk in out.chunks:
            newly_admitted = id(chunk.request) not in running_before
            assert not (newly_admitted and out.preempted), "admitted in a step that preempted"
            hits = chunk.request.block_ids[: chunk.start // BS] if newly_admitted else []
            same_step_hits += any(pool.block_hash(b) != hashes_before[b] for b in hits)
            kv.check_and_write(chunk, pool, newly_admitted, hashes_before)
        if out.chunks or out.preempted:
            in_flight.append((out, device.launch(out)))
        while len(in_flight) > (lag if out.chunks else 0):
            landed, sampled = in_flight.pop(0)
            discarded += sum(c.request.is_finished for c in landed.chunks)
            sched.update(landed, sampled)
        sched.check_invariants()
        pool.check_invariants()
        steps += 1
        assert steps < 20_000, "simulation did not converge"
    assert preemptions > 0 and len(aborted) > 0  # the hard paths were exercised
    assert any(r.num_cached_tokens > 0 for r in added)
    assert same_step_hits > 0, "requests must hit blocks hashed by a chunk of the same schedule"
    assert (discarded > 0) == (lag > 0), "async runs discard the extra chunk of requests that stopped"
    for r in added:
        assert r.is_finished and r.block_ids == []
        if r.request_id not in aborted:
            assert_served(r, eos, max_model_len)
    assert pool.num_available == pool.num_blocks
    assert sched.num_retiring_blocks == 0
