"""GPU engine: CUDA-graph decode with routing captured in the graph, checked against the
full-sequence reference, in synchronous and asynchronous scheduling; no host sync at all in
steady-state asynchronous decode; a device that lags the host changes nothing."""

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


def _prompts(n, seed, low=3, high=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 512, size=int(rng.integers(low, high))).tolist() for _ in range(n)]


def _engine(model, **kw):
    cfg = dict(block_size=16, num_kv_blocks=512, max_requests=32, max_step_tokens=256, dtype="float32",
               device="cuda", record_routing=True, cuda_graphs=True, async_scheduling=True)
    cfg.update(kw)
    return LLMEngine(model, EngineConfig(**cfg))


def _assert_exact(model, results):
    for r in results:
        seq = torch.tensor(r.prompt_token_ids + r.output_token_ids, device="cuda")
        logits, routing = model.forward_reference(seq[:-1])
        assert logits[len(r.prompt_token_ids) - 1:].argmax(-1).tolist() == r.output_token_ids, r.request_id
        assert torch.equal(torch.from_numpy(r.routing.astype(np.int64)).cuda(), routing), r.request_id


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_cuda_engine_matches_reference(cuda_model, graphs, async_scheduling):
    engine = _engine(cuda_model, cuda_graphs=graphs, async_scheduling=async_scheduling)
    prompts = _prompts(20, seed=1)
    params = [SamplingParams(max_new_tokens=4 + i % 9, ignore_eos=True) for i in range(20)]
    results = engine.generate(prompts, params)
    if graphs:
        assert any(e["cuda_graph"] for e in engine.step_log.entries)
    assert all("gpu_step_ms" in e for e in engine.step_log.entries if e["active_tokens"])
    _assert_exact(cuda_model, results)


def test_async_decode_has_no_host_sync_at_all(cuda_model):
    """sync debug mode "error" around a stretch of graph decode steps in which requests
    finish (reconstruct + finalize) and their KV blocks are freed: no exemption, the
    sampled-token readback included."""
    engine = _engine(cuda_model)
    prompts = _prompts(12, seed=2)
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_new_tokens=8 + i, ignore_eos=True), request_id=str(i))
    results = []
    for _ in range(4):          # prefill and first decodes
        results += engine.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):     # decode steps during which requests finish
            results += engine.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    checked = engine.step_log.entries[-10:]
    assert all(e["cuda_graph"] for e in checked)
    assert sum(e["routing_reconstruct_ms"] > 0 for e in checked) > 0, "requests should finish in the stretch"
    assert len(results) > 0
    while engine.has_unfinished():
        results += engine.step()
    _assert_exact(cuda_model, results)


