"""GPU engine: CUDA-graph decode with routing captured in the graph, checked against the
full-sequence reference, and free of host syncs apart from the sampled-token readback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.presets import build_model, get_preset
from inference.request import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def cuda_model():
    return build_model(get_preset("tiny-moe"), seed=0, dtype=torch.float32, device="cuda")


def _prompts(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 512, size=int(rng.integers(3, 40))).tolist() for _ in range(n)]


def _engine(model, **kw):
    cfg = dict(block_size=16, num_kv_blocks=512, max_requests=32, max_step_tokens=256, dtype="float32",
               device="cuda", record_routing=True, cuda_graphs=True)
    cfg.update(kw)
    return LLMEngine(model, EngineConfig(**cfg))


@pytest.mark.parametrize("graphs", [True, False])
def test_cuda_engine_matches_reference(cuda_model, graphs):
    engine = _engine(cuda_model, cuda_graphs=graphs)
    prompts = _prompts(20, seed=1)
    params = [SamplingParams(max_new_tokens=4 + i % 9, ignore_eos=True) for i in range(20)]
    results = engine.generate(prompts, params)
    if graphs:
        assert any(e["cuda_graph"] for e in engine.step_log.entries)
    mismatched_tokens = mismatched_rows = 0
    for r in results:
        seq = torch.tensor(r.prompt_token_ids + r.output_token_ids, device="cuda")
        logits, routing = cuda_model.forward_reference(seq[:-1])
        greedy = logits[len(r.prompt_token_ids) - 1:].argmax(-1).tolist()
        mismatched_tokens += greedy != r.output_token_ids
        mismatched_rows += int((torch.from_numpy(r.routing.astype(np.int64)).cuda() != routing).any(-1).any(-1).sum())
    assert mismatched_tokens == 0
    assert mismatched_rows == 0


def test_decode_steps_have_no_host_sync_besides_readback(cuda_model):
    engine = _engine(cuda_model)
    prompts = _prompts(12, seed=2)
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_new_tokens=6 + i, ignore_eos=True), request_id=str(i))
    for _ in range(3):          # prefill and first decodes
        engine.step()
    original = engine.sampler.sample

    def sample_with_readback_allowed(logits, requests):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return original(logits, requests)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    engine.sampler.sample = sample_with_readback_allowed
    finished = 0
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):      # decode steps during which requests finish (reconstruct + poll)
            finished += len(engine.step())
    finally:
        torch.cuda.set_sync_debug_mode(0)
        engine.sampler.sample = original
    checked = engine.step_log.entries[-8:]
    assert all(e["cuda_graph"] for e in checked)
    assert sum(e["routing_reconstruct_ms"] > 0 for e in checked) > 0, "some requests should finish in the checked steps"
    while engine.has_unfinished():
        engine.step()


def test_cuda_graphs_with_prefix_hits_and_preemption(cuda_model):
    """Graph decode + Triton prefill over cached prefixes + preemption snapshots, all on
    the GPU path, against the full-sequence reference."""
    rng = np.random.default_rng(3)
    shared = rng.integers(2, 512, size=24).tolist()
    prompts = [shared[: int(rng.integers(0, 25))] + rng.integers(2, 512, size=int(rng.integers(1, 12))).tolist()
               for _ in range(24)]
    engine = _engine(cuda_model, block_size=8, num_kv_blocks=20, max_requests=12, max_step_tokens=48)
    results = engine.generate(prompts, [SamplingParams(max_new_tokens=6 + i % 11, ignore_eos=True) for i in range(24)])
    assert sum(r.num_preemptions for r in results) > 0
    assert sum(r.num_cached_tokens for r in results) > 0
    assert any(e["cuda_graph"] for e in engine.step_log.entries)
    for r in results:
        seq = torch.tensor(r.prompt_token_ids + r.output_token_ids, device="cuda")
        logits, routing = cuda_model.forward_reference(seq[:-1])
        assert logits[len(r.prompt_token_ids) - 1:].argmax(-1).tolist() == r.output_token_ids
        assert torch.equal(torch.from_numpy(r.routing.astype(np.int64)).cuda(), routing), r.request_id
    engine.block_pool.check_invariants()
