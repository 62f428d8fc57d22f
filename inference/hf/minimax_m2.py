"""MiniMax-M2 (``minimax_m2``): q/k RMSNorm over the whole projection, partial rotary
(``rotary_dim`` or ``partial_rotary_factor``), sigmoid scores with a score-correction bias
(stored on the MoE block), top-k always renormalised, every layer MoE, no shared expert.

The released checkpoints are FP8 (``quantization_config``) and are refused; a bf16 export
loads.
"""

from __future__ import annotations

from typing import Any

from inference.config import ModelConfig, RouterConfig
from inference.hf.common import (HFFamily, TensorRecipe, base_fields, build_config, copy, experts, gqa_attention,
                                 moe_prefix, partial_rotary_dim)
from inference.hf.mixtral import PREFIXES


def parse(raw: dict[str, Any], problems: list[str]) -> ModelConfig | None:
    base = base_fields(raw, problems, "minimax_m2", theta=5000000.0,
                       required=("intermediate_size", "num_experts_per_tok", "num_local_experts"))
    if base is None:
        return None
    if raw.get("scoring_func", "sigmoid") != "sigmoid":
        problems.append(f"scoring_func {raw['scoring_func']!r} is not supported (minimax_m2 routes with sigmoid)")
    if raw.get("use_qk_norm", True) is False or raw.get("qk_norm_type", "per_layer") != "per_layer":
        problems.append("minimax_m2 without per_layer q/k norm is not supported")
    width = int(raw["intermediate_size"])
    return build_config(
        problems, **base, rotary_dim=partial_rotary_dim(raw, base["head_dim"]), intermediate_size=width,
        moe_intermediate_size=width, num_experts=int(raw["num_local_experts"]), topk=int(raw["num_experts_per_tok"]),
        dense_layers=(), router=RouterConfig(score_function="sigmoid", norm_topk_prob=True, use_expert_bias=True),
        qk_norm="full")


def layer_recipes(config: ModelConfig, i: int, names: set[str], raw: dict[str, Any]) -> list[TensorRecipe]:
    e, h = config.num_experts, config.hidden_size
    p = moe_prefix(PREFIXES, names, i)
    return gqa_attention(config, i) + [
        copy(f"layers.{i}.mlp.router.weight", f"{p}.gate.weight", (e, h)),
        copy(f"layers.{i}.mlp.router.expert_bias", f"{p}.e_score_correction_bias", (e,)),
    ] + experts(config, i, p, names, ("w1", "w3", "w2"))


FAMILY = HFFamily(("minimax_m2",), parse, layer_recipes)
