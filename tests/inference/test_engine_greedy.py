"""Greedy engine output equals an independent reference that recomputes the whole sequence
without KV cache at every step (same weights, fp32)."""

from __future__ import annotations

import numpy as np
import pytest

from inference.request import SamplingParams


def _prompts(n: int, seed: int, low: int = 3, high: int = 40, vocab: int = 512) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, size=int(rng.integers(low, high))).tolist() for _ in range(n)]


def _check(engine, model, reference, prompts, max_new: int, ignore_eos: bool = False):
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=ignore_eos)
    results = engine.generate(prompts, params)
    eos = model.config.eos_token_id
    for prompt, result in zip(prompts, results):
        assert result.finish_reason in ("stop", "length"), result.error
        expected = reference.greedy(model, prompt, max_new, eos, ignore_eos)
        assert result.output_token_ids == expected, f"request {result.request_id}"
    engine.block_pool.check_invariants()
    return results


def test_single_request(make_engine, tiny_model, reference):
    _check(make_engine(), tiny_model, reference, [[5, 17, 33, 2, 99, 400, 12]], max_new=12)


def test_many_concurrent_requests_of_different_lengths(make_engine, tiny_model, reference):
    _check(make_engine(), tiny_model, reference, _prompts(10, seed=1), max_new=10)


def test_chunked_prefill_with_small_budget(make_engine, tiny_model, reference):
    engine = make_engine(max_step_tokens=7, max_requests=4)
    results = _check(engine, tiny_model, reference, _prompts(6, seed=2, low=15, high=30), max_new=6)
    chunked_steps = [e for e in engine.step_log.entries if e["prefill_requests"] and e["active_tokens"] == 7]
    assert chunked_steps and len(results) == 6


@pytest.mark.parametrize("prefix_len", [8, 10, 16])
def test_prefix_cache_hits(make_engine, tiny_model, reference, prefix_len):
    rng = np.random.default_rng(prefix_len)
    prefix = rng.integers(2, 512, size=prefix_len).tolist()
    prompts = [prefix + rng.integers(2, 512, size=int(rng.integers(1, 9))).tolist() for _ in range(5)]
    engine = make_engine(block_size=4)
    first = _check(engine, tiny_model, reference, prompts[:1], max_new=5)
    rest = _check(engine, tiny_model, reference, prompts[1:], max_new=5)
    assert first[0].num_cached_tokens == 0
    assert all(r.num_cached_tokens == (prefix_len // 4) * 4 for r in rest)


def test_full_prompt_prefix_hit(make_engine, tiny_model, reference):
    prompt = list(range(10, 26))  # exactly 4 full blocks of 4
    engine = make_engine(block_size=4)
    a = _check(engine, tiny_model, reference, [prompt], max_new=4)
    b = _check(engine, tiny_model, reference, [prompt], max_new=4)
    assert b[0].num_cached_tokens == 12  # last block recomputed: the last prompt token needs logits
    assert a[0].output_token_ids == b[0].output_token_ids


def test_forced_preemption_and_resume(make_engine, tiny_model, reference):
    engine = make_engine(block_size=4, num_kv_blocks=14, max_requests=6, max_step_tokens=32)
    results = _check(engine, tiny_model, reference, _prompts(6, seed=3, low=6, high=14), max_new=14, ignore_eos=True)
    assert sum(r.num_preemptions for r in results) > 0


def test_requests_arriving_mid_run(make_engine, tiny_model, reference):
    engine = make_engine()
    prompts = _prompts(6, seed=4)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    queue = [(str(i), p) for i, p in enumerate(prompts)]
    done, steps = {}, 0
    while queue or engine.has_unfinished():
        if queue and (steps % 3 == 0 or not engine.has_unfinished()):
            rid, prompt = queue.pop(0)
            engine.add_request(prompt, params, request_id=rid)
        for r in engine.step():
            done[r.request_id] = r
        steps += 1
    assert len(done) == 6 and steps > 8
    for i, p in enumerate(prompts):
        assert done[str(i)].output_token_ids == reference.greedy(tiny_model, p, 8, None, True)
