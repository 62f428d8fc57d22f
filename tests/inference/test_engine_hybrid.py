"""The engine serving hybrid models (tiny Gated DeltaNet and Mamba2 presets, CPU fp32): greedy
tokens and routing equal the full-sequence reference forward; a prefix-cached run (state
checkpoints restored at block boundaries) gives bit-identical tokens and routing to a cold
run while really reusing tokens; preemption, checkpoint / block evictions, aborts and a
randomized workload agree with the cold, unpreempted run; the state pool and checkpoint
store keep their invariants after every step and hold nothing once every request is done.
Sync and async scheduling both."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.presets import build_model, get_preset
from inference.request import SamplingParams

PRESETS = ("tiny-hybrid-gdn", "tiny-hybrid-mamba")


@pytest.fixture(scope="module", params=PRESETS)
def hybrid(request):
    return build_model(get_preset(request.param), seed=3, dtype=torch.float32)


def checked_engine(model, **overrides) -> LLMEngine:
    """An engine whose every step is followed by the invariant checks of its caches: slots
    are held exactly by the running and retiring requests, every pending checkpoint belongs
    to a chunk in flight."""
    kwargs = dict(block_size=4, num_kv_blocks=64, max_requests=4, max_step_tokens=8, record_routing=True,
                  checkpoint_interval_blocks=2)
    kwargs.update(overrides)
    engine = LLMEngine(model, EngineConfig(**kwargs))
    step = engine.step

    def step_and_check():
        results = step()
        engine.sequence_cache.check_invariants()
        engine.scheduler.check_invariants()
        sched, pool = engine.scheduler, engine.sequence_cache.pool
        assert pool.num_used == sched.num_running + sched.num_retiring_requests
        return results

    engine.step = step_and_check
    return engine


def assert_idle(engine: LLMEngine) -> None:
    assert not engine.has_unfinished()
    engine.sequence_cache.check_idle()
    assert engine.block_pool.num_in_use == 0


def shared_prefix_prompts(vocab: int, seed: int) -> list[list[int]]:
    """Prompts sharing a 13-token prefix (three full blocks of 4 and one token) in several
    lengths, plus a group of identical prompts (RL samples of one prompt)."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(3, vocab, size=13).tolist()
    tails = [rng.integers(3, vocab, size=int(n)).tolist() for n in (6, 2, 9, 0, 4)]
    group = prefix + tails[0]
    return [group, prefix + tails[1], group, prefix + tails[2], prefix + tails[3], group, prefix + tails[4]]


def serve(engine: LLMEngine, prompts, params, waves: int = 2):
    """First wave alone (it fills the prefix cache), then the rest together."""
    first = engine.generate(prompts[:waves - 1], params) if waves > 1 else []
    return first + engine.generate(prompts[waves - 1:], params)


def assert_same(results, expected) -> None:
    for got, want in zip(results, expected, strict=True):
        assert got.output_token_ids == want.output_token_ids, got.request_id
        assert got.routing.dtype == want.routing.dtype and np.array_equal(got.routing, want.routing), got.request_id


PARAMS = SamplingParams(max_new_tokens=5, ignore_eos=True)


def test_engine_matches_the_reference_forward(hybrid, scheduling):
    prompts = shared_prefix_prompts(hybrid.config.vocab_size, seed=1)
    engine = checked_engine(hybrid, async_scheduling=scheduling)
    results = serve(engine, prompts, PARAMS)
    for r in results:
        seq = r.prompt_token_ids + r.output_token_ids
        logits, routing = hybrid.forward_reference(torch.tensor(seq))
        assert logits[len(r.prompt_token_ids) - 1:-1].argmax(-1).tolist() == r.output_token_ids
        assert r.routing.shape == (len(seq) - 1, hybrid.config.num_moe_layers, hybrid.config.topk)
        assert np.array_equal(r.routing.astype(np.int64), routing[:-1].numpy())
    assert sum(r.num_cached_tokens for r in results) > 0
    assert_idle(engine)


def test_prefix_cached_run_is_bit_identical_to_a_cold_run_and_reuses_tokens(hybrid, scheduling):
    prompts = shared_prefix_prompts(hybrid.config.vocab_size, seed=2)
    cold = serve(checked_engine(hybrid, enable_prefix_caching=False, async_scheduling=scheduling), prompts, PARAMS)
    engine = checked_engine(hybrid, async_scheduling=scheduling)
    warm = serve(engine, prompts, PARAMS)
    assert_same(warm, cold)
    stats = engine.sequence_cache.stats
    cached = [r.num_cached_tokens for r in warm]
    assert cached[0] == 0 and sum(cached) >= 3 * 12, cached     # the group's samples hit 12 tokens each
    assert stats["restores"] > 0 and stats["restored_tokens"] == sum(cached)
    assert stats["commits"] > 0 and all(c % 4 == 0 for c in cached)
    # chunks end at checkpoint boundaries: a 19-token prompt alone is cut at 8 and 16 (interval 2 blocks)
    assert sum(e["prefill_requests"] for e in engine.step_log.entries) > len(prompts)
    assert_idle(engine)


