"""The fused sampling kernel against the independent numpy reference (tests/inference/sampling/
reference.py: float64 filters, inverse CDF in vocab order) and against the torch sampler.

On CPU the kernel runs through Triton's interpreter in a subprocess (harness.py): every
branch in one batch (temperature, top-k, top-p, both, greedy; the three log-prob modes) at a
one-chunk and a multi-chunk vocab, ties at both cuts (the same kept set in any batch), rows
of -inf, signed zeros, k >= V, k = 1, a tiny top-p, strided logits, rows holding +inf or NaN,
log-probs just above the greedy temperature. On CUDA: the same at Qwen3's vocab, batch 1 to
256, with no host sync, and the engine's sampler taking it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.kernels.sample_triton import CANDIDATES, PATHS, fused_sample
from inference.request import Request, SamplingParams
from inference.sampling import Sampler
from inference.sampling.sampler import SamplingPlan
from tests.inference.kernels.harness import (
    assert_interpreter_checks_pass,
    forbid_host_sync,
    needs_cuda,
    needs_triton,
    run_interpreter_checks,
)
from tests.inference.sampling.reference import assert_inverse_cdf, reference_probs

KINDS = [dict(temperature=1.0), dict(temperature=0.5, logprobs_mode="tempered"), dict(temperature=1.3, top_k=4),
         dict(temperature=0.8, top_p=0.7, logprobs_mode="raw"), dict(temperature=1.1, top_k=9, top_p=0.9), dict(),
         dict(temperature=0.9, top_p=0.95), dict(temperature=1.0, top_k=50, top_p=0.6, logprobs_mode="tempered")]


def _requests(n: int, kinds=KINDS) -> list[Request]:
    return [Request(request_id=str(i), prompt_token_ids=[1], arrival_index=i,
                    sampling_params=SamplingParams(seed=i, **kinds[i % len(kinds)])) for i in range(n)]


def reference_logprob(logits: np.ndarray, params: SamplingParams, token: int) -> float:
    """The log-prob of ``token`` in the request's mode (greedy: raw), float64 numpy."""
    x = logits.astype(np.float64)
    if params.is_greedy or params.logprobs_mode == "raw":
        return float(x[token] - x.max() - np.log(np.exp(x - x.max()).sum()))
    t = x / params.temperature
    if params.logprobs_mode == "tempered":
        return float(t[token] - t.max() - np.log(np.exp(t - t.max()).sum()))
    return float(np.log(reference_probs(logits, params)[token]))


