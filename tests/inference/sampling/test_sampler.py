"""Sampling: greedy limits, draws that depend only on (seed, position), distributions equal to
an independent numpy filter, and a device op count that does not grow with the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.request import Request, SamplingParams
from inference.sampling import Sampler
from tests.inference.sampling.reference import assert_inverse_cdf, reference_probs
from tools.op_count import DeviceOpCounter

CPU = torch.device("cpu")


def _req(rid: str, arrival: int = 0, **params) -> Request:
    return Request(request_id=rid, prompt_token_ids=[1], sampling_params=SamplingParams(**params),
                   arrival_index=arrival)


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    reqs = [_req(str(i), temperature=1.5, top_k=1 if i % 2 else 0, top_p=1.0 if i % 2 else 1e-6, seed=i)
            for i in range(6)]
    tokens = Sampler(0, CPU).sample(logits, reqs, [5] * 6).tokens
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_greedy_rows_of_a_sampled_batch_take_the_argmax():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(4))
    reqs = [_req(str(i), temperature=0.0 if i % 2 else 1.5, top_p=0.9, seed=i) for i in range(8)]
    tokens = Sampler(0, CPU).sample(logits, reqs, list(range(8))).tokens
    assert tokens[1::2].tolist() == logits[1::2].argmax(-1).tolist()
    assert tokens[0::2].tolist() != logits[0::2].argmax(-1).tolist(), "the sampled rows must draw"


def test_temperatures_below_1e_5_are_greedy_and_never_nan():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2)) * 30
    reqs = [_req(str(i), temperature=t, seed=i) for i, t in enumerate((1e-40, 1e-6, 9.9e-6, 0.0))]
    assert all(r.sampling_params.is_greedy for r in reqs)
    out = Sampler(0, CPU).sample(logits, reqs, [1, 2, 3, 4])
    assert out.tokens.tolist() == logits.argmax(-1).tolist()
    assert torch.isfinite(out.logprobs).all()
    assert not _req("x", temperature=1e-5).sampling_params.is_greedy


@pytest.mark.parametrize("vocab, kinds", [
    (12, [dict(temperature=0.7)]),
    (12, [dict(temperature=1.0, top_k=4)]),
    (12, [dict(temperature=1.3, top_p=0.6)]),
    (12, [dict(temperature=0.9, top_k=6, top_p=0.8)]),
    (12, [dict(temperature=2.0, top_k=40)]),
    (64, [dict(temperature=1.0, top_k=4)]),
    (64, [dict(temperature=0.8, top_k=3), dict(temperature=1.0, top_k=6, top_p=0.7), dict(temperature=0.0)]),
], ids=["temperature", "top-k-sort", "top-p", "top-k-then-top-p", "top-k-beyond-vocab", "top-k-topk",
        "mixed-top-k-topk"])
def test_frequencies_over_positions_match_the_filtered_distribution(vocab, kinds):
    """4000 draws per kind of request at 4000 positions (one batched call, kinds interleaved)
    against the numpy reference: tokens outside the filtered set never appear, frequencies
    within 3 sigma (a greedy kind: always the argmax)."""
    draws = 4000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(3)) * 1.5
    reqs = [_req(str(k), seed=11 + k, **kind) for k, kind in enumerate(kinds)]
    rows = [reqs[i % len(reqs)] for i in range(draws * len(reqs))]
    positions = [i // len(reqs) for i in range(len(rows))]
    tokens = Sampler(0, CPU).sample(logits.expand(len(rows), vocab).contiguous(), rows, positions).tokens
    for k, req in enumerate(reqs):
        counts = np.bincount(tokens[k::len(reqs)].numpy(), minlength=vocab)
        if req.sampling_params.is_greedy:
            assert counts[int(logits.argmax())] == draws
            continue
        expected = reference_probs(logits[0].numpy(), req.sampling_params)
        assert counts[expected == 0].sum() == 0
        assert (expected > 0).sum() >= 2, "the case must leave a choice"
        sigma = np.sqrt(draws * expected * (1 - expected))
        assert np.all(np.abs(counts - draws * expected) <= 3 * sigma + 1), (k, counts, draws * expected)


@pytest.mark.parametrize("vocab", [40, 300])
def test_every_draw_is_the_reference_inverse_cdf_of_its_uniform(vocab):
    """Each sampled row's token is the one whose CDF interval (float64 numpy, vocab order)
    holds the row's (seed, position) uniform, on every branch in one batch: unfiltered,
    temperature, top-k (topk branch alone, full sort here), top-p, both, greedy."""
    kinds = [dict(temperature=1.0), dict(temperature=0.5), dict(temperature=1.3, top_k=4),
             dict(temperature=0.8, top_p=0.7), dict(temperature=1.1, top_k=9, top_p=0.9), dict()]
    n = 240
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(vocab)) * 2.0
    reqs = [_req(str(i), arrival=i, seed=None if i % 5 == 0 else i, **kinds[i % len(kinds)]) for i in range(n)]
    positions = [3 * i + 1 for i in range(n)]
    tokens = Sampler(7, CPU).sample(logits, reqs, positions).tokens
    assert assert_inverse_cdf(tokens, logits.numpy(), reqs, positions, engine_seed=7, tol=1e-5) == n - n // 6


def _reference_logprobs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Log-probs in the request's mode (greedy: raw) from the numpy reference."""
    x = logits.astype(np.float64)
    if params.is_greedy or params.logprobs_mode == "raw":
        dist = x - x.max() - np.log(np.exp(x - x.max()).sum())
    elif params.logprobs_mode == "tempered":
        t = x / params.temperature
        dist = t - t.max() - np.log(np.exp(t - t.max()).sum())
    else:
        with np.errstate(divide="ignore"):
            dist = np.log(reference_probs(logits, params))
    return dist


