"""Nemotron-H (``nemotron_h``; NVIDIA Nemotron-3 Nano): blocks of one kind each, in the
order of ``layers_block_type`` (or the legacy ``hybrid_override_pattern``: M Mamba2,
* attention, E MoE, - dense MLP), each a pre-norm and a residual. Attention has no rotary
embedding and no q/k norm; every MLP is a non-gated relu^2 (routed experts, the shared
expert, dense blocks); the router is sigmoid + score-correction bias, optionally
group-limited (groups scored by their best two), renormalised and scaled.

Tensors are saved under ``backbone.`` (the original format transformers writes) or
``model.``; experts per expert or fused (``experts.up_proj`` [E, I, H]). MoE latent
projections (``moe_latent_size``) and MLP biases are refused; next-token-prediction layers
(``mtp.*``) are skipped and never routed.
"""

from __future__ import annotations

from typing import Any

from inference.config import ModelConfig, RouterConfig
from inference.hf.common import HFFamily, TensorRecipe, base_fields, build_config, copy, get
from inference.recurrent_config import DENSE, FULL_ATTENTION, MAMBA2, MOE, NO_MIXER, NO_MLP, Mamba2Config

PATTERN = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}
LEGACY = {"mamba": "linear_attention", "attention": "full_attention"}
# block type -> (our mixer kind, our MLP kind)
KINDS = {"linear_attention": (MAMBA2, NO_MLP), "full_attention": (FULL_ATTENTION, NO_MLP),
         "moe": (NO_MIXER, MOE), "mlp": (NO_MIXER, DENSE)}


def block_types(raw: dict[str, Any], problems: list[str]) -> list[str]:
    blocks = raw.get("layers_block_type")
    if blocks is None and isinstance(raw.get("hybrid_override_pattern"), str):
        pattern = raw["hybrid_override_pattern"]
        blocks = [PATTERN.get(c, c) for c in pattern]
    if not blocks:
        problems.append("config.json lacks layers_block_type (or hybrid_override_pattern)")
        return []
    blocks = [LEGACY.get(b, b) for b in blocks]
    unknown = sorted(set(blocks) - set(KINDS))
    if unknown:
        problems.append(f"block types {unknown} are not supported (expected {sorted(KINDS)})")
        return []
    return blocks


def _refusals(raw: dict[str, Any], problems: list[str]) -> None:
    if raw.get("moe_latent_size") is not None:
        problems.append("moe_latent_size (latent MoE projections) is not supported")
    if raw.get("mlp_bias"):
        problems.append("mlp_bias is not supported")
    for key, want in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
        if get(raw, key, default=want) != want:
            problems.append(f"{key} {raw[key]!r} is not supported (only {want})")


def mamba_config(raw: dict[str, Any], eps: float) -> Mamba2Config:
    """transformers' NemotronHMamba2Mixer: dt clamped below at time_step_min, no upper bound."""
    return Mamba2Config(
        num_heads=int(raw["mamba_num_heads"]), head_dim=int(raw["mamba_head_dim"]),
        state_size=int(raw["ssm_state_size"]), n_groups=int(get(raw, "n_groups", "mamba_n_groups", default=8)),
        conv_kernel=int(get(raw, "conv_kernel", "mamba_d_conv", default=4)),
        chunk_size=int(get(raw, "chunk_size", "mamba_chunk_size", default=128)),
        use_conv_bias=bool(get(raw, "use_conv_bias", "mamba_conv_bias", default=True)),
        use_bias=bool(raw.get("use_bias", False)), norm_eps=eps,
        dt_min=float(get(raw, "time_step_min", "mamba_dt_min", default=0.001)))


def parse(raw: dict[str, Any], problems: list[str]) -> ModelConfig | None:
    blocks = block_types(raw, problems)
    raw = {**raw, "num_hidden_layers": len(blocks) or raw.get("num_hidden_layers")}
    base = base_fields(raw, problems, "nemotron_h", required=(
        "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "mamba_num_heads", "mamba_head_dim",
        "ssm_state_size"))
    _refusals(raw, problems)
    if base is None or not blocks:
        return None
    base["rms_norm_eps"] = float(get(raw, "layer_norm_epsilon", default=1e-5))
    layer_types = tuple(KINDS[b][0] for b in blocks)
    mlp_types = tuple(KINDS[b][1] for b in blocks)
    num_groups = int(get(raw, "n_group", default=1))
    router = RouterConfig(score_function="sigmoid", norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
                          use_expert_bias=True, num_groups=num_groups,
                          topk_groups=int(get(raw, "topk_group", default=1)) if num_groups > 1 else 1,
                          scaling_factor=float(get(raw, "routed_scaling_factor", default=1.0)), group_score_topk=2)
    return build_config(
        problems, **base, intermediate_size=int(get(raw, "intermediate_size", default=21504)),   # transformers' default
        moe_intermediate_size=int(raw["moe_intermediate_size"]), num_experts=int(raw["n_routed_experts"]),
        topk=int(raw["num_experts_per_tok"]), layer_types=layer_types, mlp_types=mlp_types,
        dense_layers=tuple(i for i, k in enumerate(mlp_types) if k == DENSE),
        shared_expert_intermediate_size=int(get(raw, "moe_shared_expert_intermediate_size", default=0)),
        router=router, use_rope=False, expert_activation="relu2", mamba2=mamba_config(raw, base["rms_norm_eps"]))


