"""Tiny random transformers hybrid models (Qwen3-Next, Qwen3.5-MoE with its vision tower,
Nemotron-H) and what transformers routes; shared by the loader and replay tests.

Weights have realistic scale (1/sqrt(fan_in) matrices, norms near their identity scale,
decays and time steps in the ranges trained models have, score-correction biases of 0.1),
so routers make decisive choices and recurrences neither vanish nor explode.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.inference.hf.families import routed_forward  # noqa: E402

VOCAB = 160
ATTENTION = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 max_position_embeddings=256, eos_token_id=1, pad_token_id=0, bos_token_id=2)
GDN = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
           linear_conv_kernel_dim=4)
QWEN_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24)
VISION = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32, patch_size=4,
              num_position_embeddings=16)
NEMOTRON = dict(mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2, conv_kernel=4, chunk_size=8,
                n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
                moe_shared_expert_intermediate_size=24, intermediate_size=40, routed_scaling_factor=2.5)
# Qwen3-Next: 4 layers (3 GDN + 1 attention), layer 1 dense; Nemotron-H: every block kind, groups.
QWEN3_NEXT_LAYERS = dict(num_hidden_layers=4, mlp_only_layers=[1], intermediate_size=40)
NEMOTRON_BLOCKS = ["linear_attention", "moe", "full_attention", "moe", "mlp", "linear_attention", "moe"]


def qwen3_next_config(**overrides):
    return transformers.Qwen3NextConfig(**{**ATTENTION, **GDN, **QWEN_MOE, **QWEN3_NEXT_LAYERS, **overrides})


def qwen3_5_moe_config(vision: bool = True, **overrides):
    text = {**ATTENTION, **GDN, **QWEN_MOE, "num_hidden_layers": 4, **overrides}
    if not vision:
        return transformers.Qwen3_5MoeTextConfig(**text)
    return transformers.Qwen3_5MoeConfig(text_config=text, vision_config=VISION)


def nemotron_h_config(**overrides):
    kwargs = {**ATTENTION, **NEMOTRON, "layers_block_type": NEMOTRON_BLOCKS, "n_group": 2, "topk_group": 1,
              **overrides}
    return transformers.NemotronHConfig(**kwargs)


MODELS = {
    "qwen3_next": (qwen3_next_config, "Qwen3NextForCausalLM"),
    "qwen3_5_moe": (qwen3_5_moe_config, "Qwen3_5MoeForConditionalGeneration"),
    "nemotron_h": (nemotron_h_config, "NemotronHForCausalLM"),
}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("A_log"):
            p.copy_(torch.empty(p.shape).uniform_(1.0, 8.0, generator=gen).log())
        elif name.endswith("dt_bias"):
            p.copy_(torch.empty(p.shape).uniform_(-1.0, 1.0, generator=gen))
        elif name.endswith(".D"):
            p.copy_(1.0 + 0.5 * noise)
        elif "norm" in name:
            # zero-centred norms (weight initialised to 0) scale by 1 + w: keep both near 1
            p.copy_((0.0 if torch.all(p == 0) else 1.0) + 0.1 * noise)
        else:
            p.copy_(noise / math.sqrt(p.shape[-1]))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def make_hybrid_model(name: str, seed: int = 0, **overrides):
    config_fn, model_cls = MODELS[name]
    model = getattr(transformers, model_cls)(config_fn(**overrides)).eval()
    randomize(model, seed)
    return model


ROUTER_CLASSES = ("Qwen3NextTopKRouter", "Qwen3_5MoeTopKRouter", "NemotronHTopkRouter")


def _selection_scores(router, logits: torch.Tensor) -> torch.Tensor:
    """The scores each router takes its top-k of (before group masking)."""
    if type(router).__name__ == "NemotronHTopkRouter":
        return logits.float().sigmoid() + router.e_score_correction_bias.float()
    return torch.softmax(logits.float(), dim=-1)


def hf_hybrid_routing(model, tokens: list[int]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """transformers' forward of one sequence: (logits [S, V], per MoE layer the chosen ids
    [S, k] and the selection scores [S, E]), read from the routers' own outputs."""
    return routed_forward(model, tokens, ROUTER_CLASSES, lambda router, args, logits: _selection_scores(router, logits))
