"""Mixtral (``mixtral``): softmax top-k renormalised, every layer MoE, no shared expert."""

from __future__ import annotations

from typing import Any

from inference.config import ModelConfig, RouterConfig
from inference.hf.common import (HFFamily, TensorRecipe, base_fields, build_config, copy, experts, get, gqa_attention,
                                 moe_prefix)

PREFIXES = ("block_sparse_moe", "mlp")   # classic first; transformers 5 fused saves use ``mlp``


def capped_max_positions(raw: dict[str, Any], windowed_default: bool) -> int:
    """A sliding window wider than every sequence is plain causal attention, so capping the
    context at the window keeps the model exact without windowed layers."""
    limit = int(raw.get("max_position_embeddings") or 4096)
    window = raw.get("sliding_window")
    if raw.get("use_sliding_window", windowed_default) and isinstance(window, int) and window > 0:
        limit = min(limit, window)
    return limit


def parse(raw: dict[str, Any], problems: list[str]) -> ModelConfig | None:
    base = base_fields(raw, problems, "mixtral", required=("intermediate_size", "num_experts_per_tok"))
    if base is None:
        return None
    num_experts = int(get(raw, "num_local_experts", "num_experts", default=0))
    if num_experts <= 0:
        problems.append("the config has no MoE layer (num_local_experts)")
    base["max_position_embeddings"] = capped_max_positions(raw, windowed_default=True)
    return build_config(problems, **base, intermediate_size=int(raw["intermediate_size"]),
                        moe_intermediate_size=int(raw["intermediate_size"]), num_experts=num_experts,
                        topk=int(raw["num_experts_per_tok"]), dense_layers=(), router=RouterConfig(norm_topk_prob=True),
                        attention_bias=bool(raw.get("attention_bias", False)))


def layer_recipes(config: ModelConfig, i: int, names: set[str], raw: dict[str, Any]) -> list[TensorRecipe]:
    p = moe_prefix(PREFIXES, names, i)
    return (gqa_attention(config, i)
            + [copy(f"layers.{i}.mlp.router.weight", f"{p}.gate.weight", (config.num_experts, config.hidden_size))]
            + experts(config, i, p, names, ("w1", "w3", "w2")))


FAMILY = HFFamily(("mixtral",), parse, layer_recipes)
