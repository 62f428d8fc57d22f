"""Asynchronous scheduling gives exactly what synchronous scheduling gives: the same tokens,
finish reasons and routing for every request, across EOS and stop tokens found a step late,
seeded sampling, prefix hits, chunked prefill, preemption, aborts and routing_start."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.presets import build_model, get_preset
from inference.request import RequestStatus, SamplingParams

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


@pytest.fixture(scope="module")
def chatty_model():
    """tiny-moe whose EOS is a token its greedy outputs often produce, so requests stop on
    EOS mid-run (the case asynchronous scheduling learns a step late)."""
    base = get_preset("tiny-moe")
    model = build_model(base, seed=0, dtype=torch.float32)
    engine = LLMEngine(model, EngineConfig(block_size=4, num_kv_blocks=512, max_requests=40, max_step_tokens=1024))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, 512, size=int(rng.integers(1, 30))).tolist() for _ in range(40)]
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    counts = np.bincount(np.concatenate([r.output_token_ids for r in outputs]), minlength=512)
    common = np.argsort(-counts)[:24].tolist()
    model.config = dataclasses.replace(base, eos_token_id=common[0])
    model.common_tokens = common[1:]          # stop tokens that greedy outputs often hit
    return model


def _workload(seed: int, common: list[int], vocab: int = 512):
    rng = np.random.default_rng(seed)
    shared = rng.integers(2, vocab, size=16).tolist()
    requests = []
    for i in range(24):
        prompt = shared[: int(rng.integers(0, 17))] + rng.integers(2, vocab, size=int(rng.integers(1, 14))).tolist()
        sampled = i % 3 == 1
        params = SamplingParams(max_new_tokens=int(rng.integers(1, 11)), ignore_eos=i % 5 == 0,
                                temperature=0.9 if sampled else 0.0, top_k=40 if i % 2 else 0,
                                top_p=0.9 if sampled else 1.0, seed=100 + i if sampled else None,
                                stop_token_ids=tuple(common) if i % 4 == 0 else ())
        routing_start = int(rng.integers(0, len(prompt) + 1)) if i % 6 == 0 else 0
        arrival_step = int(rng.integers(0, 20))
        requests.append((f"q{i}", prompt, params, routing_start, arrival_step))
    return requests


def _serve(model, async_scheduling: bool, requests, aborts: dict[int, str], **config):
    """Add requests at their arrival steps, abort some at given steps, step to the end.
    Returns the results by id and how many chunks of already-finished requests landed."""
    engine = LLMEngine(model, EngineConfig(record_routing=True, async_scheduling=async_scheduling, **config))
    update, discarded = engine.scheduler.update, []

    def counting_update(output, sampled):
        discarded.append(sum(c.request.is_finished for c in output.chunks))
        return update(output, sampled)

    engine.scheduler.update = counting_update
    results, step = {}, 0
    while step < 20 or engine.has_unfinished():
        for rid, prompt, params, start, arrival in requests:
            if arrival == step:
                engine.add_request(prompt, params, request_id=rid, routing_start=start)
        if step in aborts:
            engine.abort(aborts[step])
        for result in engine.step():
            assert result.request_id not in results
            results[result.request_id] = result
        engine.block_pool.check_invariants()
        engine.scheduler.check_invariants()
        step += 1
        assert step < 5000
    assert engine.block_pool.num_available == engine.config.num_kv_blocks
    assert engine.scheduler.num_retiring_blocks == 0
    return results, sum(discarded), engine


@pytest.mark.parametrize("config", [
    dict(block_size=4, num_kv_blocks=256, max_requests=16, max_step_tokens=64),
    dict(block_size=4, num_kv_blocks=40, max_requests=8, max_step_tokens=16),      # preemption
    dict(block_size=8, num_kv_blocks=24, max_requests=6, max_step_tokens=7),       # chunked + preemption
], ids=["roomy", "tight-kv", "tiny-budget"])
def test_async_and_sync_serve_identical_tokens_and_routing(chatty_model, config):
    requests = _workload(seed=sum(config.values()), common=chatty_model.common_tokens)
    aborts = {5: "q3", 9: "q10", 17: "q20"}
    sync, _, _ = _serve(chatty_model, False, requests, aborts, **config)
    async_, discarded, engine = _serve(chatty_model, True, requests, aborts, **config)
    served = sorted(set(sync) & set(async_))
    assert len(served) >= len(requests) - len(aborts)
    stops = 0
    for rid in served:
        a, b = sync[rid], async_[rid]
        assert (b.output_token_ids, b.finish_reason, b.routing_start) == (a.output_token_ids, a.finish_reason,
                                                                        a.routing_start), rid
        np.testing.assert_array_equal(b.routing, a.routing, err_msg=rid)
        rows = len(a.prompt_token_ids) + len(a.output_token_ids) - 1 - a.routing_start
        assert b.routing.shape == (rows, chatty_model.config.num_moe_layers, chatty_model.config.topk)
        stops += a.finish_reason == "stop"
    assert stops > 0, "the workload should stop some requests on EOS or a stop token"
    assert discarded > 0, "async scheduling should have discarded extra chunks of stopped requests"
    assert any(e["decode_requests"] for e in engine.step_log.entries)


def test_abort_with_a_step_in_flight_returns_nothing_and_leaks_nothing(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(block_size=4, num_kv_blocks=64, max_requests=4,
                                                max_step_tokens=32, record_routing=True, async_scheduling=True))
    for i in range(4):
        engine.add_request(list(range(10 + i, 30 + i)), SamplingParams(max_new_tokens=20, ignore_eos=True),
                           request_id=f"r{i}")
    results = engine.step() + engine.step() + engine.step()
    victim = engine._live["r2"]
    assert engine.scheduler.is_in_flight(victim) and victim.status is RequestStatus.RUNNING
    assert engine.abort("r2") and not engine.abort("r2")
    while engine.has_unfinished():
        results += engine.step()
    assert sorted(r.request_id for r in results) == ["r0", "r1", "r3"]
    assert engine.block_pool.num_available == 64 and engine.scheduler.num_retiring_blocks == 0
    assert engine.recorder.num_pending == 0 and engine.routing.num_awaiting == 0


def test_an_id_can_be_reused_at_once_after_abort_with_its_chunk_in_flight(tiny_model, reference):
    engine = LLMEngine(tiny_model, EngineConfig(block_size=4, num_kv_blocks=64, max_requests=4,
                                                max_step_tokens=32, record_routing=True, async_scheduling=True))
    engine.add_request([5, 6, 7, 8, 9], SamplingParams(max_new_tokens=8, ignore_eos=True), request_id="x")
    engine.step()
    engine.step()
    assert engine.abort("x")
    prompt = [40, 41, 42, 43, 44, 45]
    engine.add_request(prompt, SamplingParams(max_new_tokens=5, ignore_eos=True), request_id="x")
    results = []
    while engine.has_unfinished():
        results += engine.step()
    (result,) = results
    assert result.prompt_token_ids == prompt
    assert result.output_token_ids == reference.greedy(tiny_model, prompt, 5, None, True)
    expected = reference.routing(tiny_model, prompt, result.output_token_ids).numpy()
    np.testing.assert_array_equal(result.routing.astype(np.int64), expected)


def test_async_pipeline_feeds_pending_tokens_on_the_device(tiny_model):
    """Under async scheduling decode steps take their input token from the previous step's
    device tensor (the host has not seen it yet); under sync scheduling never."""
    seen = {}
    for mode in (False, True):
        engine = LLMEngine(tiny_model, EngineConfig(block_size=4, num_kv_blocks=64, max_requests=4,
                                                    max_step_tokens=32, async_scheduling=mode))
        launch, pending = engine.runner.launch, []

        def spying_launch(index, output, previous, timer, launch=launch, pending=pending):
            pending.append(sum(c.input_pending for c in output.chunks))
            return launch(index, output, previous, timer)

        engine.runner.launch = spying_launch
        engine.generate([[3, 4, 5], [6, 7, 8, 9]], SamplingParams(max_new_tokens=6, ignore_eos=True))
        seen[mode] = pending
    assert sum(seen[False]) == 0
    assert sum(seen[True]) == 2 * 5     # every token after the first of each request
