"""GPU engine on the newer families (tiny transformers checkpoints of DeepSeek-V3 / Moonlight
MLA, GLM-4.5, GPT-OSS, MiniMax-M2): CUDA-graph decode through the Triton MLA and windowed /
sink decode kernels, Triton prefill with windows and sinks, GPT-OSS experts on the GPU,
checked against transformers (tokens, tie-aware routing sets) and free of host syncs in
graph decode steps apart from the sampled-token readback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.inference.hf.families import FAMILIES, assert_routing_matches, hf_routing, make_hf_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from inference.config import EngineConfig  # noqa: E402
from inference.engine import LLMEngine  # noqa: E402
from inference.hf_loader import load_hf_model  # noqa: E402
from inference.request import SamplingParams  # noqa: E402
from tests.gpu.engine_checks import assert_graph_decode_without_host_sync  # noqa: E402


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    hf = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, load_hf_model(path, device="cuda")


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    shared = rng.integers(3, 160, size=12).tolist()
    return [shared[: int(rng.integers(0, 13))] + rng.integers(3, 160, size=int(rng.integers(1, 20))).tolist()
            for _ in range(n)]


def _engine(model, **kw) -> LLMEngine:
    cfg = dict(block_size=8, num_kv_blocks=24, max_requests=8, max_step_tokens=40, dtype="float32", device="cuda",
               record_routing=True, cuda_graphs=True)
    cfg.update(kw)
    return LLMEngine(model, EngineConfig(**cfg))


@pytest.mark.parametrize("graphs", [True, False])
def test_cuda_engine_matches_transformers(pair, graphs):
    hf, model = pair
    engine = _engine(model, cuda_graphs=graphs)
    prompts = _prompts(16, seed=5)
    results = engine.generate(prompts, [SamplingParams(max_new_tokens=4 + i % 9, ignore_eos=True) for i in range(16)])
    if graphs:
        assert any(e["cuda_graph"] for e in engine.step_log.entries)
    assert sum(r.num_cached_tokens for r in results) > 0
    ties = 0
    for r in results:
        logits, ids, scores = hf_routing(hf, r.prompt_token_ids + r.output_token_ids)
        assert logits[len(r.prompt_token_ids) - 1:-1].argmax(-1).tolist() == r.output_token_ids, r.request_id
        ties += assert_routing_matches(r.routing, ids, scores)
    assert ties == 0
    engine.block_pool.check_invariants()


def test_graph_decode_has_no_host_sync(pair):
    """Asynchronous graph decode of each family: no host sync at all, readback included."""
    _, model = pair
    engine = _engine(model, num_kv_blocks=128, async_scheduling=True)
    for i, p in enumerate(_prompts(8, seed=6)):
        engine.add_request(p, SamplingParams(max_new_tokens=8 + i, ignore_eos=True), request_id=str(i))
    # warm: prefill (40-token budget) and first decodes
    assert_graph_decode_without_host_sync(engine, warm_steps=6, checked_steps=5)
