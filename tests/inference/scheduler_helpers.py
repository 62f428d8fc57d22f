"""Shared harness for the scheduler tests: a fake sampler and a stepping loop.

The fake sampler picks each token as a fixed function of the sequence so far, so the tokens a
request ends with do not depend on how it was scheduled; every scenario can be checked
against plain one-token-at-a-time generation.

``FakeDevice`` plays the GPU for asynchronous scheduling: it samples a step's tokens when
the step is launched, from its own record of every request's tokens (which runs ahead of
what the host has received), so ``update`` can be applied one step later.
"""

from __future__ import annotations

from inference.cache.block_pool import BlockPool
from inference.request import Request, SamplingParams
from inference.scheduled_step import SchedulerOutput
from inference.scheduler import Scheduler, SchedulerConfig

BS = 4
VOCAB = 50
NO_LIMIT = 10**9


def fake_token(tokens: list[int]) -> int:
    return (sum(tokens[-3:]) * 7 + len(tokens)) % VOCAB


def make(
    num_blocks=64, max_requests=8, max_step_tokens=32, chunked=True, caching=True, eos=None,
    max_model_len=NO_LIMIT, **callbacks
) -> tuple[Scheduler, BlockPool]:
    pool = BlockPool(num_blocks, BS, enable_prefix_caching=caching)
    config = SchedulerConfig(max_requests, max_step_tokens, BS, chunked_prefill=chunked,
                             eos_token_id=eos, max_model_len=max_model_len)
    return Scheduler(config, pool, **callbacks), pool


def req(rid: str, prompt, max_new=4, arrival=0, **params) -> Request:
    sampling = SamplingParams(max_new_tokens=max_new, **params)
    return Request(rid, list(prompt), sampling, arrival_index=arrival)


class FakeDevice:
    """Samples launched chunks from the full token record of each request (known tokens
    plus those sampled but not yet delivered), as the GPU does under async scheduling."""

    def __init__(self, sampler=fake_token) -> None:
        self.sampler = sampler
        self.tokens: dict[Request, list[int]] = {}

    def launch(self, out: SchedulerOutput) -> dict[str, int]:
        sampled = {}
        for chunk in out.chunks:
            request = chunk.request
            record = self.tokens.setdefault(request, list(request.all_token_ids))
            end = chunk.start + chunk.num_tokens
            assert record[: request.num_tokens] == request.all_token_ids
            assert end <= len(record), "a chunk computes a token nobody has sampled"
            if chunk.samples:
                token = self.sampler(record[:end])
                if end == len(record):
                    record.append(token)
                assert record[end] == token
                sampled[request.request_id] = token
        return sampled

    def record_of(self, request: Request) -> list[int]:
        return self.tokens.get(request, request.all_token_ids)


def check_launch(out: SchedulerOutput) -> None:
    """What the engine relies on before running a scheduled step's forward."""
    for chunk in out.chunks:
        assert chunk.start + chunk.num_tokens == chunk.request.num_computed_tokens
        assert len(chunk.request.block_ids) * BS >= chunk.start + chunk.num_tokens


def step(sched: Scheduler, sampler=fake_token):
    """One synchronous step: schedule, launch, apply."""
    out = sched.schedule()
    check_launch(out)
    finished = sched.update(out, FakeDevice(sampler).launch(out))
    sched.check_invariants()
    sched.block_pool.check_invariants()
    return out, finished


def run_all(sched: Scheduler, max_steps=10_000, **kw) -> list[SchedulerOutput]:
    outputs = []
    while sched.has_unfinished():
        assert len(outputs) < max_steps, "scheduler made no progress"
        outputs.append(step(sched, **kw)[0])
    return outputs


def run_all_async(sched: Scheduler, device: FakeDevice | None = None, max_steps=10_000) -> list[SchedulerOutput]:
    """Schedule step N+1 before applying step N's output, to the end."""
    device = device or FakeDevice()
    outputs, in_flight = [], None
    while sched.has_unfinished() or in_flight is not None:
        assert len(outputs) < max_steps, "scheduler made no progress"
        out = sched.schedule()
        check_launch(out)
        launched = (out, device.launch(out))
        if in_flight is not None:
            sched.update(*in_flight)
        in_flight = launched if out.chunks or out.preempted else None
        if in_flight is None:
            continue
        outputs.append(out)
        sched.check_invariants()
        sched.block_pool.check_invariants()
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
