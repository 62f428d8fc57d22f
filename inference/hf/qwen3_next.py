"""Qwen3-Next (``qwen3_next``) and Qwen3.5-MoE (``qwen3_5_moe``, the text model of the
multimodal checkpoint; ``qwen3_5_moe_text``, a text-only export): Gated DeltaNet layers with
one full-attention layer in every ``full_attention_interval`` (4), attention with a sigmoid
output gate, per-head q/k norms and partial rotary (a quarter of the head by default),
zero-centred RMSNorms (``1 + w``), softmax top-k over 256-512 experts with a gated shared
expert. Qwen3-Next may have dense layers (``mlp_only_layers`` / ``decoder_sparse_step``);
Qwen3.5 has MoE everywhere and always renormalises the top-k.

Qwen3.5's text rotary is multimodal (mrope), but for text the three position streams are
equal and it is the plain partial rotary. The vision tower (``model.visual.*``) is skipped
with a log line; next-token-prediction layers (``mtp.*``) are skipped and never routed.
Projection layouts: Qwen3-Next fuses ``in_proj_qkvz`` / ``in_proj_ba`` per key head (rows
reordered when loaded), Qwen3.5 keeps ``in_proj_qkv`` / ``z`` / ``b`` / ``a``; attention
``q_proj`` interleaves each head's query and gate rows (split when loaded).
"""

from __future__ import annotations

from typing import Any

import torch

from inference.config import ModelConfig, RouterConfig
from inference.hf.common import (HFFamily, TensorRecipe, base_fields, build_config, copy, experts, get,
                                 partial_rotary_dim, swiglu)
from inference.hf.qwen_moe import moe_layers
from inference.model.recurrent.gated_deltanet import fused_in_proj_from_hf
from inference.recurrent_config import DENSE, FULL_ATTENTION, GATED_DELTANET, MOE, GatedDeltaNetConfig

MULTIMODAL = "qwen3_5_moe"
LAYER_KINDS = {"linear_attention": GATED_DELTANET, "full_attention": FULL_ATTENTION}