def test_hits_are_cut_back_to_a_checkpointed_boundary(hybrid):
    """A prompt that shares 3 full blocks with a cached one, but whose producer only
    checkpointed at 8 tokens (interval 2 blocks) and at its own last full block (16), hits 8."""
    rng = np.random.default_rng(4)
    prefix = rng.integers(3, hybrid.config.vocab_size, size=12).tolist()
    producer = prefix + rng.integers(3, hybrid.config.vocab_size, size=6).tolist()     # 18 tokens: 8, 16
    consumer = prefix + rng.integers(3, hybrid.config.vocab_size, size=3).tolist()     # matches 3 blocks
    engine = checked_engine(hybrid)
    engine.generate([producer], PARAMS)
    assert engine.block_pool.match_prefix(consumer, 3) and len(engine.block_pool.match_prefix(consumer, 3)) == 3
    result = engine.generate([consumer], PARAMS)[0]
    assert result.num_cached_tokens == 8
    cold = checked_engine(hybrid, enable_prefix_caching=False).generate([consumer], PARAMS)[0]
    assert_same([result], [cold])


def test_preemption_matches_the_unpreempted_cold_run(hybrid, scheduling):
    prompts = shared_prefix_prompts(hybrid.config.vocab_size, seed=5)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    cold = serve(checked_engine(hybrid, enable_prefix_caching=False, num_kv_blocks=128, max_step_tokens=64),
                 prompts, params)
    assert sum(r.num_preemptions for r in cold) == 0
    engine = checked_engine(hybrid, num_kv_blocks=14, async_scheduling=scheduling)
    tight = serve(engine, prompts, params)
    assert sum(r.num_preemptions for r in tight) > 0, "14 blocks for 4 requests of up to 7 blocks must preempt"
    assert_same(tight, cold)
    assert sum(r.num_cached_tokens for r in tight) > 0
    assert_idle(engine)


def test_checkpoint_lru_evictions_keep_results_exact(hybrid, scheduling):
    """One checkpoint entry: every new snapshot evicts the last one, whose boundary is then
    no longer offered as a hit (hits only where a checkpoint survives)."""
    prompts = shared_prefix_prompts(hybrid.config.vocab_size, seed=6)
    cold = serve(checked_engine(hybrid, enable_prefix_caching=False), prompts, PARAMS, waves=4)
    engine = checked_engine(hybrid, state_checkpoints=1, async_scheduling=scheduling)
    warm = serve(engine, prompts, PARAMS, waves=4)
    assert_same(warm, cold)
    stats = engine.sequence_cache.stats
    assert stats["store_evictions"] > 0 and stats["restores"] > 0, stats
    assert engine.sequence_cache.store.num_committed == 1
    assert_idle(engine)


def test_evicted_kv_blocks_drop_their_checkpoints(hybrid, scheduling):
    rng = np.random.default_rng(10)
    vocab = hybrid.config.vocab_size
    first = rng.integers(3, vocab, size=14).tolist()
    others = [rng.integers(3, vocab, size=14).tolist() for _ in range(3)]
    engine = checked_engine(hybrid, num_kv_blocks=10, state_checkpoints=16, async_scheduling=scheduling)
    before = engine.generate([first], PARAMS)[0]
    pool, store = engine.block_pool, engine.sequence_cache.store
    hashes = [pool.compute_hash(None, first[:4])]
    for i in (1, 2):
        hashes.append(pool.compute_hash(hashes[-1], first[4 * i:4 * i + 4]))
    assert store.num_committed == 2 and hashes[1] in store and hashes[2] in store   # at 8 (interval), 12 (last)
    assert engine.generate([first], PARAMS)[0].num_cached_tokens == 12
    engine.generate(others, PARAMS)                      # 3 x 5 blocks through a 10-block pool
    assert pool.match_prefix(first, 3) == [] and engine.sequence_cache.stats["dropped"] >= 1
    assert not any(pool.is_advertised(h) or h in store for h in hashes[1:])
    after = engine.generate([first], PARAMS)[0]
    assert after.num_cached_tokens == 0 and after.output_token_ids == before.output_token_ids
    assert np.array_equal(after.routing, before.routing)
    assert_idle(engine)


