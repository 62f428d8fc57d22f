"""Log-probs of sampled tokens, their top-N alternatives and prompt log-probs equal an
independent full-sequence fp32 recompute (no KV cache; filtering re-implemented in numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.request import SamplingParams

TOL = 1e-4


def _prompts(n: int, seed: int, low: int = 3, high: int = 30) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 512, size=int(rng.integers(low, high))).tolist() for _ in range(n)]


def _reference_logits(model, prompt: list[int], output: list[int]) -> np.ndarray:
    """fp32 logits [len(prompt) + len(output) - 1, V] of a full-sequence forward."""
    logits, _ = model.forward_reference(torch.tensor(prompt + output[:-1]))
    return logits.double().numpy()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    finite = np.isfinite(x)
    m = x[finite].max()
    out = np.full_like(x, -np.inf)
    out[finite] = x[finite] - m - np.log(np.exp(x[finite] - m).sum())
    return out


def _processed(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution a token is sampled from: logits / T, top-k, top-p (numpy)."""
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.size:
        kth = np.sort(scaled)[-params.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    if params.top_p < 1.0:
        probs = np.exp(_log_softmax(scaled))
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        drop = np.zeros(scaled.size, dtype=bool)
        drop[order[before > params.top_p]] = True
        scaled = np.where(drop, -np.inf, scaled)
    return _log_softmax(scaled)


def _expected(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    if params.is_greedy or params.logprobs_mode == "raw":
        return _log_softmax(logits)
    if params.logprobs_mode == "tempered":
        return _log_softmax(logits / params.temperature)
    return _processed(logits, params)


def _check_outputs(model, results, params_list):
    checked = 0
    for r, params in zip(results, params_list):
        assert r.finish_reason in ("stop", "length"), r.error
        assert len(r.output_logprobs) == len(r.output_token_ids)
        ref = _reference_logits(model, r.prompt_token_ids, r.output_token_ids)
        first = len(r.prompt_token_ids) - 1
        for j, (token, value) in enumerate(zip(r.output_token_ids, r.output_logprobs)):
            dist = _expected(ref[first + j], params)
            assert abs(value - dist[token]) < TOL, (r.request_id, j, value, dist[token])
            if params.logprobs:
                top = r.output_top_logprobs[j]
                # the N most likely tokens, fewer when the distribution has fewer (top-k < N, top-p)
                assert len(top) == min(params.logprobs, int(np.isfinite(dist).sum()))
                ids = [t for t, _ in top]
                assert np.allclose([v for _, v in top], dist[ids], atol=TOL)
                assert np.allclose(sorted(dist, reverse=True)[: len(top)], [v for _, v in top], atol=TOL)
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("mode", ["processed", "tempered", "raw"])
def test_output_logprobs_match_a_full_sequence_recompute(make_engine, tiny_model, mode):
    prompts = _prompts(8, seed=1)
    params = [SamplingParams(max_new_tokens=6, temperature=0.0 if i % 4 == 0 else 0.8, top_k=0 if i % 2 else 20,
                             top_p=0.85 if i % 3 else 1.0, seed=i, logprobs=3 if i % 2 else 0, logprobs_mode=mode)
              for i in range(8)]
    engine = make_engine(record_routing=True, max_step_tokens=24, max_requests=5)
    _check_outputs(tiny_model, engine.generate(prompts, params), params)


def test_prompt_logprobs_through_chunked_prefill_preemption_and_a_cached_prefix(make_engine, tiny_model):
    shared = _prompts(1, seed=2, low=12, high=13)[0]
    prompts = [shared + p for p in _prompts(6, seed=3, low=2, high=12)]
    engine = make_engine(block_size=4, num_kv_blocks=18, max_requests=4, max_step_tokens=9)
    plain = SamplingParams(max_new_tokens=8, ignore_eos=True)
    engine.generate(prompts[:1], plain)     # caches the shared prefix
    params = [SamplingParams(max_new_tokens=8, ignore_eos=True, prompt_logprobs=i % 2 == 0,
                             temperature=0.0 if i < 3 else 0.7, seed=i) for i in range(6)]
    results = engine.generate(prompts, params)
    assert sum(r.num_preemptions for r in results) > 0
    for r, p in zip(results, params):
        if not p.prompt_logprobs:
            assert r.prompt_logprobs is None and r.num_cached_tokens > 0
            continue
        assert r.num_cached_tokens == 0, "prompt log-probs need every prompt position computed"
        ref = _reference_logits(tiny_model, r.prompt_token_ids, r.output_token_ids)
        scale = 1.0 if p.is_greedy else 1.0 / p.temperature
        assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(r.prompt_token_ids)
        for pos in range(1, len(r.prompt_token_ids)):
            expected = _log_softmax(ref[pos - 1] * scale)[r.prompt_token_ids[pos]]
            assert abs(r.prompt_logprobs[pos] - expected) < TOL, (r.request_id, pos)
    _check_outputs(tiny_model, results, params)


def test_a_stopped_request_has_no_log_prob_for_its_discarded_extra_token(make_engine, tiny_model):
    prompts = _prompts(6, seed=4)
    engine = make_engine()
    probe = engine.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
    stops = [SamplingParams(max_new_tokens=6, stop_token_ids=(r.output_token_ids[2],)) for r in probe]
    results = engine.generate(prompts, stops)
    assert all(r.finish_reason == "stop" and len(r.output_token_ids) <= 3 for r in results)
    _check_outputs(tiny_model, results, stops)


def test_top_n_beyond_the_kept_tokens_lists_only_tokens_the_distribution_has(make_engine, tiny_model):
    """Processed mode with N above what top-k / top-p keep: the alternatives are the kept
    tokens only (no -inf entries with arbitrary ids), and the results line is valid."""
    import orjson
    from inference.run_outputs import result_record
    from routing_replay.schema import validate_results_line
    params = [SamplingParams(max_new_tokens=5, temperature=1.0, top_k=2, logprobs=5, seed=1),
              SamplingParams(max_new_tokens=5, temperature=1.0, top_p=0.05, logprobs=20, seed=2),
              SamplingParams(max_new_tokens=5, temperature=0.7, top_k=3, logprobs=4, logprobs_mode="tempered", seed=3)]
    results = make_engine().generate(_prompts(3, seed=5), params)
    _check_outputs(tiny_model, results, params)
    assert all(len(step) == 2 for step in results[0].output_top_logprobs)
    assert all(len(step) < 20 for step in results[1].output_top_logprobs)
    assert all(len(step) == 4 for step in results[2].output_top_logprobs), "tempered keeps every token"
    for r in results:
        assert validate_results_line(orjson.loads(orjson.dumps(result_record(r)))) == []


def test_logprobs_can_be_turned_off(make_engine):
    engine = make_engine(compute_logprobs=False)
    (result,) = engine.generate([[3, 4, 5]], SamplingParams(max_new_tokens=3))
    assert result.output_logprobs is None and len(result.output_token_ids) == 3
