"""DeepSeek-V3 (``deepseek_v3``; Moonlight uses it, Kimi-K2 ships as ``kimi_k2``):
multi-head latent attention, sigmoid scores with an expert-score bias, group-limited top-k
(groups scored by their best two), a shared expert, the first k layers dense, a routed
scaling factor. Next-token-prediction layers (``num_nextn_predict_layers``) are skipped.

Rotary pairs are interleaved in these checkpoints (``rope_interleave``); the rotary rows of
``q_proj`` / ``q_b_proj`` and ``kv_a_proj_with_mqa`` are permuted into the neox layout our
rotary uses, which computes exactly what transformers computes.
"""

from __future__ import annotations

from typing import Any

import torch

from inference.config import MLAConfig, ModelConfig, RouterConfig
from inference.hf.common import (HFFamily, TensorRecipe, base_fields, build_config, copy, experts, first_k_dense, get,
                                 norms, swiglu)


def parse(raw: dict[str, Any], problems: list[str]) -> ModelConfig | None:
    base = base_fields(raw, problems, raw.get("model_type", "deepseek_v3"), required=(
        "intermediate_size", "moe_intermediate_size", "num_experts_per_tok", "n_routed_experts", "kv_lora_rank",
        "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    if base is None:
        return None
    if get(raw, "scoring_func", default="sigmoid") != "sigmoid":
        problems.append(f"scoring_func {raw['scoring_func']!r} is not supported (deepseek_v3 routes with sigmoid)")
    if get(raw, "topk_method", default="noaux_tc") != "noaux_tc":
        problems.append(f"topk_method {raw['topk_method']!r} is not supported (only noaux_tc)")
    if raw.get("attention_bias"):
        problems.append("attention_bias is not supported for multi-head latent attention")
    mla = MLAConfig(kv_lora_rank=int(raw["kv_lora_rank"]), qk_nope_head_dim=int(raw["qk_nope_head_dim"]),
                    qk_rope_head_dim=int(raw["qk_rope_head_dim"]), v_head_dim=int(raw["v_head_dim"]),
                    q_lora_rank=int(raw.get("q_lora_rank") or 0))
    num_groups = int(get(raw, "n_group", default=1))
    router = RouterConfig(score_function="sigmoid", norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
                          use_expert_bias=True, num_groups=num_groups,
                          topk_groups=int(get(raw, "topk_group", default=1)) if num_groups > 1 else 1,
                          scaling_factor=float(get(raw, "routed_scaling_factor", default=1.0)), group_score_topk=2)
    base.update(head_dim=mla.qk_head_dim, num_kv_heads=base["num_heads"])   # unused with MLA
    moe_width = int(raw["moe_intermediate_size"])
    return build_config(
        problems, **base, mla=mla, intermediate_size=int(raw["intermediate_size"]), moe_intermediate_size=moe_width,
        num_experts=int(raw["n_routed_experts"]), topk=int(raw["num_experts_per_tok"]),
        dense_layers=first_k_dense(raw, base["num_layers"], problems, default=3),
        shared_expert_intermediate_size=moe_width * int(get(raw, "n_shared_experts", default=1)), router=router)


def mtp_layers(raw: dict[str, Any]) -> int:
    return int(get(raw, "num_nextn_predict_layers", "num_mtp_layers", default=0))


def rope_rows_to_neox(groups: int, group_dim: int, rope_start: int):
    """Permutes, within each of ``groups`` row groups of ``group_dim`` rows, the rotary rows
    ``rope_start:`` from interleaved pairs (x0, x1, x2, ...) to halves (x0, x2, ...; x1, x3, ...)."""
    rope = group_dim - rope_start
    order = torch.cat([torch.arange(rope_start),
                       rope_start + torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])])

    def transform(w: torch.Tensor) -> torch.Tensor:
        return w.view(groups, group_dim, *w.shape[1:])[:, order].reshape(w.shape)

    return transform


def attention_recipes(config: ModelConfig, i: int, interleaved: bool) -> list[TensorRecipe]:
    m, h, heads = config.mla, config.hidden_size, config.num_heads
    p, t = f"model.layers.{i}.self_attn", f"layers.{i}.self_attn"
    q_rows = heads * m.qk_head_dim
    q_perm = rope_rows_to_neox(heads, m.qk_head_dim, m.qk_nope_head_dim) if interleaved else None
    kv_perm = rope_rows_to_neox(1, m.cache_dim, m.kv_lora_rank) if interleaved else None
    if m.q_lora_rank:
        recipes = [copy(f"{t}.q_a_proj.weight", f"{p}.q_a_proj.weight", (m.q_lora_rank, h)),
                   copy(f"{t}.q_a_layernorm.weight", f"{p}.q_a_layernorm.weight", (m.q_lora_rank,)),
                   copy(f"{t}.q_b_proj.weight", f"{p}.q_b_proj.weight", (q_rows, m.q_lora_rank), q_perm)]
    else:
        recipes = [copy(f"{t}.q_proj.weight", f"{p}.q_proj.weight", (q_rows, h), q_perm)]
    return recipes + [
        copy(f"{t}.kv_a_proj_with_mqa.weight", f"{p}.kv_a_proj_with_mqa.weight", (m.cache_dim, h), kv_perm),
        copy(f"{t}.kv_a_layernorm.weight", f"{p}.kv_a_layernorm.weight", (m.kv_lora_rank,)),
        copy(f"{t}.kv_b_proj.weight", f"{p}.kv_b_proj.weight",
             (heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)),
        copy(f"{t}.o_proj.weight", f"{p}.o_proj.weight", (h, heads * m.v_head_dim)),
    ] + norms(i, h)


def moe_recipes(config: ModelConfig, i: int, names: set[str]) -> list[TensorRecipe]:
    """Router (+ its score-correction bias), routed experts and shared experts of ``mlp``,
    the layout DeepSeek-V3 and GLM-4.5 share."""
    h, e = config.hidden_size, config.num_experts
    p = f"model.layers.{i}.mlp"
    if i in config.dense_layers:
        return swiglu(f"layers.{i}.mlp", p, h, config.intermediate_size)
    recipes = [copy(f"layers.{i}.mlp.router.weight", f"{p}.gate.weight", (e, h)),
               copy(f"layers.{i}.mlp.router.expert_bias", f"{p}.gate.e_score_correction_bias", (e,))]
    recipes += experts(config, i, p, names, ("gate_proj", "up_proj", "down_proj"))
    if config.shared_expert_intermediate_size:
        recipes += swiglu(f"layers.{i}.mlp.shared_expert", f"{p}.shared_experts", h,
                          config.shared_expert_intermediate_size)
    return recipes


def layer_recipes(config: ModelConfig, i: int, names: set[str], raw: dict[str, Any]) -> list[TensorRecipe]:
    return attention_recipes(config, i, bool(raw.get("rope_interleave", True))) + moe_recipes(config, i, names)


FAMILY = HFFamily(("deepseek_v3", "kimi_k2"), parse, layer_recipes, mtp_layers)