def test_no_checkpoints_means_no_reuse(hybrid):
    prompts = shared_prefix_prompts(hybrid.config.vocab_size, seed=7)
    engine = checked_engine(hybrid, state_checkpoints=0)
    results = serve(engine, prompts, PARAMS)
    assert all(r.num_cached_tokens == 0 for r in results) and engine.sequence_cache.stats["snapshots"] == 0
    assert_same(results, serve(checked_engine(hybrid, enable_prefix_caching=False), prompts, PARAMS))


def test_padded_decode_path_matches_eager(hybrid, scheduling):
    """Decode steps through the static padded path (what decode CUDA graphs capture):
    padding rows name the pool's dummy slot."""
    prompts = shared_prefix_prompts(hybrid.config.vocab_size, seed=8)[:5]
    eager = serve(checked_engine(hybrid, max_step_tokens=32), prompts, PARAMS)
    engine = checked_engine(hybrid, max_step_tokens=32, padded_decode=True, async_scheduling=scheduling)
    padded = serve(engine, prompts, PARAMS)
    assert any(e["padded_tokens"] > e["active_tokens"] for e in engine.step_log.entries), "3 requests pad to 4"
    assert_same(padded, eager)
    assert_idle(engine)


def _random_workload(vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    shared = rng.integers(3, vocab, size=14).tolist()
    requests = []
    for i in range(14):
        prompt = shared[: int(rng.integers(0, 15))] + rng.integers(3, vocab, size=int(rng.integers(1, 9))).tolist()
        params = SamplingParams(max_new_tokens=int(rng.integers(1, 7)), ignore_eos=True,
                                temperature=0.8 if i % 3 == 1 else 0.0, seed=50 + i)
        requests.append((f"r{i}", prompt, params, int(rng.integers(0, 12))))
    return requests


def _serve_stepwise(engine: LLMEngine, requests, abort_steps: tuple[int, ...] = ()):
    """Arrivals at their steps; at each of ``abort_steps`` the oldest request still being
    served is aborted (mid-run, often with a chunk in flight). Returns (results, aborted ids)."""
    results, step, added, aborted = {}, 0, [], []
    while step < 12 or engine.has_unfinished():
        for rid, prompt, params, arrival in requests:
            if arrival == step:
                engine.add_request(prompt, params, request_id=rid)
                added.append(rid)
        if step in abort_steps:
            victim = next((rid for rid in added if rid not in results and rid not in aborted), None)
            if victim is not None and engine.abort(victim):
                aborted.append(victim)
        for result in engine.step():
            results[result.request_id] = result
        step += 1
        assert step < 2000
    return results, aborted


@pytest.mark.parametrize("seed", [11, 12])
def test_randomized_workload_with_aborts_matches_the_cold_run(hybrid, scheduling, seed):
    requests = _random_workload(hybrid.config.vocab_size, seed)
    engine = checked_engine(hybrid, num_kv_blocks=9, max_requests=3, max_step_tokens=7,
                            state_checkpoints=3, async_scheduling=scheduling)
    got, aborted = _serve_stepwise(engine, requests, abort_steps=(5, 9))
    cold, _ = _serve_stepwise(checked_engine(hybrid, enable_prefix_caching=False, num_kv_blocks=200, max_requests=16,
                                             max_step_tokens=64), requests)
    assert len(aborted) == 2 and set(got) | set(aborted) == set(cold) and not set(got) & set(aborted)
    assert_same([got[rid] for rid in sorted(got)], [cold[rid] for rid in sorted(got)])
    assert sum(r.num_preemptions for r in got.values()) > 0
    assert sum(r.num_cached_tokens for r in got.values()) > 0
    assert_idle(engine)


def test_weight_update_and_sleep_forget_checkpoints(hybrid):
    prompts = shared_prefix_prompts(hybrid.config.vocab_size, seed=9)[:3]
    engine = checked_engine(hybrid)
    first = serve(engine, prompts, PARAMS)
    assert engine.sequence_cache.store.num_committed > 0
    engine.update_weights([])
    assert engine.sequence_cache.store.num_committed == 0
    again = engine.generate(prompts[:1], PARAMS)
    assert again[0].num_cached_tokens == 0 and again[0].output_token_ids == first[0].output_token_ids
    engine.sleep()
    assert engine.sequence_cache.pool is None
    engine.wake_up()
    woke = serve(engine, prompts, PARAMS)
    assert woke[0].num_cached_tokens == 0 and sum(r.num_cached_tokens for r in woke) > 0
    assert_same(woke, first)
    assert_idle(engine)


def test_bad_checkpoint_settings_are_refused():
    with pytest.raises(ValueError, match="--state-checkpoints must be an int >= 0"):
        EngineConfig(state_checkpoints=-1)
    with pytest.raises(ValueError, match="--checkpoint-interval-blocks must be an int >= 0"):
        EngineConfig(checkpoint_interval_blocks=1.5)
