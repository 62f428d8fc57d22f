"""Qwen2-MoE (``qwen2_moe``: gated shared expert, qkv bias) and Qwen3-MoE (``qwen3_moe``:
per-head q/k norm): softmax top-k, dense layers by ``mlp_only_layers`` / ``decoder_sparse_step``."""

from __future__ import annotations

from typing import Any

from inference.config import ModelConfig, RouterConfig
from inference.hf.common import (HFFamily, TensorRecipe, base_fields, build_config, copy, experts, get, gqa_attention,
                                 swiglu)
from inference.hf.mixtral import capped_max_positions


def moe_layers(raw: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    """HF rule: layer i is sparse unless listed in mlp_only_layers, when (i + 1) % decoder_sparse_step == 0."""
    step = int(get(raw, "decoder_sparse_step", default=1))
    only_mlp = set(get(raw, "mlp_only_layers", default=[]))
    return tuple(i for i in range(num_layers) if i not in only_mlp and step > 0 and (i + 1) % step == 0)


def parse(raw: dict[str, Any], problems: list[str]) -> ModelConfig | None:
    model_type = raw["model_type"]
    base = base_fields(raw, problems, model_type,
                       required=("intermediate_size", "moe_intermediate_size", "num_experts_per_tok"))
    if base is None:
        return None
    num_layers = base["num_layers"]
    num_experts = int(get(raw, "num_experts", "num_local_experts", default=0))
    sparse = moe_layers(raw, num_layers) if num_experts > 0 else ()
    if not sparse:
        problems.append("the config has no MoE layer (num_experts, decoder_sparse_step, mlp_only_layers)")
    shared = int(raw.get("shared_expert_intermediate_size") or 0) if model_type == "qwen2_moe" else 0
    base["max_position_embeddings"] = capped_max_positions(raw, windowed_default=False)
    return build_config(
        problems, **base, intermediate_size=int(raw["intermediate_size"]),
        moe_intermediate_size=int(raw["moe_intermediate_size"]), num_experts=num_experts,
        topk=int(raw["num_experts_per_tok"]), dense_layers=tuple(i for i in range(num_layers) if i not in sparse),
        shared_expert_intermediate_size=shared, shared_expert_gate=shared > 0,
        router=RouterConfig(norm_topk_prob=bool(raw.get("norm_topk_prob", False))),
        qk_norm="per_head" if model_type == "qwen3_moe" else "none",
        attention_bias=bool(raw.get("qkv_bias", True)) if model_type == "qwen2_moe" else bool(raw.get("attention_bias", False)))


def layer_recipes(config: ModelConfig, i: int, names: set[str], raw: dict[str, Any]) -> list[TensorRecipe]:
    h = config.hidden_size
    if i in config.dense_layers:
        return gqa_attention(config, i) + swiglu(f"layers.{i}.mlp", f"model.layers.{i}.mlp", h, config.intermediate_size)
    p = f"model.layers.{i}.mlp"
    recipes = (gqa_attention(config, i) + [copy(f"layers.{i}.mlp.router.weight", f"{p}.gate.weight", (config.num_experts, h))]
               + experts(config, i, p, names, ("gate_proj", "up_proj", "down_proj")))
    if config.shared_expert_intermediate_size > 0:
        recipes += swiglu(f"layers.{i}.mlp.shared_expert", f"{p}.shared_expert", h, config.shared_expert_intermediate_size)
        recipes.append(copy(f"layers.{i}.mlp.shared_expert_gate.weight", f"{p}.shared_expert_gate.weight", (1, h)))
    return recipes


FAMILY = HFFamily(("qwen2_moe", "qwen3_moe"), parse, layer_recipes)
