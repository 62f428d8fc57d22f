"""Bad requests fail alone with a clear message; the engine keeps serving the others."""

from __future__ import annotations

import pytest

from inference.errors import InvalidRequestError
from inference.request import SamplingParams

GOOD = [[5, 6, 7, 8], [9, 10, 11]]


@pytest.mark.parametrize("prompt, params, message", [
    ([], None, "empty prompt"),
    ([3, 70000, 4], None, "token id 70000 is outside the vocabulary [0, 512)"),
    ([3, -1], None, "token id -1 is outside the vocabulary"),
    ("hello", None, "prompt_token_ids must be a list of ints"),
    ([1.5, 2], None, "prompt_token_ids must be a list of ints"),
    (list(range(2, 300)) * 8, None, "the model's maximum is 2048 positions"),
    ([4, 5], SamplingParams(max_new_tokens=0), "max_new_tokens=0 is invalid"),
    ([4, 5], SamplingParams(temperature=-1.0), "temperature=-1.0 is invalid"),
    ([4, 5], SamplingParams(top_p=0.0), "top_p=0.0 is invalid"),
    ([4, 5], SamplingParams(top_k=-3), "top_k=-3 is invalid"),
])
def test_bad_request_fails_alone(make_engine, prompt, params, message):
    engine = make_engine(record_routing=True)
    prompts = [GOOD[0], prompt, GOOD[1]]
    results = engine.generate(prompts, [SamplingParams(max_new_tokens=4), params or SamplingParams(), SamplingParams(max_new_tokens=4)],
                              request_ids=["a", "bad", "c"])
    bad = results[1]
    assert bad.finish_reason == "error"
    assert message in bad.error and "'bad'" in bad.error
    for r in (results[0], results[2]):
        assert r.finish_reason in ("stop", "length") and r.output_token_ids
        assert r.routing is not None and r.routing.shape[0] == len(r.prompt_token_ids) + len(r.output_token_ids) - 1
    engine.block_pool.check_invariants()


def test_prompt_longer_than_kv_cache(make_engine):
    engine = make_engine(num_kv_blocks=4, block_size=4)
    with pytest.raises(InvalidRequestError, match=r"request 'big'.*KV cache can hold at most 16"):
        engine.add_request(list(range(2, 30)), request_id="big")
    assert not engine.has_unfinished()


def test_duplicate_request_id_is_rejected(make_engine):
    engine = make_engine()
    engine.add_request([4, 5, 6], request_id="x")
    with pytest.raises(InvalidRequestError, match="already being served"):
        engine.add_request([7, 8], request_id="x")
    results = []
    while engine.has_unfinished():
        results += engine.step()
    assert [r.request_id for r in results] == ["x"] and results[0].prompt_token_ids == [4, 5, 6]
    # Its result was returned, so the id is free again.
    results = engine.generate([[9, 10]], SamplingParams(max_new_tokens=2), request_ids=["x"])
    assert results[0].finish_reason in ("stop", "length") and results[0].prompt_token_ids == [9, 10]


def test_generate_leaves_requests_it_did_not_add_untouched(make_engine):
    engine = make_engine(record_routing=True)
    engine.add_request([4, 5, 6], SamplingParams(max_new_tokens=3), request_id="queued")
    with pytest.raises(RuntimeError, match="idle engine"):
        engine.generate([[9, 10]], SamplingParams(max_new_tokens=2), request_ids=["y"])
    results = []
    while engine.has_unfinished():
        results += engine.step()
    assert [r.request_id for r in results] == ["queued"] and len(results[0].output_token_ids) == 3
    assert results[0].routing.shape[0] == 3 + 3 - 1


def test_generation_limited_by_kv_capacity(make_engine):
    engine = make_engine(num_kv_blocks=4, block_size=4, max_requests=1)
    result = engine.generate([[4, 5, 6, 7, 8, 9]], SamplingParams(max_new_tokens=100, ignore_eos=True))[0]
    assert result.finish_reason == "length"
    assert len(result.prompt_token_ids) + len(result.output_token_ids) == 16


def test_recording_a_model_without_moe_layers_is_a_clear_error(tiny_model):
    from dataclasses import replace

    from inference.config import EngineConfig
    from inference.engine import LLMEngine
    from inference.presets import build_model

    dense = build_model(replace(tiny_model.config, name="dense", dense_layers=(0, 1, 2, 3)))
    with pytest.raises(ValueError, match="has no MoE layers"):
        LLMEngine(dense, EngineConfig(record_routing=True))
    assert LLMEngine(dense, EngineConfig(record_routing=False)).generate([[4, 5]], SamplingParams(max_new_tokens=2))
