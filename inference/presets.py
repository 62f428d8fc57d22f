"""Built-in model shapes with seeded random weights.

``tiny-moe`` is the default: fast on CPU, with a dense first layer so MoE-layer indices
differ from decoder-layer indices. The large presets copy the *shapes* of public models for
GPU benchmarks (OLMoE, Qwen3-MoE, Moonlight / DeepSeek-V3 MLA, GPT-OSS, GLM-4.5-Air,
MiniMax-M2); their weights are random, they are not those models.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from inference.config import DTYPES, MLAConfig, ModelConfig, RopeScaling, RouterConfig
from inference.model import MoEGPT
from inference.model.gpt import allocate_model

if TYPE_CHECKING:
    from inference.parallel import ParallelGroups

PRESETS = MappingProxyType({
    "tiny-moe": ModelConfig(
        name="tiny-moe", vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=16, intermediate_size=128, moe_intermediate_size=32, num_experts=8, topk=2,
        dense_layers=(0,), max_position_embeddings=2048, eos_token_id=1),
    "tiny-moe-sigmoid": ModelConfig(
        name="tiny-moe-sigmoid", vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=1,
        head_dim=16, intermediate_size=128, moe_intermediate_size=32, num_experts=16, topk=4,
        dense_layers=(0, 2), shared_expert_intermediate_size=64, qk_norm="per_head",
        router=RouterConfig(score_function="sigmoid", use_expert_bias=True, num_groups=4, topk_groups=2,
                            scaling_factor=2.5),
        max_position_embeddings=2048, eos_token_id=1),
    "olmoe-1b-7b-shape": ModelConfig(
        name="olmoe-1b-7b-shape", vocab_size=50304, hidden_size=2048, num_layers=16, num_heads=16,
        num_kv_heads=16, head_dim=128, intermediate_size=1024, moe_intermediate_size=1024, num_experts=64,
        topk=8, dense_layers=(), qk_norm="full", router=RouterConfig(norm_topk_prob=False),
        max_position_embeddings=4096, eos_token_id=50279),
    "qwen3-30b-a3b-shape": ModelConfig(
        name="qwen3-30b-a3b-shape", vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32,
        num_kv_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        topk=8, dense_layers=(), qk_norm="per_head", rope_theta=1e6, max_position_embeddings=40960,
        eos_token_id=151645),
    # deepseek_v3 architecture: multi-head latent attention, no q low-rank, first layer dense
    "moonlight-16b-a3b-shape": ModelConfig(
        name="moonlight-16b-a3b-shape", vocab_size=163840, hidden_size=2048, num_layers=27, num_heads=16,
        num_kv_heads=16, head_dim=192, intermediate_size=11264, moe_intermediate_size=1408, num_experts=64, topk=6,
        dense_layers=(0,), shared_expert_intermediate_size=2 * 1408,
        mla=MLAConfig(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
        router=RouterConfig(score_function="sigmoid", use_expert_bias=True, scaling_factor=2.446, group_score_topk=2),
        rope_theta=50000.0, rms_norm_eps=1e-5, max_position_embeddings=8192, eos_token_id=163585),
    # sinks, alternating 128-token sliding window / full layers, biased clamped-SwiGLU experts
    "gpt-oss-20b-shape": ModelConfig(
        name="gpt-oss-20b-shape", vocab_size=201088, hidden_size=2880, num_layers=24, num_heads=64, num_kv_heads=8,
        head_dim=64, intermediate_size=2880, moe_intermediate_size=2880, num_experts=32, topk=4, dense_layers=(),
        router=RouterConfig(norm_topk_prob=True, bias=True), attention_bias=True, o_proj_bias=True,
        attention_sinks=True, layer_types=("sliding_attention", "full_attention") * 12, sliding_window=128,
        expert_activation="swiglu_oai", expert_bias=True, rope_theta=150000.0,
        rope_scaling=RopeScaling(factor=32.0, original_max_position_embeddings=4096, truncate=False),
        rms_norm_eps=1e-5, max_position_embeddings=131072, eos_token_id=200002),
    # partial rotary (half the head), qkv bias, sigmoid + bias routing, shared expert
    "glm-4.5-air-shape": ModelConfig(
        name="glm-4.5-air-shape", vocab_size=151552, hidden_size=4096, num_layers=46, num_heads=96, num_kv_heads=8,
        head_dim=128, rotary_dim=64, intermediate_size=10944, moe_intermediate_size=1408, num_experts=128, topk=8,
        dense_layers=(0,), shared_expert_intermediate_size=1408, attention_bias=True,
        router=RouterConfig(score_function="sigmoid", use_expert_bias=True, group_score_topk=2),
        rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=131072, eos_token_id=151329),
    # whole-projection q/k norm, partial rotary, sigmoid + bias routing over 256 experts
    "minimax-m2-shape": ModelConfig(
        name="minimax-m2-shape", vocab_size=200064, hidden_size=3072, num_layers=62, num_heads=48, num_kv_heads=8,
        head_dim=128, rotary_dim=64, intermediate_size=1536, moe_intermediate_size=1536, num_experts=256, topk=8,
        dense_layers=(), qk_norm="full", router=RouterConfig(score_function="sigmoid", use_expert_bias=True),
        rope_theta=5e6, max_position_embeddings=196608, eos_token_id=200020),
})
DEFAULT_PRESET = "tiny-moe"


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"--model: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"--dtype: unknown dtype {name!r}; choose one of {', '.join(sorted(DTYPES))}")
    return getattr(torch, DTYPES[name])


def _init_std(name: str, shape: torch.Size) -> float | None:
    """None: a norm weight (ones); else the std of the seeded normal draw."""
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return None
    return 0.02 if name.startswith("embed_tokens") else 1.0 / math.sqrt(shape[-1])


@torch.no_grad()
def init_random_weights(model: MoEGPT, seed: int) -> None:
    """Seeded weights scaled by 1/sqrt(fan_in) so signals keep unit scale through depth and
    routers see logits of order one (a realistic spread of expert choices). A tensor-
    parallel model gets this rank's shards of exactly the unsharded model's weights."""
    if model.parallel is not None:
        return _init_random_shards(model, seed)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        std = _init_std(name, p.shape)
        if std is None:
            p.fill_(1.0)
            continue
        p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(std))
    for name, buf in model.named_buffers():
        if name.endswith("expert_bias"):
            buf.copy_(torch.randn(buf.shape, generator=gen, device=device) * 0.05)


def _init_random_shards(model: MoEGPT, seed: int) -> None:
    """The unsharded draws in the unsharded order (one full tensor at a time, on this
    rank's device), each cut to this rank's shard: bit-identical to the single-process
    weights, with at most one full tensor alive."""
    from inference.parallel.loading import shard_targets
    device = next(model.parameters()).device
    targets = {name: (tensor, shard) for name, tensor, shard, _ in shard_targets(model)}
    with torch.device("meta"):
        full = MoEGPT(model.config)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in full.named_parameters():
        tensor, shard = targets[name]
        std = _init_std(name, p.shape)
        if std is None:
            tensor.fill_(1.0)
            continue
        value = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(std)
        tensor.copy_(shard.take(value))
    for name, buf in full.named_buffers():
        if name.endswith("expert_bias"):
            targets[name][0].copy_(torch.randn(buf.shape, generator=gen, device=device) * 0.05)


def build_model(config: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", parallel: "ParallelGroups | None" = None) -> MoEGPT:
    """A model with seeded random weights, on ``device`` in ``dtype`` (buffers stay fp32);
    with ``parallel``, this rank's shards of the same weights."""
    model = allocate_model(config, device, dtype, parallel)
    init_random_weights(model, seed)
    return model.eval()