def mtp_layers(raw: dict[str, Any]) -> int:
    return int(get(raw, "num_nextn_predict_layers", default=0))


def prefix(names: set[str]) -> str:
    return "backbone" if "backbone.embeddings.weight" in names else "model"


def outer_names(names: set[str]) -> tuple[str, str]:
    p = prefix(names)
    return f"{p}.embeddings.weight", f"{p}.norm_f.weight"


def mamba_recipes(config: ModelConfig, p: str, t: str) -> list[TensorRecipe]:
    c, h = config.mamba2, config.hidden_size
    recipes = [copy(f"{t}.in_proj.weight", f"{p}.in_proj.weight", (c.in_proj_size, h)),
               copy(f"{t}.conv_weight", f"{p}.conv1d.weight", (c.conv_dim, 1, c.conv_kernel), lambda w: w[:, 0]),
               copy(f"{t}.out_proj.weight", f"{p}.out_proj.weight", (h, c.intermediate_size)),
               copy(f"{t}.norm.weight", f"{p}.norm.weight", (c.intermediate_size,))]
    recipes += [copy(f"{t}.{n}", f"{p}.{n}", (c.num_heads,)) for n in ("dt_bias", "A_log", "D")]
    if c.use_conv_bias:
        recipes.append(copy(f"{t}.conv_bias", f"{p}.conv1d.bias", (c.conv_dim,)))
    if c.use_bias:
        recipes += [copy(f"{t}.in_proj.bias", f"{p}.in_proj.bias", (c.in_proj_size,)),
                    copy(f"{t}.out_proj.bias", f"{p}.out_proj.bias", (h,))]
    return recipes


def attention_recipes(config: ModelConfig, p: str, t: str) -> list[TensorRecipe]:
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_heads * d, config.num_kv_heads * d
    return [TensorRecipe(f"{t}.qkv_proj.weight", ((f"{p}.q_proj.weight", (q, h)), (f"{p}.k_proj.weight", (kv, h)),
                                                  (f"{p}.v_proj.weight", (kv, h)))),
            copy(f"{t}.o_proj.weight", f"{p}.o_proj.weight", (h, q))]


def relu2_mlp(t: str, p: str, hidden: int, width: int) -> list[TensorRecipe]:
    return [copy(f"{t}.up_proj.weight", f"{p}.up_proj.weight", (width, hidden)),
            copy(f"{t}.down_proj.weight", f"{p}.down_proj.weight", (hidden, width))]


def moe_recipes(config: ModelConfig, p: str, t: str, names: set[str]) -> list[TensorRecipe]:
    h, e, w = config.hidden_size, config.num_experts, config.moe_intermediate_size
    recipes = [copy(f"{t}.router.weight", f"{p}.gate.weight", (e, h)),
               copy(f"{t}.router.expert_bias", f"{p}.gate.e_score_correction_bias", (e,))]
    if f"{p}.experts.up_proj" in names:
        recipes += [copy(f"{t}.w13", f"{p}.experts.up_proj", (e, w, h)),
                    copy(f"{t}.w2", f"{p}.experts.down_proj", (e, h, w))]
    else:
        recipes += [TensorRecipe(f"{t}.w13", tuple((f"{p}.experts.{x}.up_proj.weight", (w, h)) for x in range(e)),
                                 "stack"),
                    TensorRecipe(f"{t}.w2", tuple((f"{p}.experts.{x}.down_proj.weight", (h, w)) for x in range(e)),
                                 "stack")]
    if config.shared_expert_intermediate_size:
        recipes += relu2_mlp(f"{t}.shared_expert", f"{p}.shared_experts", h, config.shared_expert_intermediate_size)
    return recipes


def layer_recipes(config: ModelConfig, i: int, names: set[str], raw: dict[str, Any]) -> list[TensorRecipe]:
    p, t, h = f"{prefix(names)}.layers.{i}", f"layers.{i}", config.hidden_size
    mixer, mlp = config.layer_types[i], config.mlp_types[i]
    norm = "input_layernorm" if mixer != NO_MIXER else "post_attention_layernorm"
    recipes = [copy(f"{t}.{norm}.weight", f"{p}.norm.weight", (h,))]
    if mixer == MAMBA2:
        return recipes + mamba_recipes(config, f"{p}.mixer", f"{t}.mixer")
    if mixer == FULL_ATTENTION:
        return recipes + attention_recipes(config, f"{p}.mixer", f"{t}.self_attn")
    if mlp == MOE:
        return recipes + moe_recipes(config, f"{p}.mixer", f"{t}.mlp", names)
    return recipes + relu2_mlp(f"{t}.mlp", f"{p}.mixer", h, config.intermediate_size)


FAMILY = HFFamily(("nemotron_h",), parse, layer_recipes, mtp_layers, outer_names=outer_names)