def kernel_sample(logits: torch.Tensor, requests: list[Request], positions: list[int], engine_seed: int = 3,
                  segment: int | None = None, candidates: int = CANDIDATES,
                  paths: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on the sampler's own table (as ``Sampler.sample`` builds it); ``paths``
    (a list) is extended with the path name each row took."""
    plan = SamplingPlan.build(requests, positions, logits.shape[-1], engine_seed, True)
    table = None if plan.table is None else torch.from_numpy(plan.table).to(logits.device)
    taken = torch.full((logits.shape[0],), -1, dtype=torch.int32, device=logits.device)
    out = fused_sample(logits, table, top_k=plan.top_k, top_p=plan.top_p, logprobs=True, segment=segment,
                       candidates=candidates, paths=taken)
    if paths is not None:
        paths.extend(PATHS[i] for i in taken.cpu().tolist())
    return out


def check_batch(logits: torch.Tensor, requests: list[Request], positions: list[int], tol: float = 1e-5,
                agree: float = 0.97, paths: set | None = None, **sizes) -> int:
    """The kernel's tokens are the reference inverse CDF of their uniforms, its log-probs the
    reference's, and nearly all tokens the torch sampler's (a draw within float32 rounding of
    a boundary may differ); ``paths``: the paths the rows must have taken, each at least
    once. Returns the number of sampled rows checked."""
    taken = []
    tokens, logprobs = kernel_sample(logits, requests, positions, paths=taken, **sizes)
    assert all((name == "greedy") == r.sampling_params.is_greedy for name, r in zip(taken, requests)), taken
    if paths is not None:
        assert set(taken) == paths, (set(taken), paths)
    torch_path = Sampler(3, logits.device, kernel=False).sample(logits, requests, positions)
    host = logits.cpu().numpy()
    checked = assert_inverse_cdf(tokens.cpu(), host, requests, positions, engine_seed=3, tol=tol)
    for i, (req, token) in enumerate(zip(requests, tokens.cpu().tolist())):
        ref = reference_logprob(host[i], req.sampling_params, token)
        assert abs(float(logprobs[i]) - ref) < 1e-4, (i, req.sampling_params, float(logprobs[i]), ref)
    same = tokens.cpu() == torch_path.tokens.cpu()
    assert same.float().mean().item() >= agree, same.float().mean().item()
    return checked


SMALL = dict(segment=32, candidates=4)      # 32-column segments, 4 candidates each: several segments per row


def check_every_branch(vocab: int, n: int = 16) -> int:
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(vocab)) * 2.0
    requests = _requests(n)
    sampled = sum(not r.sampling_params.is_greedy for r in requests)
    assert check_batch(logits, requests, [5 * i + 2 for i in range(n)], paths=set(PATHS), **SMALL) == sampled
    return 1


def check_flat_rows_fall_back_to_the_search() -> int:
    """Near-uniform rows: the 0.9-nucleus holds most of the vocab, far more than the
    candidates above the bound, so the cut (and a top-k beyond the candidates) comes from
    the search over the whole row."""
    vocab = 200
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(1)) * 0.05
    kinds = [dict(temperature=1.0, top_p=0.9), dict(temperature=2.0, top_k=150), dict(temperature=1.0, top_k=120, top_p=0.8)]
    requests = _requests(6, kinds)
    assert check_batch(logits, requests, list(range(6)), paths={"search"}, **SMALL) == 6
    candidates = SMALL["candidates"] * (vocab // SMALL["segment"] + 1)
    probs = reference_probs(logits[0].numpy(), requests[0].sampling_params)
    assert (probs > 0).sum() > candidates, "the case must need more than the candidates"
    return 1


def check_ties() -> int:
    """bf16-like logits on a 0.25 grid tie at the cuts; a row keeps the same set (so draws
    the same tokens) alone, beside a top-k 8 row and beside a top-p row; signed zeros tie."""
    tied = (20, 30, 40, 50)
    logits = torch.full((1, 64), -10.0)
    logits[0, 10] = 5.0
    logits[0, list(tied)] = 4.0
    for target in (dict(top_k=2), dict(top_k=5, top_p=0.5), dict(top_k=3, top_p=0.5)):
        req = Request(request_id="t", prompt_token_ids=[1], sampling_params=SamplingParams(temperature=1.0, seed=3, **target))
        runs = []
        for other in (None, dict(top_k=8), dict(top_p=0.9)):
            reqs = [req] if other is None else [req, Request(request_id="o", prompt_token_ids=[1],
                                                             sampling_params=SamplingParams(temperature=1.0, seed=1, **other))]
            rows = logits.expand(len(reqs), -1).contiguous()
            runs.append([int(kernel_sample(rows, reqs, [p] * len(reqs), segment=16, candidates=2)[0][0])
                         for p in range(12)])
        assert runs[1] == runs[0] and runs[2] == runs[0], target
        assert set(runs[0]) <= {10, *tied} and len(set(runs[0])) > 1, runs[0]
    grid = torch.round(torch.randn(20, 40, generator=torch.Generator().manual_seed(9)) * 8.0) / 4.0
    grid[::3, ::2] = torch.where(grid[::3, ::2] == 0, -0.0, grid[::3, ::2])     # signed zeros tie with +0
    kinds = [dict(temperature=1.0, top_k=3), dict(temperature=0.8, top_k=7, top_p=0.8), dict(temperature=1.2, top_p=0.6),
             dict(temperature=1.0, top_k=2), dict()]
    check_batch(grid, _requests(20, kinds), [2 * i for i in range(20)], agree=1.0, segment=16, candidates=4)
    return 2


def check_edges() -> int:
    """Rows partly -inf (a padded vocab, whole segments of it), k >= V, k = 1 and a tiny
    top-p (both the argmax), strided logits, one row (the default segment), and an
    all-greedy batch (no table)."""
    v = 300
    logits = torch.randn(6, v, generator=torch.Generator().manual_seed(4)) * 3
    logits[:, 200:] = float("-inf")
    kinds = [dict(temperature=1.0, top_p=0.8), dict(temperature=1.0, top_k=v + 5), dict(temperature=1.5, top_k=1),
             dict(temperature=1.5, top_p=1e-6), dict(temperature=0.7, top_k=250), dict(temperature=1.0)]
    reqs = _requests(6, kinds)
    tokens, _ = kernel_sample(logits, reqs, list(range(6)), **SMALL)
    assert (tokens < 200).all(), tokens
    assert tokens[2] == logits[2].argmax() and tokens[3] == logits[3].argmax()
    check_batch(logits, reqs, list(range(6)), agree=1.0, **SMALL)
    wide = torch.randn(5, v + 7, generator=torch.Generator().manual_seed(5))
    check_batch(wide[:, 3:3 + v], _requests(5), list(range(5)), agree=1.0, **SMALL)
    check_batch(wide[:1, :v].contiguous(), _requests(1, [dict(temperature=1.0, top_k=20, top_p=0.5)]), [0], agree=1.0,
                segment=512, candidates=64)
    ties = torch.zeros(3, v)
    ties[:, [7, 70, 170]] = 2.0
    tokens, chosen = fused_sample(ties, None, top_k=False, top_p=False, logprobs=True, segment=32)
    assert tokens.tolist() == [7, 7, 7], "greedy takes the first of tied maxima"
    torch.testing.assert_close(chosen, torch.log_softmax(ties, -1)[:, 7])
    greedy = torch.randn(4, 2000, generator=torch.Generator().manual_seed(6))
    tokens, chosen = fused_sample(greedy, None, top_k=False, top_p=False, logprobs=True, segment=256)
    assert torch.equal(tokens, greedy.argmax(-1))
    torch.testing.assert_close(chosen, torch.log_softmax(greedy, -1).gather(1, tokens[:, None])[:, 0])
    return 3


def check_non_finite_rows() -> int:
    """Rows holding +inf or NaN, or only -inf, under every filter: a token in range, and no
    candidate stored past its segment's slots (a +inf max made the last level NaN, which no
    value exceeds, so a 16-value segment chose all 16 for its 4 slots: on the GPU, another
    row's candidates or memory past the buffer)."""
    import triton
    from inference.kernels.sample_triton import _segment_kernel

    v, seg, c = 64, 16, 4
    logits = torch.randn(4, v, generator=torch.Generator().manual_seed(8))
    logits[0, 61], logits[1, 3], logits[2] = float("inf"), float("nan"), float("-inf")
    logits[3, 60:] = float("inf")
    for k, p in ((3, 2.0), (v, 0.5), (3, 0.5), (v, 2.0)):
        table = torch.tensor([[1.0, k, p, 1.0, 0, 1]] * 4, dtype=torch.float32)
        tokens, _ = fused_sample(logits, table, top_k=k < v, top_p=p < 1, logprobs=True, segment=seg, candidates=c)
        assert ((tokens >= 0) & (tokens < v)).all(), (k, p, tokens)
    n = triton.cdiv(v, seg)
    cand = torch.full((4 * n * c + 64,), -7, dtype=torch.int64)    # 64 guard slots past the buffer
    bound = torch.empty(4, n, 2, dtype=torch.int32)
    table = torch.tensor([[1.0, 3, 2.0, 1.0, 0, 1]] * 4, dtype=torch.float32)
    _segment_kernel[(4, n)](logits, v, table, torch.empty(4, n, 5), cand, bound, v, n, GREEDY_ONLY=False,
                            TOP_K=True, TOP_P=False, SEG=seg, C=c, LEVELS=16)
    assert (bound[..., 1] <= c).all() and (cand[4 * n * c:] == -7).all(), bound[..., 1]
    return 1


def check_logprobs_near_greedy_temperature() -> int:
    """Just above the greedy temperature, scaled logits reach ~3e6 (a float32 step of 0.25),
    so ``x - (max + log(mass))`` rounds away up to 0.12 nats; ``(x - max) - log(mass)``
    keeps the log-probs (here log 1/4: four tied maxima) to float32 precision."""
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(10))
    logits[:, [5, 17, 40, 63]] = 40.0
    kinds = [dict(temperature=1.2e-5), dict(temperature=1.2e-5, logprobs_mode="tempered"),
             dict(temperature=1.2e-5, top_k=2), dict(temperature=1.2e-5, top_p=0.5)]
    check_batch(logits, _requests(4, kinds), [0, 1, 2, 3], agree=1.0, paths={"unfiltered", "candidates"}, **SMALL)
    return 1


