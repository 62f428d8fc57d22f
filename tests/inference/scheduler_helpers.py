"""Shared harness for the scheduler tests: a fake sampler and a stepping loop.

The fake sampler picks each token as a fixed function of the sequence so far, so the tokens a
request ends with do not depend on how it was scheduled; every scenario can be checked
against plain one-token-at-a-time generation.
"""

from __future__ import annotations

from inference.block_pool import BlockPool
from inference.request import Request, SamplingParams
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
