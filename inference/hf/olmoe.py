"""OLMoE (``olmoe``): q/k norm over the whole projection, softmax top-k, every layer MoE."""

from __future__ import annotations

from typing import Any

from inference.config import ModelConfig, RouterConfig
from inference.hf.common import HFFamily, TensorRecipe, base_fields, build_config, copy, experts, get, gqa_attention


def parse(raw: dict[str, Any], problems: list[str]) -> ModelConfig | None:
    base = base_fields(raw, problems, "olmoe", required=("intermediate_size", "num_experts_per_tok"))
    if base is None:
        return None
    if raw.get("clip_qkv") is not None:
        problems.append("olmoe clip_qkv is not supported")
    num_experts = int(get(raw, "num_experts", "num_local_experts", default=0))
    if num_experts <= 0:
        problems.append("the config has no MoE layer (num_experts)")
    return build_config(problems, **base, intermediate_size=int(raw["intermediate_size"]),
                        moe_intermediate_size=int(raw["intermediate_size"]), num_experts=num_experts,
                        topk=int(raw["num_experts_per_tok"]), dense_layers=(),
                        router=RouterConfig(norm_topk_prob=bool(raw.get("norm_topk_prob", False))), qk_norm="full",
                        attention_bias=bool(raw.get("attention_bias", False)))


def layer_recipes(config: ModelConfig, i: int, names: set[str], raw: dict[str, Any]) -> list[TensorRecipe]:
    p = f"model.layers.{i}.mlp"
    return (gqa_attention(config, i)
            + [copy(f"layers.{i}.mlp.router.weight", f"{p}.gate.weight", (config.num_experts, config.hidden_size))]
            + experts(config, i, p, names, ("gate_proj", "up_proj", "down_proj")))


FAMILY = HFFamily(("olmoe",), parse, layer_recipes)