def test_log_probs_of_a_batch_mixing_modes_match_the_reference():
    """Greedy rows, the three modes and top-k rows on the topk branch in one batch: each
    row's log-prob of its token and its top-3 equal the numpy reference of its own mode."""
    vocab = 64
    logits = torch.randn(9, vocab, generator=torch.Generator().manual_seed(6)) * 2.0
    modes = ("processed", "tempered", "raw")
    reqs = [_req(str(i), seed=i, logprobs=3, logprobs_mode=modes[i % 3],
                 **(dict(temperature=0.0) if i % 4 == 3 else dict(temperature=0.7 + 0.1 * i, top_k=3 + i % 4)))
            for i in range(9)]
    out = Sampler(0, CPU).sample(logits, reqs, list(range(9)))
    assert {r.sampling_params.logprobs_mode for r in reqs if not r.sampling_params.is_greedy} == set(modes)
    for i, req in enumerate(reqs):
        dist = _reference_logprobs(logits[i].numpy(), req.sampling_params)
        token = int(out.tokens[i])
        assert abs(float(out.logprobs[i]) - dist[token]) < 1e-4, (i, req.sampling_params)
        order = np.argsort(-dist, kind="stable")[:3]
        assert np.allclose(out.top_logprobs[i].numpy(), dist[order], atol=1e-4), i
        finite = np.isfinite(dist[order])
        assert out.top_ids[i].numpy()[finite].tolist() == order[finite].tolist(), i


@pytest.mark.parametrize("target_params", [dict(temperature=1.0), dict(temperature=0.8, top_k=3)],
                         ids=["unfiltered", "top-k"])
def test_a_requests_tokens_do_not_depend_on_its_batch(target_params):
    """The same request and positions alone and inside batches that take the other branches
    (a top-p neighbour forces the full sort, greedy and seedless neighbours ride along)."""
    gen = torch.Generator().manual_seed(1)
    steps = [torch.randn(4, 40, generator=gen) for _ in range(30)]
    target = _req("t", seed=42, **target_params)
    others = [_req("a", temperature=0.7, top_p=0.5, seed=1), _req("g"), _req("b", arrival=3, temperature=2.0)]
    alone = [int(Sampler(0, CPU).sample(s[1:2], [target], [pos]).tokens[0]) for pos, s in enumerate(steps)]
    batched = [int(Sampler(0, CPU).sample(s, [others[0], target, *others[1:]], [pos, pos, 9, 70]).tokens[1])
               for pos, s in enumerate(steps)]
    assert alone == batched
    assert len(set(alone)) > 1, "the draws must vary with the position"


