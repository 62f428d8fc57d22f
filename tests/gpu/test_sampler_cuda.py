"""The batched sampler on CUDA: no host sync, every draw the reference inverse CDF of its
uniform (computed on the host), nearly all equal to the CPU sampler's (float rounding of
the device's reductions may move a boundary), and sampled decode through the engine's
CUDA graphs with log-probs equal to a recompute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.presets import build_model, get_preset
from inference.request import Request, SamplingParams
from inference.sampling import Sampler
from tests.inference.sampling.reference import assert_inverse_cdf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

KINDS = [dict(), dict(temperature=1.0), dict(temperature=0.8, top_p=0.9, logprobs=3),
         dict(temperature=1.2, top_k=20, logprobs_mode="tempered"), dict(temperature=0.6, top_k=7, top_p=0.5)]


def _requests(n: int) -> list[Request]:
    return [Request(request_id=str(i), prompt_token_ids=[1], arrival_index=i,
                    sampling_params=SamplingParams(seed=i, **KINDS[i % len(KINDS)])) for i in range(n)]


@pytest.mark.parametrize("vocab", [500, 50304])
def test_cuda_draws_are_the_reference_inverse_cdf_without_a_host_sync(vocab):
    """Every CUDA draw is the token whose float64 CDF interval holds its uniform (up to the
    device's float32 rounding), no host sync happens, and nearly every token and its
    log-prob equal the CPU sampler's (a draw on a rounding boundary may differ)."""
    n = 400
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(vocab)) * 2.0
    requests, positions = _requests(n), list(range(7, 7 + n))
    on_cpu = Sampler(0, torch.device("cpu")).sample(logits, requests, positions)
    cuda = Sampler(0, torch.device("cuda"))
    device_logits = logits.cuda()
    cuda.sample(device_logits, requests, positions)      # warm-up (allocator, pinned pool)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = cuda.sample(device_logits, requests, positions)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    tokens = on_gpu.tokens.cpu()
    assert assert_inverse_cdf(tokens, logits.numpy(), requests, positions, engine_seed=0, tol=1e-4) > 0
    agree = tokens == on_cpu.tokens
    assert agree.float().mean().item() >= 0.98
    assert torch.allclose(on_gpu.logprobs.cpu()[agree], on_cpu.logprobs[agree], atol=1e-4)


def test_sampled_graph_decode_log_probs_match_a_recompute():
    model = build_model(get_preset("tiny-moe"), seed=0, dtype=torch.float32, device="cuda")
    engine = LLMEngine(model, EngineConfig(block_size=16, num_kv_blocks=256, max_requests=16, max_step_tokens=128,
                                           dtype="float32", device="cuda", cuda_graphs=True, async_scheduling=True,
                                           record_routing=True))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, 512, size=int(rng.integers(4, 30))).tolist() for _ in range(10)]
    params = [SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=1.0, top_p=0.9 if i % 2 else 1.0,
                             seed=i, logprobs_mode="raw") for i in range(10)]
    results = engine.generate(prompts, params)
    assert sum(e["cuda_graph"] for e in engine.step_log.entries) > 0
    for r in results:
        seq = torch.tensor(r.prompt_token_ids + r.output_token_ids, device="cuda")
        logits, _ = model.forward_reference(seq[:-1])
        ref = torch.log_softmax(logits[len(r.prompt_token_ids) - 1:].double(), dim=-1)
        ref_chosen = ref.gather(1, torch.tensor(r.output_token_ids, device="cuda")[:, None])[:, 0]
        assert np.allclose(r.output_logprobs, ref_chosen.cpu().numpy(), atol=1e-4), r.request_id
    assert len({tuple(r.output_token_ids) for r in results}) == len(results)