def _lagging(engine: LLMEngine, cycles: int) -> LLMEngine:
    """Make the device lag the host: a sleep kernel on the compute stream before each step."""
    launch = engine.runner.launch

    def slow_launch(index, output, previous, timer):
        torch.cuda._sleep(cycles)
        return launch(index, output, previous, timer)

    engine.runner.launch = slow_launch
    return engine


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_a_device_that_lags_the_host_changes_nothing(cuda_model, async_scheduling):
    """Long prompts chunked into many prefill-only steps that sample nothing, while every
    step starts behind a ~10 ms device sleep: the staging ring must keep each queued step's
    inputs intact."""
    prompts = _prompts(6, seed=4, low=150, high=300)
    params = [SamplingParams(max_new_tokens=6, ignore_eos=True) for _ in prompts]
    engine = _lagging(_engine(cuda_model, max_step_tokens=64, max_requests=1, async_scheduling=async_scheduling),
                      cycles=20_000_000)
    results = engine.generate(prompts, params)
    assert sum(e["prefill_requests"] > 0 and e["decode_requests"] == 0 for e in engine.step_log.entries) > 10
    _assert_exact(cuda_model, results)


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
    _assert_exact(cuda_model, results)
    engine.block_pool.check_invariants()


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_piecewise_graphs_for_mixed_steps(cuda_model, async_scheduling):
    """Steps with prefill chunks replay piecewise graphs (attention eager between the
    pieces): tokens and routing equal the full-sequence reference and the run with
    piecewise graphs off, through prefix hits, chunked prefill and preemption; prompt
    log-probs agree too."""
    rng = np.random.default_rng(4)
    shared = rng.integers(2, 512, size=30).tolist()
    prompts = [shared[: int(rng.integers(0, 31))] + rng.integers(2, 512, size=int(rng.integers(1, 40))).tolist()
               for _ in range(24)]
    params = [SamplingParams(max_new_tokens=5 + i % 11, ignore_eos=True, prompt_logprobs=i % 4 == 0)
              for i in range(24)]
    kw = dict(block_size=8, num_kv_blocks=28, max_requests=12, max_step_tokens=96, async_scheduling=async_scheduling)
    engine = _engine(cuda_model, **kw)
    results = engine.generate(prompts, params)
    off = _engine(cuda_model, piecewise_graphs=False, **kw).generate(prompts, params)
    entries = engine.step_log.entries
    pieces = [e for e in entries if e.get("piecewise_graph")]
    assert pieces and any(e["decode_requests"] for e in pieces), "mixed steps should replay piecewise graphs"
    assert any(e["padded_tokens"] > e["active_tokens"] for e in pieces)
    assert engine._device_state().piecewise_runner.num_graphs > 0
    assert sum(r.num_preemptions for r in results) > 0
    assert sum(r.num_cached_tokens for r in results) > 0
    _assert_exact(cuda_model, results)
    for mine, theirs in zip(results, off):
        assert mine.output_token_ids == theirs.output_token_ids
        np.testing.assert_array_equal(mine.routing, theirs.routing)
        assert mine.output_logprobs == pytest.approx(theirs.output_logprobs, abs=1e-4)
        if theirs.prompt_logprobs is not None:
            assert mine.prompt_logprobs == pytest.approx(theirs.prompt_logprobs, abs=1e-4, nan_ok=True)
    engine.block_pool.check_invariants()


def test_aborted_request_with_routing_in_flight_never_meets_a_new_request_of_its_id(cuda_model):
    engine = _engine(cuda_model)
    flush = engine.routing.flush

    def slow_flush(timer):       # keep the routing copies of finishing requests in flight
        torch.cuda._sleep(50_000_000)
        flush(timer)

    engine.routing.flush = slow_flush
    engine.add_request([5, 6, 7, 8], SamplingParams(max_new_tokens=3, ignore_eos=True), request_id="x")
    returned = []
    while engine.routing.num_awaiting == 0:
        returned += engine.step()
    assert returned == [] and engine.recorder.num_pending == 1
    assert engine.abort("x")
    engine.routing.flush = flush
    prompt = [40, 41, 42, 43, 44, 45, 46]
    engine.add_request(prompt, SamplingParams(max_new_tokens=5, ignore_eos=True), request_id="x")
    while engine.has_unfinished():
        returned += engine.step()
    (result,) = returned
    assert result.prompt_token_ids == prompt
    _assert_exact(cuda_model, [result])


@pytest.mark.parametrize("max_tokens,decode_path", [(None, "small"), (0, "aligned")])
def test_fused_moe_small_batch_threshold_reaches_the_model(cuda_model, monkeypatch, max_tokens, decode_path):
    """``EngineConfig.fused_moe_small_batch_max_tokens`` picks the fused path of one-token
    decode steps (None: tiny-moe has no tuned file, so the default 2 tokens); the 7-token
    prefill always takes the aligned path."""
    pytest.importorskip("triton")
    from inference.kernels import fused_moe as fm
    calls = []
    real_small, real_align = fm.small_moe_experts, fm.align_pairs
    monkeypatch.setattr(fm, "small_moe_experts", lambda *a, **kw: (calls.append("small"), real_small(*a, **kw))[1])
    monkeypatch.setattr(fm, "align_pairs", lambda *a, **kw: (calls.append("aligned"), real_align(*a, **kw))[1])
    engine = _engine(cuda_model, cuda_graphs=False, async_scheduling=False, record_routing=False,
                     moe_backend="fused_triton", fused_moe_small_batch_max_tokens=max_tokens)
    (result,) = engine.generate([[5, 6, 7, 8, 9, 10, 11]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    engine.close()
    assert len(result.output_token_ids) == 4
    moe_layers = cuda_model.config.num_moe_layers
    assert calls == ["aligned"] * moe_layers + [decode_path] * (3 * moe_layers), calls
