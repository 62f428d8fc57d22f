"""GLM-4.5 / 4.6 (``glm4_moe``): grouped-query attention with partial rotary (half the head
by default), qkv bias and optional per-head q/k norm; the MoE layout of DeepSeek-V3
(sigmoid + score-correction bias, groups scored by their best two, shared experts, the first
k layers dense, routed scaling). Next-token-prediction layers are skipped."""

from __future__ import annotations

from typing import Any

from inference.config import ModelConfig, RouterConfig
from inference.hf.common import HFFamily, TensorRecipe, base_fields, build_config, first_k_dense, get, gqa_attention, \
    partial_rotary_dim
from inference.hf.deepseek_v3 import moe_recipes, mtp_layers


def parse(raw: dict[str, Any], problems: list[str]) -> ModelConfig | None:
    base = base_fields(raw, problems, "glm4_moe", eps=1e-5, required=(
        "intermediate_size", "moe_intermediate_size", "num_experts_per_tok", "n_routed_experts"))
    if base is None:
        return None
    num_groups = int(get(raw, "n_group", default=1))
    router = RouterConfig(score_function="sigmoid", norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
                          use_expert_bias=True, num_groups=num_groups,
                          topk_groups=int(get(raw, "topk_group", default=1)) if num_groups > 1 else 1,
                          scaling_factor=float(get(raw, "routed_scaling_factor", default=1.0)), group_score_topk=2)
    moe_width = int(raw["moe_intermediate_size"])
    return build_config(
        problems, **base, rotary_dim=partial_rotary_dim(raw, base["head_dim"], default_factor=0.5),
        intermediate_size=int(raw["intermediate_size"]), moe_intermediate_size=moe_width,
        num_experts=int(raw["n_routed_experts"]), topk=int(raw["num_experts_per_tok"]),
        dense_layers=first_k_dense(raw, base["num_layers"], problems, default=1),
        shared_expert_intermediate_size=moe_width * int(get(raw, "n_shared_experts", default=1)), router=router,
        qk_norm="per_head" if raw.get("use_qk_norm") else "none", attention_bias=bool(raw.get("attention_bias", False)))


def layer_recipes(config: ModelConfig, i: int, names: set[str], raw: dict[str, Any]) -> list[TensorRecipe]:
    return gqa_attention(config, i) + moe_recipes(config, i, names)


FAMILY = HFFamily(("glm4_moe",), parse, layer_recipes, mtp_layers)
