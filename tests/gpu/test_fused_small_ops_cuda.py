"""GPU engine with the fused small-op kernels (router, q/k norm + rotary, residual add +
RMSNorm) on vs off: in fp32 the same tokens and routing, both exact against the
full-sequence reference (which never takes the kernels), with CUDA-graph decode and no
host sync in steady-state decode; in bf16, the same routing away from near-ties. The fused
KV write (norm + rotary kernel writing the cache) on vs off: bitwise the same tokens,
routing and log-probs in fp32 and bf16, through decode graphs and piecewise prefill graphs,
with the path taken counted."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.presets import build_model, get_preset
from inference.request import SamplingParams
from tests.gpu.engine_checks import assert_graph_decode_without_host_sync, assert_same_results_as_the_reference
from tests.inference.model.kv_write_counts import counted_kv_writes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _configs():
    sig = get_preset("tiny-moe-sigmoid")
    return {
        "tiny-moe": get_preset("tiny-moe"),                      # softmax, no q/k norm, full rotary
        "sigmoid-bias-per-head-partial": dataclasses.replace(   # DeepSeek-like scoring without groups
            sig, name="sig", rotary_dim=8, router=dataclasses.replace(sig.router, num_groups=1, topk_groups=1)),
        "olmoe-like-full-norm": dataclasses.replace(get_preset("tiny-moe"), name="full", qk_norm="full"),
    }


CONFIGS = _configs()


def _prompts(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 512, size=int(rng.integers(3, 40))).tolist() for _ in range(n)]


def _engine(model, mode, dtype="float32", kv_write=True):
    return LLMEngine(model, EngineConfig(block_size=16, num_kv_blocks=256, max_requests=16, max_step_tokens=256,
                                         dtype=dtype, device="cuda", record_routing=True, cuda_graphs=True,
                                         async_scheduling=True, fused_small_ops=mode, fused_kv_write=kv_write))


def _generate(model, mode, prompts, dtype="float32", kv_write=True):
    engine = _engine(model, mode, dtype, kv_write)
    params = [SamplingParams(max_new_tokens=4 + i % 7, ignore_eos=True) for i in range(len(prompts))]
    results = sorted(engine.generate(prompts, params), key=lambda r: prompts.index(r.prompt_token_ids))
    assert any(e["cuda_graph"] for e in engine.step_log.entries)
    return engine, results


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_tokens_and_routing_equal_with_the_kernels_on_and_off(name):
    model = build_model(CONFIGS[name], seed=0, dtype=torch.float32, device="cuda")
    prompts = _prompts(12, seed=1)
    on, fused = _generate(model, "on", prompts)
    assert on.fused_small_ops["routers"] == model.config.num_moe_layers
    assert on.fused_small_ops["attention"] == on.fused_small_ops["kv_writes"] == model.config.num_layers
    assert on.fused_small_ops["residual_norms"] == 2 * model.config.num_layers
    off, plain = _generate(model, "off", prompts)
    assert set(off.fused_small_ops.values()) == {0}
    assert_same_results_as_the_reference(model, fused, plain)


def test_fused_decode_has_no_host_sync():
    model = build_model(CONFIGS["sigmoid-bias-per-head-partial"], seed=0, dtype=torch.float32, device="cuda")
    engine = _engine(model, "on")
    for i, p in enumerate(_prompts(8, seed=2)):
        engine.add_request(p, SamplingParams(max_new_tokens=12, ignore_eos=True), request_id=str(i))
    assert_graph_decode_without_host_sync(engine, warm_steps=4, checked_steps=6)


def test_bf16_routing_agrees_away_from_near_ties():
    """bf16: the kernels round like torch but reduce in another order, and the router
    logits come from the bf16 GEMM with fp32 accumulation: prompt routing (identical
    inputs up to those differences) agrees on nearly every row, and greedy continuations
    mostly start the same (a random tiny model's bf16 logits are full of near-ties)."""
    model = build_model(CONFIGS["sigmoid-bias-per-head-partial"], seed=0, dtype=torch.bfloat16, device="cuda")
    prompts = _prompts(16, seed=3)
    on, fused = _generate(model, "on", prompts, "bfloat16")
    assert on.fused_small_ops["half_logits"] == model.config.num_moe_layers
    _, plain = _generate(model, "off", prompts, "bfloat16")
    rows = same = first = 0
    for a, b in zip(fused, plain):
        n = len(a.prompt_token_ids) - 1
        rows += n
        same += int((a.routing[:n] == b.routing[:n]).all(axis=(1, 2)).sum())
        first += a.output_token_ids[0] == b.output_token_ids[0]
    assert same >= 0.9 * rows, (same, rows)
    assert first >= 0.5 * len(prompts), first


@pytest.mark.parametrize("name,dtype", [("sigmoid-bias-per-head-partial", "bfloat16"),
                                        ("olmoe-like-full-norm", "bfloat16"), ("tiny-moe", "float32")])
def test_fused_kv_write_changes_no_token(name, dtype):
    """K/V written by the norm + rotary kernel or by ``write_kv`` after it: the same values
    in the cache, so the same tokens, routing and log-probs bit for bit, through decode
    graphs and piecewise prefill graphs (whose pieces hold the KV writes)."""
    model = build_model(CONFIGS[name], seed=0, dtype=getattr(torch, dtype), device="cuda")
    prompts = _prompts(12, seed=4)
    runs = {}
    for kv_write in (True, False):
        with counted_kv_writes() as calls:
            engine, results = _generate(model, "on", prompts, dtype, kv_write)
        entries = engine.step_log.entries
        assert any(e["piecewise_graph"] for e in entries) and any(e["cuda_graph"] and not e["piecewise_graph"]
                                                                  for e in entries)
        assert engine.fused_small_ops["kv_writes"] == (model.config.num_layers if kv_write else 0)
        used, unused = ("fused", "write_kv") if kv_write else ("write_kv", "fused")
        assert calls[used] > 0 and calls[unused] == 0, calls
        runs[kv_write] = [(r.output_token_ids, r.routing.tolist(), r.output_logprobs) for r in results]
        engine.close()
    assert runs[True] == runs[False]
