"""Tied logits (bf16 logits cast to fp32 tie all the time): a request's kept set and draws
must not depend on which tied tokens the batch's topk / sort happened to rank first, i.e.
on the batch's largest top-k or on whether a top-p neighbour forced the full sort."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.request import Request, SamplingParams
from inference.sampling import Sampler
from tests.inference.sampling.reference import assert_inverse_cdf

TIED = (20, 30, 40, 50)      # four tokens tied just below the top one
# On CUDA topk and sort order ties by their own (different) rules: the case that matters most.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _req(rid: str, **params) -> Request:
    return Request(request_id=rid, prompt_token_ids=[1], sampling_params=SamplingParams(**params))


def _boundary_tie(vocab: int = 64) -> torch.Tensor:
    logits = torch.full((1, vocab), -10.0)
    logits[0, 10] = 5.0
    logits[0, list(TIED)] = 4.0
    return logits


@pytest.mark.parametrize("target", [dict(top_k=2), dict(top_k=5, top_p=0.5), dict(top_k=3, top_p=0.5)],
                         ids=["top-k", "top-k-top-p", "top-p-with-ties-past-the-candidates"])
@pytest.mark.parametrize("device", DEVICES)
def test_a_tie_at_the_cut_keeps_the_same_tokens_in_any_batch(target, device):
    """top-k 2 cuts inside the tie; so does top-p 0.5 after top-k 5 (the top token holds
    0.41 of the mass, so the tie group is reached and, kept whole, is the same set in any
    order); after top-k 3 two tied tokens lie past the 3 candidates of the row's own topk
    and still count in the mass top-p cuts. Alone the row takes the topk branch with its own
    top-k as the candidate count; a top-k 8 neighbour makes it 8; a top-p neighbour forces
    the full sort. The draws must agree and cover the tie."""
    logits, device = _boundary_tie().to(device), torch.device(device)
    req = _req("t", temperature=1.0, seed=3, **target)
    neighbours = [None, _req("k", temperature=1.0, top_k=8, seed=1), _req("p", temperature=1.0, top_p=0.9, seed=2)]
    runs = []
    for other in neighbours:
        rows, reqs = (logits, [req]) if other is None else (logits.expand(2, -1).contiguous(), [req, other])
        runs.append([int(Sampler(0, device).sample(rows, reqs, [p] * len(reqs)).tokens[0]) for p in range(300)])
    assert runs[1] == runs[0] and runs[2] == runs[0], "the kept tied tokens depend on the batch"
    assert set(runs[0]) == {10, *TIED}


@pytest.mark.parametrize("vocab", [40, 300])
@pytest.mark.parametrize("device", DEVICES)
def test_draws_over_tied_logits_are_the_reference_inverse_cdf(vocab, device):
    """Logits on a 0.25 grid (many ties, also at top-k and top-p cuts), every branch in one
    batch, checked against the numpy reference (ties kept whole at both cuts)."""
    kinds = [dict(temperature=1.0, top_k=3), dict(temperature=0.8, top_k=7, top_p=0.8),
             dict(temperature=1.2, top_p=0.6), dict(temperature=1.0, top_k=2), dict()]
    n = 200
    gen = torch.Generator().manual_seed(vocab + 1)
    logits = torch.round(torch.randn(n, vocab, generator=gen) * 8.0) / 4.0
    reqs = [_req(str(i), seed=i, **kinds[i % len(kinds)]) for i in range(n)]
    positions = [2 * i for i in range(n)]
    tokens = Sampler(5, torch.device(device)).sample(logits.to(device), reqs, positions).tokens.cpu()
    assert assert_inverse_cdf(tokens, logits.numpy(), reqs, positions, engine_seed=5, tol=1e-5) == n - n // 5
    top = np.sort(logits.numpy(), axis=1)[:, ::-1]
    assert (top[:, 1] == top[:, 2]).sum() > 10, "the case must tie at the top-k 2 cut"
