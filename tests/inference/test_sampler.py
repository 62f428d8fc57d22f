"""Sampling: greedy limits, per-request seeds independent of the batch, filtered distributions."""

from __future__ import annotations

import numpy as np
import torch

from inference.request import Request, SamplingParams
from inference.sampler import Sampler


def _req(rid: str, **params) -> Request:
    return Request(request_id=rid, prompt_token_ids=[1], sampling_params=SamplingParams(**params))


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(0, torch.device("cpu"))
    reqs = [_req(str(i), temperature=1.5, top_k=1 if i % 2 else 0, top_p=1.0 if i % 2 else 1e-6, seed=i)
            for i in range(6)]
    assert sampler.sample(logits, reqs).tokens.tolist() == logits.argmax(-1).tolist()


def test_seeded_request_independent_of_batch_composition():
    gen = torch.Generator().manual_seed(1)
    steps = [torch.randn(3, 40, generator=gen) for _ in range(10)]
    alone, batched = Sampler(0, torch.device("cpu")), Sampler(0, torch.device("cpu"))
    target = _req("t", temperature=1.0, seed=42)
    others = [_req("a", temperature=0.7, seed=1), _req("b", temperature=2.0)]
    tokens_alone = [int(alone.sample(s[1:2], [target]).tokens[0]) for s in steps]
    tokens_batched = [int(batched.sample(s[[0, 1, 2]], [others[0], target, others[1]]).tokens[1]) for s in steps]
    assert tokens_alone == tokens_batched
    rerun = Sampler(0, torch.device("cpu"))
    fresh = _req("t", temperature=1.0, seed=42)
    assert [int(rerun.sample(s[1:2], [fresh]).tokens[0]) for s in steps] == tokens_alone


def test_filtered_distribution_matches_renormalised_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    sampler = Sampler(0, torch.device("cpu"))
    req = _req("d", temperature=1.0, top_k=3, seed=5)
    counts = np.bincount([int(sampler.sample(logits, [req]).tokens[0]) for _ in range(3000)], minlength=6)
    assert counts[3:].sum() == 0                     # outside top-3: never
    expected = torch.softmax(logits[0, :3], -1).numpy()
    assert np.allclose(counts[:3] / 3000, expected, atol=0.03)


def test_top_p_keeps_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(0, torch.device("cpu"))
    req = _req("p", temperature=1.0, top_p=0.7, seed=3)
    seen = {int(sampler.sample(logits, [req]).tokens[0]) for _ in range(500)}
    assert seen == {0, 1}


def test_temperatures_below_1e_5_are_greedy_and_never_nan():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2)) * 30
    sampler = Sampler(0, torch.device("cpu"))
    reqs = [_req(str(i), temperature=t, seed=i) for i, t in enumerate((1e-40, 1e-6, 9.9e-6, 0.0))]
    assert all(r.sampling_params.is_greedy for r in reqs)
    assert sampler.sample(logits, reqs).tokens.tolist() == logits.argmax(-1).tolist()
    assert not _req("x", temperature=1e-5).sampling_params.is_greedy


def test_one_generator_per_request_object_not_per_id():
    """A request id reused after its result was returned starts a fresh generator."""
    logits = torch.zeros(1, 30)
    sampler = Sampler(0, torch.device("cpu"))
    first, again = _req("same", temperature=1.0, seed=3), _req("same", temperature=1.0, seed=3)
    drawn = [int(sampler.sample(logits, [first]).tokens[0]) for _ in range(5)]
    sampler.release(first)
    assert [int(sampler.sample(logits, [again]).tokens[0]) for _ in range(5)] == drawn
