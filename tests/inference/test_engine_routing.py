"""Recorded routing equals the routing of an independent full-sequence forward (no KV
cache, fp32) for every request, across the engine's batching situations."""

from __future__ import annotations

import numpy as np
import pytest

from inference.request import SamplingParams


def _prompts(n: int, seed: int, low: int = 3, high: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 512, size=int(rng.integers(low, high))).tolist() for _ in range(n)]


def _assert_routing_matches(model, reference, results):
    for r in results:
        assert r.finish_reason in ("stop", "length"), r.error
        expected = reference.routing(model, r.prompt_token_ids, r.output_token_ids).numpy()
        assert r.routing is not None, f"request {r.request_id} has no routing"
        assert r.routing.shape == (len(r.prompt_token_ids) + len(r.output_token_ids) - 1,
                                   model.config.num_moe_layers, model.config.topk)
        assert r.routing.dtype == np.uint8
        mismatch = np.argwhere(r.routing.astype(np.int64) != expected)
        assert mismatch.size == 0, f"request {r.request_id}: first mismatch at (token, layer, k) {mismatch[0]}"


def _run(engine, prompts, max_new=8, ignore_eos=False):
    return engine.generate(prompts, SamplingParams(max_new_tokens=max_new, ignore_eos=ignore_eos))


def test_mixed_prefill_and_decode_batches(make_engine, tiny_model, reference):
    engine = make_engine(record_routing=True, max_step_tokens=24, max_requests=8)
    results = _run(engine, _prompts(10, seed=10), max_new=10)
    kinds = {(e["prefill_requests"] > 0, e["decode_requests"] > 0) for e in engine.step_log.entries}
    assert (True, True) in kinds, "workload should contain mixed steps"
    _assert_routing_matches(tiny_model, reference, results)


def test_chunked_prefill(make_engine, tiny_model, reference):
    engine = make_engine(record_routing=True, max_step_tokens=5, max_requests=3)
    _assert_routing_matches(tiny_model, reference, _run(engine, _prompts(4, seed=11, low=12, high=25)))


@pytest.mark.parametrize("prefix_len", [4, 6, 8, 13])
def test_prefix_cache_hits_take_producer_rows(make_engine, tiny_model, reference, prefix_len):
    rng = np.random.default_rng(100 + prefix_len)
    prefix = rng.integers(2, 512, size=prefix_len).tolist()
    prompts = [prefix + rng.integers(2, 512, size=int(rng.integers(1, 7))).tolist() for _ in range(4)]
    engine = make_engine(record_routing=True, block_size=4)
    results = _run(engine, prompts[:1]) + _run(engine, prompts[1:])
    assert any(r.num_cached_tokens > 0 for r in results[1:])
    _assert_routing_matches(tiny_model, reference, results)


def test_preemption_and_resume(make_engine, tiny_model, reference):
    engine = make_engine(record_routing=True, block_size=4, num_kv_blocks=14, max_requests=6, max_step_tokens=32)
    results = _run(engine, _prompts(6, seed=12, low=6, high=14), max_new=14, ignore_eos=True)
    assert sum(r.num_preemptions for r in results) > 0
    assert sum(e["preempted_requests"] for e in engine.step_log.entries) > 0
    _assert_routing_matches(tiny_model, reference, results)


def test_blocks_reallocated_in_the_next_step(make_engine, tiny_model, reference):
    # Few blocks and no prefix caching: a finished request's blocks go straight to the next one.
    engine = make_engine(record_routing=True, block_size=4, num_kv_blocks=8, max_requests=1,
                         max_step_tokens=16, enable_prefix_caching=False)
    results = _run(engine, _prompts(5, seed=13, low=5, high=12), max_new=6, ignore_eos=True)
    _assert_routing_matches(tiny_model, reference, results)


def test_sigmoid_group_limited_router(make_engine, sigmoid_model, reference):
    engine = make_engine(model=sigmoid_model, record_routing=True)
    results = _run(engine, _prompts(5, seed=14), max_new=6)
    _assert_routing_matches(sigmoid_model, reference, results)


def test_recording_does_not_change_tokens(make_engine):
    prompts = _prompts(8, seed=15)
    params = SamplingParams(max_new_tokens=10, temperature=0.8, top_k=50, top_p=0.9, seed=7)
    on = make_engine(record_routing=True).generate(prompts, params)
    off = make_engine(record_routing=False).generate(prompts, params)
    assert [r.output_token_ids for r in on] == [r.output_token_ids for r in off]
    assert all(r.routing is None for r in off)


