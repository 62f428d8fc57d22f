"""Hybrid checkpoints (Qwen3-Next, Qwen3.5-MoE, Nemotron-H), tiny and random, saved by
transformers' save_pretrained and served by our engine: greedy tokens and recorded routing
equal transformers' full-sequence forward of the same files, through chunked prefill,
prefix-cache hits (state checkpoints restored) and preemption; a prefix-cached run is
bit-identical to a cold one (CPU fp32) and really reuses tokens."""

from __future__ import annotations

import numpy as np
import pytest

from tests.inference.hf.families import assert_routing_matches
from tests.inference.hf.hybrid_families import VOCAB, hf_hybrid_routing, make_hybrid_model

pytest.importorskip("safetensors")

from inference.config import EngineConfig  # noqa: E402
from inference.engine import LLMEngine  # noqa: E402
from inference.hf_loader import load_hf_model  # noqa: E402
from inference.request import SamplingParams  # noqa: E402


@pytest.fixture(scope="module", params=["qwen3_next", "qwen3_5_moe", "nemotron_h"])
def checkpoint(request, tmp_path_factory):
    hf = make_hybrid_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, load_hf_model(path)


def _prompts(seed: int) -> list[list[int]]:
    """A shared 9-token prefix (two 4-token blocks and one) and tails; two identical prompts."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(3, VOCAB, size=9).tolist()
    tails = [rng.integers(3, VOCAB, size=int(n)).tolist() for n in (5, 3, 7, 0)]
    return [prefix + tails[0], prefix + tails[1], prefix + tails[0], prefix + tails[2], prefix + tails[3]]


def _engine(model, scheduling: bool, **overrides) -> LLMEngine:
    kwargs = dict(record_routing=True, block_size=4, num_kv_blocks=8, max_requests=3, max_step_tokens=6,
                  checkpoint_interval_blocks=1, async_scheduling=scheduling)
    kwargs.update(overrides)
    return LLMEngine(model, EngineConfig(**kwargs))


def _serve(engine: LLMEngine, prompts) -> list:
    params = SamplingParams(max_new_tokens=7, ignore_eos=True)
    results = engine.generate(prompts[:1], params) + engine.generate(prompts[1:], params)
    engine.sequence_cache.check_idle()
    return results


def test_engine_matches_transformers_with_chunks_checkpoint_hits_and_preemption(checkpoint, scheduling):
    name, hf, model = checkpoint
    engine = _engine(model, scheduling)
    results = _serve(engine, _prompts(seed=len(name)))
    assert sum(e["prefill_requests"] for e in engine.step_log.entries) > len(results), "chunked prefill"
    assert sum(r.num_cached_tokens for r in results[1:]) > 0 and engine.sequence_cache.stats["restores"] > 0
    assert sum(r.num_preemptions for r in results) > 0, "8 blocks for 3 requests of up to 6 blocks must preempt"
    for r in results:
        assert r.finish_reason == "length", r.error
        seq = r.prompt_token_ids + r.output_token_ids
        logits, ids, scores = hf_hybrid_routing(hf, seq)
        assert logits[len(r.prompt_token_ids) - 1:-1].argmax(-1).tolist() == r.output_token_ids
        assert r.routing.shape == (len(seq) - 1, model.config.num_moe_layers, model.config.topk)
        assert len(ids) == model.config.num_moe_layers
        assert assert_routing_matches(r.routing, ids, scores) == 0


def test_prefix_cached_run_is_bit_identical_to_a_cold_run(checkpoint, scheduling):
    name, _, model = checkpoint
    prompts = _prompts(seed=10 + len(name))
    warm_engine = _engine(model, scheduling, num_kv_blocks=64)
    warm = _serve(warm_engine, prompts)
    cold = _serve(_engine(model, scheduling, num_kv_blocks=64, enable_prefix_caching=False), prompts)
    assert sum(r.num_cached_tokens for r in warm) > 0 and warm_engine.sequence_cache.stats["restores"] > 0
    for w, c in zip(warm, cold, strict=True):
        assert w.output_token_ids == c.output_token_ids
        assert np.array_equal(w.routing, c.routing)


def test_padded_decode_path_matches_transformers(checkpoint):
    """Decode steps through the static padded path that decode CUDA graphs capture."""
    name, hf, model = checkpoint
    engine = _engine(model, False, num_kv_blocks=64, max_requests=4, max_step_tokens=32, padded_decode=True)
    results = _serve(engine, _prompts(seed=20 + len(name))[1:])
    assert sum(e["decode_requests"] > 0 and e["prefill_requests"] == 0 for e in engine.step_log.entries) > 3
    for r in results:
        seq = r.prompt_token_ids + r.output_token_ids
        logits, ids, scores = hf_hybrid_routing(hf, seq)
        assert logits[len(r.prompt_token_ids) - 1:-1].argmax(-1).tolist() == r.output_token_ids
        assert assert_routing_matches(r.routing, ids, scores) == 0
