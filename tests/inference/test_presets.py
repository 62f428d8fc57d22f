"""Shape presets of the newer families: real parameter counts, MoE layer indices, latent KV
size in the memory plan (built on the meta device: nothing is allocated)."""

from __future__ import annotations

import pytest
import torch

from inference.config import EngineConfig
from inference.model import MoEGPT
from inference.presets import PRESETS
from tools.memory_plan import plan_memory
from tools.run_setup import describe_memory_plan


@pytest.mark.parametrize("name,billions,moe_layers,kv_per_token", [
    ("moonlight-16b-a3b-shape", 16.0, 26, 27 * (512 + 64)),
    ("gpt-oss-20b-shape", 20.9, 24, 24 * 2 * 8 * 64),
    ("glm-4.5-air-shape", 106.9, 45, 46 * 2 * 8 * 128),
    ("minimax-m2-shape", 228.7, 62, 62 * 2 * 8 * 128),
])
def test_shape_presets(name, billions, moe_layers, kv_per_token):
    config = PRESETS[name]
    with torch.device("meta"):
        model = MoEGPT(config)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.1)
    assert config.num_moe_layers == moe_layers and config.kv_bytes_per_token == kv_per_token


def _plan(preset: str, engine_config: EngineConfig) -> str:
    config = PRESETS[preset]
    return describe_memory_plan(config, engine_config, plan_memory(config, engine_config, torch.device("cpu")), 1)


def test_memory_plan_counts_the_latent_cache():
    plan = _plan("moonlight-16b-a3b-shape", EngineConfig(num_kv_blocks=100, block_size=16, dtype="bfloat16"))
    assert "30.4 KiB/token (MLA: latent 512 + rotary key 64 per layer)" in plan
    gqa = _plan("gpt-oss-20b-shape", EngineConfig(num_kv_blocks=100, dtype="bfloat16"))
    assert "48.0 KiB/token (K and V: 8 kv heads x 64 per layer)" in gqa
