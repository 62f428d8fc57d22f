"""GPT-OSS (``gpt_oss``): attention sinks, alternating sliding-window and full layers, qkv
and output biases, YaRN; a biased router with softmax over the chosen top-k; experts with
biases and a clamped SwiGLU, saved fused with gate and up columns interleaved.

MXFP4 checkpoints (``quantization_config``) are refused; a bf16 export loads.
"""

from __future__ import annotations

from typing import Any

import torch

from inference.config import ModelConfig, RouterConfig
from inference.hf.common import HFFamily, TensorRecipe, base_fields, build_config, copy, get, gqa_attention


def parse(raw: dict[str, Any], problems: list[str]) -> ModelConfig | None:
    base = base_fields(raw, problems, "gpt_oss", eps=1e-5, theta=150000.0,
                       required=("intermediate_size", "num_experts_per_tok", "num_local_experts"))
    if base is None:
        return None
    layers = base["num_layers"]
    layer_types = tuple(get(raw, "layer_types", default=[
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]))
    window = int(get(raw, "sliding_window", default=0))
    width = int(raw["intermediate_size"])
    # softmax over the top-k logits = softmax over all experts, renormalised over the top-k.
    return build_config(
        problems, **base, intermediate_size=width, moe_intermediate_size=width,
        num_experts=int(raw["num_local_experts"]), topk=int(raw["num_experts_per_tok"]), dense_layers=(),
        router=RouterConfig(norm_topk_prob=True, bias=True), attention_bias=bool(raw.get("attention_bias", True)),
        o_proj_bias=bool(raw.get("attention_bias", True)), attention_sinks=True,
        layer_types=layer_types if window > 0 else (), sliding_window=window, expert_activation="swiglu_oai",
        expert_bias=True, swiglu_alpha=float(get(raw, "swiglu_alpha", default=1.702)),
        swiglu_limit=float(get(raw, "swiglu_limit", default=7.0)))


def _split_interleaved(dim: int):
    """Gate and up are interleaved along ``dim`` (even, odd); ours stacks gate then up."""
    def transform(t: torch.Tensor) -> torch.Tensor:
        index = torch.arange(t.shape[dim])
        order = torch.cat([index[0::2], index[1::2]])
        return t.index_select(dim, order)
    return transform


def _gate_up_weight(t: torch.Tensor) -> torch.Tensor:
    """[E, H, 2I] (x @ W, interleaved columns) -> [E, 2I, H] gate rows then up rows."""
    return _split_interleaved(1)(t.transpose(1, 2)).contiguous()


def layer_recipes(config: ModelConfig, i: int, names: set[str], raw: dict[str, Any]) -> list[TensorRecipe]:
    h, e, w = config.hidden_size, config.num_experts, config.moe_intermediate_size
    p, t = f"model.layers.{i}.mlp", f"layers.{i}.mlp"
    return gqa_attention(config, i) + [
        copy(f"{t}.router.weight", f"{p}.router.weight", (e, h)),
        copy(f"{t}.router.bias", f"{p}.router.bias", (e,)),
        copy(f"{t}.w13", f"{p}.experts.gate_up_proj", (e, h, 2 * w), _gate_up_weight),
        copy(f"{t}.b13", f"{p}.experts.gate_up_proj_bias", (e, 2 * w), _split_interleaved(1)),
        copy(f"{t}.w2", f"{p}.experts.down_proj", (e, w, h), lambda x: x.transpose(1, 2).contiguous()),
        copy(f"{t}.b2", f"{p}.experts.down_proj_bias", (e, h)),
    ]


FAMILY = HFFamily(("gpt_oss",), parse, layer_recipes)
