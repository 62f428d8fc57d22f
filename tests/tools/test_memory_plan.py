"""The memory plan's exact components equal what the engine really allocates, and a plan
that does not fit names the numbers and the flag to change."""

from __future__ import annotations

import pytest
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.presets import build_model, get_preset
from tools.memory_plan import MemoryPlan, available_memory, plan_memory


@pytest.mark.parametrize("preset, record", [("tiny-moe", True), ("tiny-moe-sigmoid", False)])
def test_exact_components_match_the_engine(preset, record):
    mc = get_preset(preset)
    config = EngineConfig(block_size=8, num_kv_blocks=37, max_requests=4, max_step_tokens=32, record_routing=record)
    plan = dict((name, size) for name, size, _ in plan_memory(mc, config, torch.device("cpu")).components)
    model = build_model(mc, seed=0)
    engine = LLMEngine(model, config)
    assert plan["weights"] == sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan["KV cache"] == engine.kv_cache.nbytes
    if record:
        recorder = engine.recorder
        assert plan["routing buffer"] == sum(t.numel() * t.element_size() for t in (recorder.staging, recorder.block_routing))
    else:
        assert "routing buffer" not in plan
    assert plan["activations"] > 0 and "CUDA graphs" not in plan


@pytest.mark.parametrize("preset", ["tiny-hybrid-gdn", "tiny-hybrid-mamba"])
def test_hybrid_components_match_the_engine(preset):
    """KV for the attention layers only; the state pool and checkpoints as their own lines."""
    mc = get_preset(preset)
    config = EngineConfig(block_size=4, num_kv_blocks=21, max_requests=3, max_step_tokens=16, state_checkpoints=5)
    plan = plan_memory(mc, config, torch.device("cpu"))
    sizes = dict((name, size) for name, size, _ in plan.components)
    engine = LLMEngine(build_model(mc, seed=0), config)
    assert sizes["KV cache"] == engine.kv_cache.nbytes and len(mc.attention_layer_indices) < mc.num_layers
    assert sizes["state pool"] == engine._state.state_pool.nbytes > 0
    assert sizes["state checkpoints"] == engine._state.checkpoints.nbytes > 0
    assert "attention layers of" in dict(plan.rows())["KV cache"]
    off = dict((n, s) for n, s, _ in plan_memory(mc, EngineConfig(enable_prefix_caching=False), torch.device("cpu")).components)
    assert off["state checkpoints"] == 0
    assert "state pool" not in dict((n, s) for n, s, _ in plan_memory(get_preset("tiny-moe"), config,
                                                                       torch.device("cpu")).components)


def test_a_plan_that_does_not_fit_names_numbers_and_flag():
    plan = MemoryPlan("cpu", (("weights", 2 << 20, ""), ("KV cache", 30 << 30, "")), 8 << 30, "MemAvailable")
    assert not plan.fits
    message = plan.problem()
    assert "weights 2.0 MiB + KV cache 30.0 GiB = 30.0 GiB" in message and "8.0 GiB is available (MemAvailable)" in message
    assert "lower --kv-cache-memory or --num-kv-blocks" in message
    heavy = MemoryPlan("cuda:0", (("weights", 9 << 30, ""), ("KV cache", 1 << 30, "")), 4 << 30, "free")
    assert "cuda:0 memory" in heavy.problem() and "--dtype bfloat16" in heavy.problem()
    assert MemoryPlan("cpu", (("weights", 1, ""),), None, "unknown").fits


def test_host_memory_is_measured_and_shared_by_local_processes():
    one, source = available_memory(torch.device("cpu"))
    two, _ = available_memory(torch.device("cpu"), local_processes=2)
    assert one is not None and one > 0 and ("MemAvailable" in source or "free" in source)
    assert abs(two - one // 2) <= one // 10       # MemAvailable moves a little between reads


def test_piecewise_graphs_are_planned_only_where_they_are_captured():
    """With CUDA graphs on, attention-only models plan a pool for the piecewise graphs plus
    their static query / output buffers (MLA: latent + rotary rows, wider than a head);
    hybrids, and an explicit off, plan none."""
    def pieces(mc, **kw):
        config = EngineConfig(cuda_graphs=True, max_step_tokens=4096, piecewise_max_tokens=1024, **kw)
        return dict((n, s) for n, s, _ in plan_memory(mc, config, torch.device("cpu")).components).get(
            "piecewise CUDA graphs")
    gqa, mla = get_preset("qwen3-30b-a3b-shape"), get_preset("moonlight-16b-a3b-shape")
    assert pieces(gqa) >= 2 * 1024 * gqa.num_heads * gqa.head_dim * 2
    assert pieces(mla) >= 2 * 1024 * mla.num_heads * (mla.mla.kv_lora_rank + mla.mla.qk_rope_head_dim) * 2
    assert pieces(gqa, piecewise_graphs=False) is None
    assert pieces(get_preset("tiny-hybrid-gdn")) is None