def test_draws_are_a_function_of_seed_and_position_only():
    logits = torch.zeros(1, 30)           # uniform over 30 tokens: the token shows the draw
    sampler = Sampler(0, CPU)
    req = _req("same", temperature=1.0, seed=3)
    first = [int(sampler.sample(logits, [req], [p]).tokens[0]) for p in range(20)]
    again = _req("other-id", temperature=1.0, seed=3)
    assert [int(Sampler(5, CPU).sample(logits, [again], [p]).tokens[0]) for p in range(20)] == first
    assert [int(sampler.sample(logits, [req], [p]).tokens[0]) for p in range(20)] == first   # no state
    other_seed = _req("s", temperature=1.0, seed=4)
    assert [int(sampler.sample(logits, [other_seed], [p]).tokens[0]) for p in range(20)] != first


def test_unseeded_requests_follow_the_engine_seed_and_arrival():
    logits = torch.zeros(1, 1000)
    def tokens(engine_seed: int, arrival: int) -> list[int]:
        req = _req("u", arrival=arrival, temperature=1.0)
        return [int(Sampler(engine_seed, CPU).sample(logits, [req], [p]).tokens[0]) for p in range(8)]
    assert tokens(1, 2) == tokens(1, 2)
    assert tokens(1, 2) != tokens(2, 2) and tokens(1, 2) != tokens(1, 3)


def _mixed_batch(n: int) -> list[Request]:
    kinds = [dict(), dict(temperature=1.0, top_p=0.9, logprobs=2),
             dict(temperature=0.6, top_k=5, logprobs_mode="tempered"), dict(temperature=1.2, logprobs_mode="raw")]
    return [_req(str(i), arrival=i, **kinds[i % len(kinds)]) for i in range(n)]


def test_the_number_of_device_ops_does_not_grow_with_the_batch():
    counts = {}
    for n in (4, 64):
        logits = torch.randn(n, 300, generator=torch.Generator().manual_seed(n))
        with DeviceOpCounter() as ops:
            out = Sampler(0, CPU).sample(logits, _mixed_batch(n), list(range(n)))
        assert out.tokens.shape == (n,) and out.top_ids.shape == (n, 2)
        counts[n] = ops.total
    assert counts[4] == counts[64] and counts[4] > 0


def test_mismatched_rows_are_refused():
    with pytest.raises(ValueError, match="positions"):
        Sampler(0, CPU).sample(torch.zeros(2, 5), [_req("a"), _req("b")], [0])


@pytest.mark.parametrize("mode", ["processed", "tempered", "raw"])
def test_log_probs_stay_exact_just_above_the_greedy_temperature(mode):
    """At temperature 1.2e-5 the scaled logits reach ~3e6 (a float32 step of 0.25): four tied
    maxima must still each get log(1/4) in every mode (max + log(mass) rounded to -1.5)."""
    logits = torch.full((3, 40), -5.0)
    logits[:, [3, 11, 20, 33]] = 40.0
    kinds = [dict(temperature=1.2e-5), dict(temperature=1.2e-5, top_p=0.9), dict(temperature=1.2e-5, top_k=5)]
    reqs = [_req(str(i), seed=i, logprobs_mode=mode, **kind) for i, kind in enumerate(kinds)]
    out = Sampler(0, CPU).sample(logits, reqs, [0, 1, 2])
    assert set(out.tokens.tolist()) <= {3, 11, 20, 33}
    expected = np.log(0.25) if mode != "raw" else float(torch.log_softmax(logits[0].double(), -1)[3])
    assert np.allclose(out.logprobs.numpy(), expected, atol=1e-4), out.logprobs
