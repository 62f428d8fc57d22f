"""Hybrid fields of ModelConfig: validation, derived layer sets, JSON round trip, presets
with the published shapes and their state bytes (computed by hand from those shapes)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from inference.config import ModelConfig
from inference.presets import build_model, get_preset
from inference.recurrent_config import GatedDeltaNetConfig, Mamba2Config
from inference.cache.state_pool import state_bytes_per_sequence

GDN = GatedDeltaNetConfig()
MAMBA = Mamba2Config()


def hybrid(**overrides) -> ModelConfig:
    kwargs = dict(num_layers=4, layer_types=("gated_deltanet", "full_attention", "mamba2", "none"),
                  mlp_types=("moe", "dense", "none", "moe"), dense_layers=(1,), gated_deltanet=GDN, mamba2=MAMBA)
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def test_classic_configs_are_unchanged():
    config = get_preset("tiny-moe")
    assert config.layer_types == () and not config.is_hybrid
    assert config.moe_layer_indices == (1, 2, 3)
    assert config.attention_layer_indices == (0, 1, 2, 3)
    assert config.kv_bytes_per_token == 2 * 4 * 2 * 16


def test_sliding_window_layers_count_as_attention_and_older_presets_are_unchanged():
    config = hybrid(layer_types=("gated_deltanet", "sliding_attention", "mamba2", "none"), sliding_window=8)
    assert config.attention_layer_indices == (1,) and config.window_of(1) == 8
    gpt_oss = get_preset("gpt-oss-20b-shape")
    assert not gpt_oss.is_hybrid and gpt_oss.attention_layer_indices == tuple(range(24))
    assert gpt_oss.moe_layer_indices == tuple(range(24))


def test_derived_layer_sets_of_a_hybrid():
    config = hybrid()
    assert config.is_hybrid
    assert config.moe_layer_indices == (0, 3) and config.num_moe_layers == 2
    assert config.attention_layer_indices == (1,)
    assert config.recurrent_layer_indices == (0, 2)
    assert config.kv_bytes_per_token == 2 * 1 * config.num_kv_heads * config.head_dim


def test_json_round_trip_keeps_sub_configs():
    config = hybrid()
    again = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert isinstance(again.mamba2, Mamba2Config) and again.layer_types == config.layer_types


@pytest.mark.parametrize("overrides,match", [
    (dict(layer_types=("full_attention",) * 3), "layer_types has 3 entries"),
    (dict(layer_types=("full_attention", "rwkv", "full_attention", "full_attention")), "must be among"),
    (dict(mlp_types=("moe", "dense", "none")), "mlp_types has 3 entries"),
    (dict(mlp_types=("moe", "dense", "none", "ffn")), "unknown kinds"),
    (dict(mlp_types=("moe", "moe", "none", "moe")), "dense_layers"),
    (dict(gated_deltanet=None), "GatedDeltaNetConfig"),
    (dict(mamba2=None), "Mamba2Config"),
    (dict(mlp_types=("moe", "dense", "none", "none"), dense_layers=(1,)), "neither a mixer nor an MLP"),
    (dict(mlp_types=(), dense_layers=()), "need mlp_types"),
    (dict(recurrent_state_dtype="int8"), "recurrent_state_dtype"),
])
def test_bad_hybrid_configs_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        hybrid(**overrides)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_k_heads=3, num_v_heads=4), "multiple"),
    (dict(conv_kernel=1), "conv_kernel"),
    (dict(head_k_dim=0), "head_k_dim"),
])
def test_bad_gated_deltanet_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GatedDeltaNetConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=6, n_groups=4), "multiple"),
    (dict(dt_min=-1.0), "dt_min"),
    (dict(dt_min=0.1, dt_max=0.05), "dt_max"),
])
def test_bad_mamba2_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba2Config(**kwargs)


def test_qwen3_5_35b_a3b_shape():
    c = get_preset("qwen3.5-35b-a3b-shape")
    assert c.num_layers == 40 and c.layer_types[:4] == ("gated_deltanet",) * 3 + ("full_attention",)
    assert c.attention_layer_indices == tuple(range(3, 40, 4))
    assert c.moe_layer_indices == tuple(range(40)) and (c.num_experts, c.topk) == (256, 8)
    # 30 GDN layers x (fp32 state 32 x 128 x 128 + bf16 conv (2*16*128 + 32*128) x 3)
    assert state_bytes_per_sequence(c, torch.bfloat16) == 30 * (32 * 128 * 128 * 4 + 8192 * 3 * 2) == 64_389_120


def test_qwen3_next_80b_a3b_shape():
    c = get_preset("qwen3-next-80b-a3b-shape")
    assert len(c.recurrent_layer_indices) == 36 and (c.num_experts, c.topk) == (512, 10)
    assert state_bytes_per_sequence(c, torch.bfloat16) == 36 * (32 * 128 * 128 * 4 + 8192 * 3 * 2)


def test_nemotron_3_nano_30b_a3b_shape():
    c = get_preset("nemotron-3-nano-30b-a3b-shape")
    assert c.num_layers == 52
    assert c.layer_types.count("mamba2") == 23 and c.layer_types.count("full_attention") == 6
    assert c.num_moe_layers == 23 and c.dense_layers == ()
    assert all((t == "none") != (m == "none") for t, m in zip(c.layer_types, c.mlp_types))
    assert c.router.score_function == "sigmoid" and c.router.scaling_factor == 2.5
    # 23 Mamba2 layers x (fp32 state 64 x 64 x 128 + bf16 conv (64*64 + 2*8*128) x 3)
    assert state_bytes_per_sequence(c, torch.bfloat16) == 23 * (64 * 64 * 128 * 4 + 6144 * 3 * 2) == 49_082_368
    half = dataclasses.replace(c, recurrent_state_dtype="bfloat16")
    assert state_bytes_per_sequence(half, torch.bfloat16) == 23 * (64 * 64 * 128 * 2 + 6144 * 3 * 2)


def test_hybrid_presets_are_not_built_as_attention_models():
    model = build_model(get_preset("tiny-hybrid-gdn"))
    assert model.hybrid and [layer.self_attn is not None for layer in model.layers] == [False, False, False, True]


def test_hybrid_model_features_validate():
    with pytest.raises(ValueError, match="expert_bias is only supported"):
        ModelConfig(expert_activation="relu2", expert_bias=True)
    mla = dict(mla=dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8))
    for feature in (dict(attention_output_gate=True), dict(use_rope=False)):
        with pytest.raises(ValueError, match="does not combine with"):
            ModelConfig(**mla, **feature)