@pytest.mark.parametrize("seed", [0, 1])
def test_randomized_workload(make_engine, tiny_model, reference, seed):
    rng = np.random.default_rng(1000 + seed)
    shared = rng.integers(2, 512, size=12).tolist()
    prompts = []
    for i in range(120):
        body = rng.integers(2, 512, size=int(rng.integers(1, 20))).tolist()
        prompts.append((shared[: int(rng.integers(0, 13))] if i % 2 else []) + body)
    engine = make_engine(record_routing=True, block_size=4, num_kv_blocks=int(rng.integers(40, 80)),
                         max_requests=int(rng.integers(4, 12)), max_step_tokens=int(rng.integers(12, 40)))
    params = [SamplingParams(max_new_tokens=int(rng.integers(1, 10)), ignore_eos=bool(i % 3)) for i in range(len(prompts))]
    results = engine.generate(prompts, params)
    engine.block_pool.check_invariants()
    assert engine.block_pool.num_available == engine.config.num_kv_blocks
    _assert_routing_matches(tiny_model, reference, results)


def test_padded_decode_path(make_engine, tiny_model, reference):
    """The static padded decode path that CUDA graphs capture, run eagerly on CPU: padding
    rows write KV and routing into the dummy block only, and outputs stay exact."""
    engine = make_engine(record_routing=True, padded_decode=True, max_requests=8)
    prompts = _prompts(7, seed=16)
    results = engine.generate(prompts, [SamplingParams(max_new_tokens=3 + i, ignore_eos=True) for i in range(7)])
    padded_steps = [e for e in engine.step_log.entries if e["padded_tokens"] > e["active_tokens"]]
    assert padded_steps, "some decode steps should have been padded"
    _assert_routing_matches(tiny_model, reference, results)
    for i, r in enumerate(results):
        assert r.output_token_ids == reference.greedy(tiny_model, r.prompt_token_ids, 3 + i, None, True)


def test_padded_prefill_path(make_engine, tiny_model, reference):
    """The padded path of steps with prefill chunks that piecewise graphs capture, run
    eagerly on CPU: token rows padded up the ladder (request rows not), padding rows write
    KV and routing into the dummy block only, and tokens, routing and prompt log-probs stay
    exact through prefix-cache hits, chunked prefill and preemption."""
    kw = dict(record_routing=True, max_requests=8, max_step_tokens=40, num_kv_blocks=14, block_size=4)
    shared = _prompts(1, seed=30, low=13, high=14)[0]
    prompts = [shared + p for p in _prompts(9, seed=31, low=1, high=30)]
    params = [SamplingParams(max_new_tokens=4 + i % 5, ignore_eos=True, prompt_logprobs=i % 3 == 0)
              for i in range(9)]
    plain = make_engine(**kw).generate(prompts, params)
    engine = make_engine(padded_prefill=True, **kw)
    results = engine.generate(prompts, params)
    entries = engine.step_log.entries
    padded = [e for e in entries if e["prefill_requests"] and e["padded_tokens"] > e["active_tokens"]]
    assert padded, "some prefill / mixed steps should have been padded"
    assert any(e["decode_requests"] for e in padded), "a padded step should mix prefill chunks and decodes"
    assert not any(e["piecewise_graph"] for e in entries), "no graphs on CPU"
    assert sum(r.num_cached_tokens for r in results) > 0, "the shared prefix should hit the cache"
    assert sum(r.num_preemptions for r in results) > 0, "the small KV cache should preempt"
    _assert_routing_matches(tiny_model, reference, results)
    for mine, theirs in zip(results, plain):
        assert mine.output_token_ids == theirs.output_token_ids
        assert mine.output_logprobs == pytest.approx(theirs.output_logprobs, abs=1e-5)
        if theirs.prompt_logprobs is not None:
            assert mine.prompt_logprobs == pytest.approx(theirs.prompt_logprobs, abs=1e-5, nan_ok=True)
    engine.block_pool.check_invariants()


def test_host_sync_baseline_recorder(make_engine, tiny_model, reference):
    """The Megatron-style baseline the benchmark compares against records the same routing
    (as int32) when nothing is preempted."""
    engine = make_engine(record_routing=True, routing_recorder="host-sync")
    results = _run(engine, _prompts(6, seed=17), max_new=6)
    for r in results:
        expected = reference.routing(tiny_model, r.prompt_token_ids, r.output_token_ids).numpy()
        assert r.routing.dtype == np.int32
        np.testing.assert_array_equal(r.routing, expected)


