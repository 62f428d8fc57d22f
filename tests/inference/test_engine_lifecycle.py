"""The engine inside an RL loop: in-place weight refit (prefix cache and routing invalidated,
weight_version recorded), sleep / wake_up, and close freeing everything without the garbage
collector."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.presets import build_model, get_preset
from inference.request import SamplingParams


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 512, size=int(rng.integers(9, 20))).tolist() for _ in range(n)]


def _serve(engine, prompts, max_new=6):
    results = []
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_new_tokens=max_new, ignore_eos=True), request_id=f"r{i}")
    while engine.has_unfinished():
        results += engine.step()
    return sorted(results, key=lambda r: int(r.request_id[1:]))


@pytest.fixture
def policy_pair():
    """A model to serve and a different one whose weights a trainer would send."""
    return (build_model(get_preset("tiny-moe"), seed=0, dtype=torch.float32),
            build_model(get_preset("tiny-moe"), seed=1, dtype=torch.float32))


def test_refit_serves_the_new_weights_and_invalidates_cached_prefixes(make_engine, policy_pair, reference):
    served, trained = policy_pair
    engine = make_engine(model=served, record_routing=True)
    prompts = _prompts(3, seed=0)
    before = _serve(engine, prompts)
    again = _serve(engine, prompts)
    assert all(r.num_cached_tokens > 0 for r in again) and all(r.weight_version == 0 for r in again)
    version = engine.update_weights(trained.state_dict().items())
    assert version == 1 == engine.weight_version
    after = _serve(engine, prompts)
    assert all(r.num_cached_tokens == 0 for r in after), "a prompt cached before the refit must be recomputed"
    for r in after:
        assert r.weight_version == 1
        assert r.output_token_ids == reference.greedy(trained, r.prompt_token_ids, 6, None, True)
        expected = reference.routing(trained, r.prompt_token_ids, r.output_token_ids).numpy()
        np.testing.assert_array_equal(r.routing.astype(np.int64), expected)
    assert [r.output_token_ids for r in after] != [r.output_token_ids for r in before]
    for name, tensor in trained.state_dict().items():    # really in place, into the served model
        assert torch.equal(served.state_dict()[name], tensor), name


def test_refit_is_checked_before_anything_is_copied(make_engine, policy_pair):
    served, trained = policy_pair
    engine = make_engine(model=served)
    snapshot = {k: v.clone() for k, v in served.state_dict().items()}
    bad = [("layers.1.mlp.w13", trained.layers[1].mlp.w13), ("no.such.weight", torch.zeros(3)),
           ("norm.weight", torch.zeros(5)), ("embed_tokens.weight", torch.full_like(served.embed_tokens.weight, float("nan")))]
    with pytest.raises(ValueError) as info:
        engine.update_weights(bad)
    message = str(info.value)
    assert "'no.such.weight'" in message and "norm.weight: shape (5,)" in message and "NaN" in message
    assert all(torch.equal(served.state_dict()[k], v) for k, v in snapshot.items())
    assert engine.weight_version == 0
    assert engine.update_weights([bad[0]], weight_version="step-7") == "step-7"
    with pytest.raises(ValueError, match="pass the next tag"):
        engine.update_weights([bad[0]])


def test_refit_is_refused_while_requests_are_served(make_engine, policy_pair):
    served, trained = policy_pair
    engine = make_engine(model=served)
    engine.add_request([4, 5, 6], SamplingParams(max_new_tokens=4))
    engine.step()
    with pytest.raises(RuntimeError, match="drain"):
        engine.update_weights(trained.state_dict().items())
    with pytest.raises(RuntimeError, match="drain"):
        engine.sleep()


def test_sleep_and_wake_up(make_engine, tiny_model, reference):
    engine = make_engine(record_routing=True)
    prompts = _prompts(2, seed=3)
    first = _serve(engine, prompts)
    kv = weakref.ref(engine.kv_cache.storage)
    engine.sleep()
    assert engine.is_sleeping and kv() is None and engine.recorder is None
    with pytest.raises(RuntimeError, match="asleep.*wake_up"):
        engine.add_request([1, 2, 3])
    engine.wake_up()
    second = _serve(engine, prompts)
    assert [r.output_token_ids for r in second] == [r.output_token_ids for r in first]
    assert all(r.num_cached_tokens == 0 for r in second), "the prefix cache does not survive a sleep"
    for r in second:
        np.testing.assert_array_equal(r.routing.astype(np.int64),
                                      reference.routing(tiny_model, r.prompt_token_ids, r.output_token_ids).numpy())


def test_close_and_drop_free_device_state_without_the_garbage_collector(tiny_model):
    gc.disable()
    try:
        engine = LLMEngine(tiny_model, EngineConfig(block_size=4, num_kv_blocks=32, record_routing=True))
        _serve(engine, _prompts(2, seed=4))
        storage, routing = weakref.ref(engine.kv_cache.storage), weakref.ref(engine.recorder.block_routing)
        with engine:
            pass
        assert storage() is None and routing() is None
        with pytest.raises(RuntimeError, match="closed"):
            engine.add_request([1, 2])
        engine.close()          # idempotent
        dropped = LLMEngine(tiny_model, EngineConfig(block_size=4, num_kv_blocks=32, record_routing=True,
                                                     async_scheduling=True))
        _serve(dropped, _prompts(2, seed=5))
        storage = weakref.ref(dropped.kv_cache.storage)
        del dropped             # no reference cycle keeps it: freed by reference counting
        assert storage() is None
    finally:
        gc.enable()
