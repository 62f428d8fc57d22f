"""Tiny random transformers models of the newer MoE families, and what transformers routes.

Shared by the loader / engine tests and the replay tests. Weights have realistic scale
(1/sqrt(fan_in) matrices, norms near 1, score-correction biases of 0.1): routers then make
decisive choices, where HF's 0.02 init would make every routing a near-tie.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 160
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, eos_token_id=1, pad_token_id=0, bos_token_id=2)
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0)
# name -> (config class, model class, config overrides). MLA needs as many kv heads as heads.
FAMILIES = {
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
        intermediate_size=48, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=12, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5)),
    # Moonlight-like: no q low-rank, one group, YaRN with DeepSeek's mscale
    "moonlight": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
        intermediate_size=48, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=2,
        rope_parameters=dict(YARN, rope_theta=50000.0, mscale=1.0, mscale_all_dim=1.0))),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=48,
        first_k_dense_replace=1, use_qk_norm=True, head_dim=16, attention_bias=True, n_group=2, topk_group=1,
        routed_scaling_factor=1.5)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, head_dim=8, sliding_window=4,
        rope_parameters=dict(YARN, rope_theta=150000.0, truncate=False))),
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", dict(
        num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, head_dim=8, rotary_dim=4,
        # the factor spelled out too: transformers before ~5.2x ignores the legacy rotary_dim
        # (rotating every dim), so the reference would differ with the version installed
        rope_parameters=dict(rope_type="default", rope_theta=5000000.0, partial_rotary_factor=0.5))),
}


def make_hf_model(name: str, seed: int = 0, **overrides):
    config_cls, model_cls, extra = FAMILIES[name]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in pname else noise / math.sqrt(p.shape[-1]))
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model


ROUTER_CLASSES = ("DeepseekV3TopkRouter", "Glm4MoeTopkRouter", "GptOssTopKRouter", "MiniMaxM2TopKRouter")


def _selection_scores(router, args, logits: torch.Tensor) -> torch.Tensor:
    """The scores each router takes its top-k of (before group masking)."""
    name = type(router).__name__
    if name == "GptOssTopKRouter":
        return logits.float()
    bias = args[1] if name == "MiniMaxM2TopKRouter" else router.e_score_correction_bias
    return logits.float().sigmoid() + bias.float()


def hf_routing(model, tokens: list[int]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """transformers' forward of one sequence: (logits [S, V], per MoE layer the chosen ids
    [S, k] and the selection scores [S, E]), read from the routers' own outputs."""
    return routed_forward(model, tokens, ROUTER_CLASSES, _selection_scores)


def routed_forward(model, tokens: list[int], router_classes: tuple[str, ...],
                   selection_scores) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``hf_routing`` for any family: forward hooks on the modules whose class is in
    ``router_classes`` collect each router's chosen ids (its output 2) and
    ``selection_scores(router, args, router_logits)``."""
    ids, scores, hooks = [], [], []

    def hook(module, args, output):
        ids.append(output[2].detach().clone())
        scores.append(selection_scores(module, args, output[0].detach()))

    for module in model.modules():
        if type(module).__name__ in router_classes:
            hooks.append(module.register_forward_hook(hook))
    assert hooks, "no router found"
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens])).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return logits, ids, scores


def assert_routing_matches(ours: np.ndarray, hf_ids: list[torch.Tensor], hf_scores: list[torch.Tensor],
                           tie_tol: float = 1e-5) -> int:
    """Our recorded routing [rows, layers, k] has, per token and layer, the set transformers
    chose; a differing set is accepted only as a near-tie (the two sets' selection scores
    sum to within ``tie_tol``). Returns the number of near-ties accepted."""
    assert ours.shape[1] == len(hf_ids) > 0
    ours = torch.as_tensor(ours.astype(np.int64))
    ties = 0
    for j, (hf, sel) in enumerate(zip(hf_ids, hf_scores)):
        rows = ours.shape[0]
        a, b = ours[:, j].sort(-1).values, hf[:rows].sort(-1).values
        for t in torch.nonzero((a != b).any(-1)).flatten().tolist():
            gap = (sel[t, a[t]].sum() - sel[t, b[t]].sum()).abs().item()
            assert gap < tie_tol, f"MoE layer {j}, token {t}: ours {a[t].tolist()} vs HF {b[t].tolist()} (gap {gap})"
            ties += 1
    return ties