def test_suffix_output_for_multi_turn_callers(make_engine, tiny_model, reference):
    prompts = _prompts(4, seed=18, low=10, high=20)
    starts = [0, 3, 9, len(prompts[3])]
    engine = make_engine(record_routing=True)
    results = engine.generate(prompts, SamplingParams(max_new_tokens=5), routing_starts=starts)
    for r, start in zip(results, starts):
        full = reference.routing(tiny_model, r.prompt_token_ids, r.output_token_ids).numpy()
        assert r.routing_start == start
        np.testing.assert_array_equal(r.routing.astype(np.int64), full[start:])
    with pytest.raises(Exception, match="routing_start"):
        engine.add_request([5, 6, 7], routing_start=4)


def _rl_groups(seed: int, num_prompts: int, group: int) -> list[list[int]]:
    """``group`` copies of each of ``num_prompts`` prompts, grouped (how RL samples a prompt)."""
    return [p for p in _prompts(num_prompts, seed=seed, low=9, high=23) for _ in range(group)]


def test_copies_of_a_prompt_admitted_in_one_step_compute_it_once(make_engine, tiny_model, reference):
    """An RL group: every copy after the first hits the blocks the first one's chunk computes
    in the same step, so the step computes each prompt once plus each copy's last partial
    block; tokens and routing still equal the full-sequence reference."""
    prompts = _rl_groups(seed=20, num_prompts=2, group=4)
    engine = make_engine(record_routing=True, block_size=4, max_step_tokens=256, max_requests=8)
    results = _run(engine, prompts, max_new=6)
    for prompt, r in zip(prompts, results):
        assert r.output_token_ids == reference.greedy(tiny_model, prompt, 6, tiny_model.config.eos_token_id)
    _assert_routing_matches(tiny_model, reference, results)
    first = engine.step_log.entries[0]
    assert first["prefill_requests"] == len(prompts), "every copy is admitted in the first step"
    expected = sum(len(p) if i % 4 == 0 else len(p) - (len(p) - 1) // 4 * 4 for i, p in enumerate(prompts))
    assert first["prefill_tokens"] == expected
    assert [r.num_cached_tokens for r in results[1:4]] == [(len(prompts[0]) - 1) // 4 * 4] * 3


def test_sampled_groups_with_same_step_hits_equal_a_run_without_prefix_caching(make_engine, tiny_model):
    """Seeded sampling, log-probs and routing of groups served with same-step hits equal those
    of an engine that computes every copy in full (prefix caching off)."""
    prompts = _rl_groups(seed=21, num_prompts=3, group=3)
    params = [SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=1.0, top_p=0.9, seed=i)
              for i in range(len(prompts))]
    shared = make_engine(record_routing=True, block_size=4, max_step_tokens=256, max_requests=9)
    cold = make_engine(record_routing=True, block_size=4, max_step_tokens=256, max_requests=9,
                       enable_prefix_caching=False)
    warm, full = shared.generate(prompts, params), cold.generate(prompts, params)
    assert sum(r.num_cached_tokens for r in warm) > 0
    assert sum(e["prefill_tokens"] for e in shared.step_log.entries) < sum(len(p) for p in prompts)
    for a, b in zip(warm, full):
        assert a.output_token_ids == b.output_token_ids
        assert np.allclose(a.output_logprobs, b.output_logprobs, atol=1e-5)
        assert np.array_equal(a.routing, b.routing)


def test_a_group_outlives_its_producer_aborted_with_the_shared_chunk_in_flight(make_engine, tiny_model, reference):
    """The copy that computes a group's prompt is aborted right after the step that
    computes it was launched (async: still in flight) and again after a chunked step: the
    other copies, which hit its blocks in that step, and a copy admitted later (hitting the
    blocks the aborted copy left cached) still get the reference tokens and routing."""
    prompt = _prompts(1, seed=22, low=14, high=15)[0]
    for budget in (64, 6):
        engine = make_engine(record_routing=True, block_size=4, max_step_tokens=budget, max_requests=4)
        ids = [engine.add_request(prompt, SamplingParams(max_new_tokens=5)) for _ in range(3)]
        done = {r.request_id: r for r in engine.step()}
        assert engine.abort(ids[0])
        late = None
        while engine.has_unfinished() or late is None:
            done.update((r.request_id, r) for r in engine.step())
            if late is None and len(done) + 1 == len(ids):
                late = engine.add_request(prompt, SamplingParams(max_new_tokens=5))
        results = [done[i] for i in ids[1:] + [late]]
        assert ids[0] not in done and all(r.num_cached_tokens > 0 for r in results)
        expected = reference.greedy(tiny_model, prompt, 5, tiny_model.config.eos_token_id)
        assert all(r.output_token_ids == expected for r in results)
        _assert_routing_matches(tiny_model, reference, results)
        assert engine.block_pool.num_available == engine.config.num_kv_blocks
