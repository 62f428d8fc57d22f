"""The newer families (DeepSeek-V3 / Moonlight MLA, GLM-4.5, GPT-OSS, MiniMax-M2), tiny and
random, saved by transformers' own save_pretrained and served by our engine: greedy tokens
and recorded routing equal transformers' forward of the same files, through chunked
prefill, prefix-cache hits and preemption, and through the padded (graph-shaped) decode
path; the full-sequence reference forward equals transformers' logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.inference.hf.families import FAMILIES, assert_routing_matches, hf_routing, make_hf_model

pytest.importorskip("safetensors")

from inference.config import EngineConfig  # noqa: E402
from inference.engine import LLMEngine  # noqa: E402
from inference.hf_loader import load_hf_model  # noqa: E402
from inference.request import SamplingParams  # noqa: E402


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory):
    hf = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, load_hf_model(path)


def _prompts(seed: int) -> list[list[int]]:
    """A shared 8-token prefix (two 4-token blocks) and tails: longer than GPT-OSS's window."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(3, 160, size=8).tolist()
    return [prefix + rng.integers(3, 160, size=int(n)).tolist() for n in (5, 3, 7, 1)]


def _check_against_transformers(hf, model, results) -> None:
    for r in results:
        assert r.finish_reason == "length", r.error
        seq = r.prompt_token_ids + r.output_token_ids
        logits, ids, scores = hf_routing(hf, seq)
        # teacher-forced argmax of transformers = our greedy continuation
        assert logits[len(r.prompt_token_ids) - 1:-1].argmax(-1).tolist() == r.output_token_ids
        assert r.routing.shape == (len(seq) - 1, model.config.num_moe_layers, model.config.topk)
        assert len(ids) == model.config.num_moe_layers
        assert assert_routing_matches(r.routing, ids, scores) == 0


def test_engine_matches_transformers_with_chunks_prefix_hits_and_preemption(checkpoint):
    name, hf, model = checkpoint
    engine = LLMEngine(model, EngineConfig(record_routing=True, block_size=4, num_kv_blocks=10, max_requests=3,
                                           max_step_tokens=6))
    prompts = _prompts(seed=len(name))
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    results = engine.generate(prompts[:1], params) + engine.generate(prompts[1:], params)
    entries = engine.step_log.entries
    assert sum(e["prefill_requests"] for e in entries) > len(prompts), "prompts longer than 6 tokens are chunked"
    assert any(r.num_cached_tokens > 0 for r in results[1:]), "the shared prefix should hit the cache"
    assert sum(r.num_preemptions for r in results) > 0, "10 blocks for 3 requests of 6 blocks must preempt"
    _check_against_transformers(hf, model, results)


def test_padded_decode_path_matches_transformers(checkpoint):
    """Decode steps through the static padded path (what CUDA graphs capture): the decode
    kernels' torch references, incl. MLA's absorbed latent decode and windowed decode."""
    name, hf, model = checkpoint
    engine = LLMEngine(model, EngineConfig(record_routing=True, block_size=4, num_kv_blocks=64, max_requests=4,
                                           max_step_tokens=32, padded_decode=True))
    results = engine.generate(_prompts(seed=7 + len(name)), SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert sum(e["decode_requests"] > 0 and e["prefill_requests"] == 0 for e in engine.step_log.entries) > 3
    _check_against_transformers(hf, model, results)


def test_reference_forward_matches_transformers_logits(checkpoint):
    _, hf, model = checkpoint
    tokens = _prompts(seed=3)[2]
    hf_logits, _, _ = hf_routing(hf, tokens)
    ref_logits, routing = model.forward_reference(torch.tensor(tokens))
    torch.testing.assert_close(ref_logits, hf_logits, atol=1e-4, rtol=0)
    assert routing.shape == (len(tokens), model.config.num_moe_layers, model.config.topk)


def test_cuda_backend_dispatch_matches_transformers_on_cpu(checkpoint, monkeypatch):
    """TritonBackend's choices (decode kernels for decode-only steps, paged prefill with
    windows and sinks, the eager loop for latent prefill), run through their CPU fallbacks."""
    name, hf, model = checkpoint
    if name not in ("moonlight", "gpt_oss"):
        pytest.skip("exercised for the MLA and windowed + sinks attention kinds")
    import inference.engine
    from inference.attention_backends import TritonBackend

    class Counting(TritonBackend):
        """Counts decode-only and mixed steps per attention kind."""

        def __init__(self):
            super().__init__()
            self.calls: dict = {}

        def attend(self, q, k_cache, v_cache, meta, *args):
            self.calls[("gqa", meta.decode_only)] = self.calls.get(("gqa", meta.decode_only), 0) + 1
            return super().attend(q, k_cache, v_cache, meta, *args)

        def attend_latent(self, q, cache, meta, *args):
            self.calls[("mla", meta.decode_only)] = self.calls.get(("mla", meta.decode_only), 0) + 1
            return super().attend_latent(q, cache, meta, *args)

    backend = Counting()
    monkeypatch.setattr(inference.engine, "select_attention", lambda device, mha_dot=None: backend)
    engine = LLMEngine(model, EngineConfig(record_routing=True, block_size=4, num_kv_blocks=64, max_requests=4,
                                           max_step_tokens=12))
    results = engine.generate(_prompts(seed=11), SamplingParams(max_new_tokens=6, ignore_eos=True))
    kind = "mla" if name == "moonlight" else "gqa"
    assert backend.calls.get((kind, True)) and backend.calls.get((kind, False)), backend.calls
    _check_against_transformers(hf, model, results)


def test_copies_admitted_in_one_step_hit_the_blocks_it_computes(checkpoint, monkeypatch):
    """An RL group (three copies of each of two prompts, all admitted in the first step):
    the later copies hit the blocks the first copy's chunk computes in that same step, and
    read them through windows + sinks and latent attention (for those two kinds through the
    CUDA backend's dispatch, run on its CPU fallbacks): tokens and routing equal transformers'."""
    name, hf, model = checkpoint
    if name in ("moonlight", "gpt_oss"):
        import inference.engine
        from inference.attention_backends import TritonBackend
        monkeypatch.setattr(inference.engine, "select_attention", lambda device, mha_dot=None: TritonBackend(mha_dot))
    prompts = [p for p in _prompts(seed=13)[:2] for _ in range(3)]
    engine = LLMEngine(model, EngineConfig(record_routing=True, block_size=4, num_kv_blocks=64, max_requests=6,
                                           max_step_tokens=64))
    results = engine.generate(prompts, SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert engine.step_log.entries[0]["prefill_requests"] == len(prompts)
    # every request but the first hits: the two prompts share their first 8 tokens too
    assert [r.num_cached_tokens for r in results] == [0, 12, 12, 8, 8, 8]
    _check_against_transformers(hf, model, results)
