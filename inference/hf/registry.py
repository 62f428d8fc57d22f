"""config.json -> (ModelConfig, family) and every parameter's checkpoint recipe.

Families are keyed by ``model_type``; each lives in its own module of this package.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from inference.config import ModelConfig
from inference.hf import deepseek_v3, glm4_moe, gpt_oss, minimax_m2, mixtral, nemotron_h, olmoe, qwen3_next, qwen_moe
from inference.hf.common import HFCheckpointError, HFFamily, TensorRecipe, copy

FAMILIES = MappingProxyType({model_type: module.FAMILY
                             for module in (mixtral, qwen_moe, olmoe, deepseek_v3, glm4_moe, gpt_oss, minimax_m2,
                                            qwen3_next, nemotron_h)
                             for model_type in module.FAMILY.model_types})
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
REFUSED = MappingProxyType({
    "deepseek_v2": "DeepSeek-V2's softmax group-limited router is not implemented (deepseek_v3 and kimi_k2 are)",
})


def parse_hf_config(raw: dict[str, Any], where: str = "config.json") -> tuple[ModelConfig, HFFamily]:
    """Our ModelConfig for a transformers config.json dict; raises HFCheckpointError listing
    every unsupported setting."""
    model_type = raw.get("model_type")
    if model_type in REFUSED:
        raise HFCheckpointError(where, [f"architecture {model_type!r} is not supported: {REFUSED[model_type]}"])
    if model_type not in FAMILIES:
        raise HFCheckpointError(where, [f"unsupported architecture {model_type!r} (model_type); "
                                        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"])
    problems: list[str] = []
    family = FAMILIES[model_type]
    config = family.parse(raw, problems)
    if problems or config is None:
        raise HFCheckpointError(where, problems or ["the config could not be read"])
    return config, family


def model_recipes(config: ModelConfig, family: HFFamily, names: set[str], raw: dict[str, Any]) -> list[TensorRecipe]:
    """Every parameter of MoEGPT(config), in model order, with its checkpoint sources."""
    h, v = config.hidden_size, config.vocab_size
    embed, norm = family.outer_names(names)
    recipes = [copy("embed_tokens.weight", embed, (v, h))]
    for i in range(config.num_layers):
        recipes += family.layer_recipes(config, i, names, raw)
    recipes.append(copy("norm.weight", norm, (h,)))
    if not config.tie_word_embeddings:
        recipes.append(copy("lm_head.weight", "lm_head.weight", (v, h)))
    return recipes


def mtp_tensors(config: ModelConfig, family: HFFamily, names: set[str], raw: dict[str, Any]) -> list[str]:
    """Tensors of next-token-prediction layers (stored as decoder layers past the last one,
    or under ``mtp.`` as Qwen3-Next, Qwen3.5 and Nemotron-H store them)."""
    extra = family.mtp_layers(raw)
    prefixes = tuple(f"model.layers.{config.num_layers + j}." for j in range(extra)) + (("mtp.",) if extra else ())
    return sorted(n for n in names if prefixes and n.startswith(prefixes))