def check_interpreter_cases() -> int:
    return (check_every_branch(40) + check_every_branch(200) + check_flat_rows_fall_back_to_the_search()
            + check_ties() + check_edges() + check_non_finite_rows() + check_logprobs_near_greedy_temperature())


@needs_triton
def test_fused_sampler_matches_the_reference_in_interpreter():
    assert_interpreter_checks_pass(__file__, 10)


@needs_triton
def test_bad_inputs_are_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="fp32"):
        fused_sample(torch.zeros(2, 8, dtype=torch.bfloat16), None, top_k=False, top_p=False, logprobs=False)
    with pytest.raises(ValueError, match="unit column stride"):
        fused_sample(torch.zeros(8, 2).t(), None, top_k=False, top_p=False, logprobs=False)
    with pytest.raises(ValueError, match="table"):
        fused_sample(torch.zeros(2, 8), torch.zeros(3, 6), top_k=False, top_p=False, logprobs=False)


@needs_triton
def test_the_sampler_takes_the_kernel_unless_top_n_is_asked(monkeypatch):
    """A batch where some row asks for top-N alternatives stays on the torch path; any other
    goes to the kernel (a spy here); on CPU the default is the torch path."""
    import inference.sampling.sampler as sampler_module

    calls = []
    def spy(logits, table, *, top_k, top_p, logprobs):
        calls.append((top_k, top_p, table is None))
        return logits.argmax(-1), torch.zeros(logits.shape[0]) if logprobs else None
    monkeypatch.setattr(sampler_module, "fused_sample", spy)
    assert not Sampler(0, torch.device("cpu")).kernel
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="runs on CUDA"):
        Sampler(0, torch.device("cpu"), kernel=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")     # the spy stands in for the kernel
    logits = torch.randn(3, 50)
    sampler = Sampler(0, torch.device("cpu"), kernel=True)
    out = sampler.sample(logits, _requests(3, [dict(temperature=1.0, logprobs=2)]), [0, 1, 2])
    assert not calls and out.top_ids.shape == (3, 2)
    sampler.sample(logits, _requests(3, [dict(temperature=1.0, top_p=0.5), dict()]), [0, 1, 2])
    sampler.sample(logits[:2], _requests(2, [dict(temperature=1.0, top_k=5)]), [0, 1])
    sampler.sample(logits, _requests(3, [dict()]), [0, 1, 2])
    assert calls == [(False, True, False), (True, False, False), (False, False, True)]
    sampler.sample(logits.double(), _requests(3, [dict(temperature=1.0)]), [0, 1, 2])
    assert len(calls) == 3, "non-fp32 logits: the torch path"


QWEN3_VOCAB = 151936


@needs_cuda
@needs_triton
@pytest.mark.parametrize("batch", [1, 7, 64, 256])
def test_gpu_matches_the_reference_without_a_host_sync(batch):
    logits = torch.randn(batch, QWEN3_VOCAB, generator=torch.Generator().manual_seed(batch)) * 3.0
    logits = logits.cuda()
    requests = _requests(batch)
    sampler = Sampler(3, logits.device)
    assert sampler.kernel, "CUDA with Triton: the fused kernel by default"
    sampler.sample(logits, requests, list(range(batch)))          # compile outside the guard
    torch.cuda.synchronize()
    with forbid_host_sync():
        sampler.sample(logits, requests, list(range(batch)))
    sampled = sum(not r.sampling_params.is_greedy for r in requests)
    assert check_batch(logits, requests, list(range(batch)), tol=1e-4, agree=0.97) == sampled


@needs_cuda
@needs_triton
def test_gpu_lm_like_rows_take_the_candidates_path():
    """Rows like a language model's (16 tokens ~15 nats above an N(0, 2) bulk): every
    filtering row's cut is found among the candidates, none needs the whole-row search."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, QWEN3_VOCAB, generator=gen) * 2.0
    logits.scatter_add_(1, torch.randint(0, QWEN3_VOCAB, (64, 16), generator=gen), 15.0 + 2.0 * torch.randn(64, 16, generator=gen))
    requests = _requests(64)
    taken = []
    kernel_sample(logits.cuda(), requests, list(range(64)), paths=taken)
    filtering = [name for name, r in zip(taken, requests)
                 if not r.sampling_params.is_greedy and (r.sampling_params.top_k or r.sampling_params.top_p < 1)]
    assert filtering and set(filtering) == {"candidates"}, taken
    check_batch(logits.cuda(), requests, list(range(64)), tol=1e-4, agree=0.97)


if __name__ == "__main__":
    run_interpreter_checks(check_interpreter_cases)
