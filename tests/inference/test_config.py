"""ModelConfig's new fields stay validated, and every preset survives the JSON round trip
that step_details.json's meta makes (nested MLA / YaRN / router configs included);
EngineConfig's fused MoE small-batch threshold is validated and recorded."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from inference.config import EngineConfig, MLAConfig, ModelConfig
from inference.presets import PRESETS

MLA = MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_json(name):
    config = PRESETS[name]
    assert ModelConfig.from_dict(orjson.loads(orjson.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("changes,needle", [
    (dict(mla=MLA, qk_norm="per_head"), "does not combine with ['qk_norm']"),
    (dict(mla=MLA, attention_sinks=True), "does not combine with ['attention_sinks']"),
    (dict(layer_types=("full_attention",) * 3), "layer_types has 3 entries for 4 layers"),
    (dict(layer_types=("sliding_attention",) * 4), "sliding_attention layers need sliding_window > 0"),
    (dict(layer_types=("local",) * 4, sliding_window=4), "layer_types must be among"),
    (dict(rotary_dim=5), "rotary_dim must be even"),
    (dict(expert_activation="gelu"), "expert_activation must be one of"),
    (dict(mla=dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=7, v_head_dim=8)), "qk_rope_head_dim must be even"),
])
def test_invalid_combinations_are_rejected(changes, needle):
    with pytest.raises(ValueError) as info:
        dataclasses.replace(ModelConfig(), **changes)
    assert needle in str(info.value)


def test_windows_and_rope_dims():
    c = ModelConfig(layer_types=("sliding_attention", "full_attention") * 2, sliding_window=4, rotary_dim=8)
    assert [c.window_of(i) for i in range(4)] == [4, 0, 4, 0] and c.rope_dim == 8
    assert ModelConfig(mla=MLA).rope_dim == 8 and ModelConfig(mla=MLA).kv_bytes_per_token == 4 * 24


def test_fused_moe_small_batch_threshold_is_optional_and_validated():
    assert EngineConfig().fused_moe_small_batch_max_tokens is None
    for value in (0, 1, 64):
        config = EngineConfig(fused_moe_small_batch_max_tokens=value)
        assert config.to_dict()["fused_moe_small_batch_max_tokens"] == value
    for bad in (-1, "2", 1.5, True):
        with pytest.raises(ValueError, match="fused_moe_small_batch_max_tokens must be None .* or an int >= 0"):
            EngineConfig(fused_moe_small_batch_max_tokens=bad)


def test_decode_attention_mha_dot_reaches_every_decode_backend():
    """The choice reaches the eager backend and the one the decode graphs capture (the padded
    decode path runs the same runner on CPU); a non-bool is refused."""
    from inference.engine import LLMEngine
    from inference.presets import build_model, get_preset
    for bad in (1, "on"):
        with pytest.raises(ValueError, match="decode_attention_mha_dot must be a bool or None"):
            EngineConfig(decode_attention_mha_dot=bad)
    for value in (None, True, False):
        engine = LLMEngine(build_model(get_preset("tiny-moe"), seed=0),
                           EngineConfig(num_kv_blocks=16, padded_decode=True, decode_attention_mha_dot=value))
        assert engine._state.graph_runner.attention.mha_dot is value
    import torch
    from inference.attention_backends import select_attention
    assert select_attention(torch.device("cuda"), True)._decode.mha_dot is True   # the eager CUDA backend


def test_sampler_kernel_reaches_the_engines_sampler():
    """EngineConfig.sampler_kernel picks the engine sampler's path (None: the kernel only on
    CUDA with Triton, so the CPU engine keeps the torch ops); a non-bool is refused."""
    from inference.engine import LLMEngine
    from inference.kernels.sample_triton import fused_sample_available
    from inference.presets import build_model, get_preset
    for bad in (1, "on"):
        with pytest.raises(ValueError, match="sampler_kernel must be a bool or None"):
            EngineConfig(sampler_kernel=bad)
    model = build_model(get_preset("tiny-moe"), seed=0)
    assert LLMEngine(model, EngineConfig(num_kv_blocks=16)).sampler.kernel is False
    assert LLMEngine(model, EngineConfig(num_kv_blocks=16, sampler_kernel=False)).sampler.kernel is False
    if fused_sample_available():     # the kernel asked for on the CPU, outside the interpreter: a clear error
        with pytest.raises(ValueError, match="runs on CUDA"):
            LLMEngine(model, EngineConfig(num_kv_blocks=16, sampler_kernel=True))