def text_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The text model's config: ``text_config`` of a multimodal checkpoint (whose top level
    decides the embedding tie), else the whole config."""
    if raw.get("model_type") != MULTIMODAL:
        return raw
    text = dict(raw.get("text_config") or {})
    text["model_type"] = MULTIMODAL
    if "tie_word_embeddings" in raw:
        text["tie_word_embeddings"] = raw["tie_word_embeddings"]
    text.setdefault("eos_token_id", raw.get("eos_token_id"))
    return text


def _layer_types(raw: dict[str, Any], num_layers: int, problems: list[str]) -> tuple[str, ...]:
    names = raw.get("layer_types")
    if names is None:
        interval = int(get(raw, "full_attention_interval", default=4))
        names = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)]
    unknown = sorted(set(names) - set(LAYER_KINDS))
    if unknown or len(names) != num_layers:
        problems.append(f"layer_types {unknown or names} not supported (expected {num_layers} of {sorted(LAYER_KINDS)})")
        return ()
    return tuple(LAYER_KINDS[n] for n in names)


def parse(raw: dict[str, Any], problems: list[str]) -> ModelConfig | None:
    text = text_config(raw)
    qwen35 = raw.get("model_type") != "qwen3_next"
    required = ("moe_intermediate_size", "num_experts_per_tok", "num_experts", "linear_num_key_heads",
                "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim")
    base = base_fields(text, problems, raw.get("model_type", "qwen3_next"),
                       required=required + (() if qwen35 else ("intermediate_size",)))
    if base is None:
        return None
    num_layers = base["num_layers"]
    layer_types = _layer_types(text, num_layers, problems)
    sparse = set(range(num_layers)) if qwen35 else set(moe_layers(text, num_layers))
    mlp_types = tuple(MOE if i in sparse else DENSE for i in range(num_layers))
    gdn = GatedDeltaNetConfig(
        num_k_heads=int(text["linear_num_key_heads"]), num_v_heads=int(text["linear_num_value_heads"]),
        head_k_dim=int(text["linear_key_head_dim"]), head_v_dim=int(text["linear_value_head_dim"]),
        conv_kernel=int(get(text, "linear_conv_kernel_dim", default=4)), norm_eps=base["rms_norm_eps"])
    shared = int(get(text, "shared_expert_intermediate_size", default=0))
    return build_config(
        problems, **base, rotary_dim=partial_rotary_dim(text, base["head_dim"], default_factor=0.25),
        intermediate_size=int(get(text, "intermediate_size", default=text["moe_intermediate_size"])),
        moe_intermediate_size=int(text["moe_intermediate_size"]), num_experts=int(text["num_experts"]),
        topk=int(text["num_experts_per_tok"]), layer_types=layer_types, mlp_types=mlp_types,
        dense_layers=tuple(i for i, k in enumerate(mlp_types) if k == DENSE),
        shared_expert_intermediate_size=shared, shared_expert_gate=shared > 0,
        router=RouterConfig(norm_topk_prob=True if qwen35 else bool(text.get("norm_topk_prob", True))),
        qk_norm="per_head", attention_bias=bool(text.get("attention_bias", False)), attention_output_gate=True,
        zero_centered_norms=True, gated_deltanet=gdn)


def mtp_layers(raw: dict[str, Any]) -> int:
    return int(get(text_config(raw), "mtp_num_hidden_layers", "num_nextn_predict_layers", default=0))


def prefix(names: set[str]) -> str:
    """Where the text model's tensors live: ``model.language_model`` in a multimodal
    checkpoint, ``model`` otherwise."""
    return "model.language_model" if "model.language_model.embed_tokens.weight" in names else "model"


def outer_names(names: set[str]) -> tuple[str, str]:
    p = prefix(names)
    return f"{p}.embed_tokens.weight", f"{p}.norm.weight"


def skipped(names: set[str]) -> dict[str, list[str]]:
    vision = sorted(n for n in names if n.startswith("model.visual."))
    return {"the vision tower (only the text model is served)": vision} if vision else {}


def _split_heads(heads: int, head_dim: int, part: int):
    """Rows of each head's [query; gate] block in ``q_proj``: part 0 (query) or 1 (gate)."""
    def transform(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(heads, 2, head_dim, *t.shape[1:])[:, part].reshape(heads * head_dim, *t.shape[1:])
    return transform


def attention_recipes(config: ModelConfig, p: str, t: str) -> list[TensorRecipe]:
    h, d, heads = config.hidden_size, config.head_dim, config.num_heads
    q, kv = heads * d, config.num_kv_heads * d
    query = _split_heads(heads, d, 0)

    def qkv(w: torch.Tensor) -> torch.Tensor:
        return torch.cat([query(w[: 2 * q]), w[2 * q:]])

    recipes = [TensorRecipe(f"{t}.qkv_proj.weight", ((f"{p}.q_proj.weight", (2 * q, h)),
                                                     (f"{p}.k_proj.weight", (kv, h)), (f"{p}.v_proj.weight", (kv, h))),
                            transform=qkv),
               copy(f"{t}.output_gate_proj.weight", f"{p}.q_proj.weight", (2 * q, h), _split_heads(heads, d, 1)),
               copy(f"{t}.o_proj.weight", f"{p}.o_proj.weight", (h, q)),
               copy(f"{t}.q_norm.weight", f"{p}.q_norm.weight", (d,)),
               copy(f"{t}.k_norm.weight", f"{p}.k_norm.weight", (d,))]
    if config.attention_bias:
        recipes += [TensorRecipe(f"{t}.qkv_proj.bias", ((f"{p}.q_proj.bias", (2 * q,)), (f"{p}.k_proj.bias", (kv,)),
                                                        (f"{p}.v_proj.bias", (kv,))), transform=qkv),
                    copy(f"{t}.output_gate_proj.bias", f"{p}.q_proj.bias", (2 * q,), _split_heads(heads, d, 1))]
    return recipes


def gated_deltanet_recipes(config: ModelConfig, p: str, t: str, names: set[str]) -> list[TensorRecipe]:
    c, h = config.gated_deltanet, config.hidden_size
    if f"{p}.in_proj_qkvz.weight" in names:    # Qwen3-Next: per-key-head interleaved
        rows = 2 * c.key_dim + 2 * c.value_dim

        def fuse(w: torch.Tensor) -> torch.Tensor:
            return fused_in_proj_from_hf({"in_proj_qkvz.weight": w[:rows], "in_proj_ba.weight": w[rows:]}, c)
        in_proj = TensorRecipe(f"{t}.in_proj.weight", ((f"{p}.in_proj_qkvz.weight", (rows, h)),
                                                       (f"{p}.in_proj_ba.weight", (2 * c.num_v_heads, h))),
                               transform=fuse)
    else:
        in_proj = TensorRecipe(f"{t}.in_proj.weight", tuple((f"{p}.in_proj_{n}.weight", (size, h)) for n, size in (
            ("qkv", c.conv_dim), ("z", c.value_dim), ("b", c.num_v_heads), ("a", c.num_v_heads))))
    return [in_proj,
            copy(f"{t}.conv_weight", f"{p}.conv1d.weight", (c.conv_dim, 1, c.conv_kernel), lambda w: w[:, 0]),
            copy(f"{t}.dt_bias", f"{p}.dt_bias", (c.num_v_heads,)),
            copy(f"{t}.A_log", f"{p}.A_log", (c.num_v_heads,)),
            copy(f"{t}.norm.weight", f"{p}.norm.weight", (c.head_v_dim,)),
            copy(f"{t}.out_proj.weight", f"{p}.out_proj.weight", (h, c.value_dim))]


def mlp_recipes(config: ModelConfig, i: int, p: str, names: set[str]) -> list[TensorRecipe]:
    h, t = config.hidden_size, f"layers.{i}.mlp"
    if config.mlp_types[i] == DENSE:
        return swiglu(t, p, h, config.intermediate_size)
    recipes = [copy(f"{t}.router.weight", f"{p}.gate.weight", (config.num_experts, h))]
    recipes += experts(config, i, p, names, ("gate_proj", "up_proj", "down_proj"))
    if config.shared_expert_intermediate_size:
        recipes += swiglu(f"{t}.shared_expert", f"{p}.shared_expert", h, config.shared_expert_intermediate_size)
        recipes.append(copy(f"{t}.shared_expert_gate.weight", f"{p}.shared_expert_gate.weight", (1, h)))
    return recipes


def layer_recipes(config: ModelConfig, i: int, names: set[str], raw: dict[str, Any]) -> list[TensorRecipe]:
    p, t, h = f"{prefix(names)}.layers.{i}", f"layers.{i}", config.hidden_size
    recipes = [copy(f"{t}.input_layernorm.weight", f"{p}.input_layernorm.weight", (h,)),
               copy(f"{t}.post_attention_layernorm.weight", f"{p}.post_attention_layernorm.weight", (h,))]
    if config.layer_types[i] == GATED_DELTANET:
        recipes += gated_deltanet_recipes(config, f"{p}.linear_attn", f"{t}.mixer", names)
    else:
        recipes += attention_recipes(config, f"{p}.self_attn", f"{t}.self_attn")
    return recipes + mlp_recipes(config, i, f"{p}.mlp", names)


FAMILY = HFFamily(("qwen3_next", MULTIMODAL, "qwen3_5_moe_text"), parse, layer_recipes, mtp_layers,
                  outer_names=outer_names, skipped=skipped)
