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
from inference.model.layers import ZeroCenteredRMSNorm
from inference.recurrent_config import GatedDeltaNetConfig, Mamba2Config


def _qwen_hybrid_kinds(num_layers: int) -> dict:
    """Qwen3-Next / Qwen3.5: three Gated DeltaNet layers then one attention layer, MoE everywhere."""
    layer_types = tuple("full_attention" if (i + 1) % 4 == 0 else "gated_deltanet" for i in range(num_layers))
    return dict(num_layers=num_layers, layer_types=layer_types, mlp_types=("moe",) * num_layers, dense_layers=())


def _nemotron_kinds(pattern: str) -> dict:
    """Nemotron-H's hybrid_override_pattern: one mixer or one MLP per layer
    (M: Mamba2, *: attention, E: MoE, -: dense MLP)."""
    mixer = {"M": "mamba2", "*": "full_attention", "E": "none", "-": "none"}
    mlp = {"M": "none", "*": "none", "E": "moe", "-": "dense"}
    return dict(num_layers=len(pattern), layer_types=tuple(mixer[c] for c in pattern),
                mlp_types=tuple(mlp[c] for c in pattern),
                dense_layers=tuple(i for i, c in enumerate(pattern) if c == "-"))


# Qwen3.5-35B-A3B and Qwen3-Next-80B-A3B (text): 16 key / 32 value heads of 128.
QWEN_GDN = GatedDeltaNetConfig(num_k_heads=16, num_v_heads=32, head_k_dim=128, head_v_dim=128, conv_kernel=4,
                               chunk_size=64, norm_eps=1e-6)
QWEN_HYBRID_FEATURES = dict(attention_output_gate=True, zero_centered_norms=True)
NEMOTRON_FEATURES = dict(use_rope=False, expert_activation="relu2")
NEMOTRON_3_NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


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
    # Hybrid shapes (Qwen: gated attention output, zero-centred norms; Nemotron-H: no
    # rotary, relu^2 experts and shared expert). One recurrent-state checkpoint (= one state-pool slot;
    # fp32 recurrent state, bf16 conv state; tools/recurrent_state_bytes.py) against the
    # bf16 KV of one 16-token block:
    #   qwen3.5-35b-a3b          30 GDN x (2 MiB + 48 KiB) = 64,389,120 B (61.4 MiB); KV 320 KiB/block
    #   qwen3-next-80b-a3b       36 GDN x (2 MiB + 48 KiB) = 77,266,944 B (73.7 MiB); KV 384 KiB/block
    #   nemotron-3-nano-30b-a3b  23 Mamba2 x (2 MiB + 36 KiB) = 49,082,368 B (46.8 MiB); KV 96 KiB/block
    # so one checkpoint weighs as much as 196 (Qwen) or 499 (Nemotron) blocks of KV.
    "qwen3.5-35b-a3b-shape": ModelConfig(
        name="qwen3.5-35b-a3b-shape", vocab_size=248320, hidden_size=2048, num_heads=16, num_kv_heads=2,
        head_dim=256, intermediate_size=512, moe_intermediate_size=512, num_experts=256, topk=8,
        shared_expert_intermediate_size=512, shared_expert_gate=True, qk_norm="per_head", rotary_dim=64, rope_theta=1e7,
        max_position_embeddings=262144, gated_deltanet=QWEN_GDN, **QWEN_HYBRID_FEATURES, **_qwen_hybrid_kinds(40)),
    "qwen3-next-80b-a3b-shape": ModelConfig(
        name="qwen3-next-80b-a3b-shape", vocab_size=151936, hidden_size=2048, num_heads=16, num_kv_heads=2,
        head_dim=256, intermediate_size=5120, moe_intermediate_size=512, num_experts=512, topk=10,
        shared_expert_intermediate_size=512, shared_expert_gate=True, qk_norm="per_head", rotary_dim=64, rope_theta=1e7,
        max_position_embeddings=262144, gated_deltanet=QWEN_GDN, eos_token_id=151645, **QWEN_HYBRID_FEATURES,
        **_qwen_hybrid_kinds(48)),
    "nemotron-3-nano-30b-a3b-shape": ModelConfig(
        name="nemotron-3-nano-30b-a3b-shape", vocab_size=131072, hidden_size=2688, num_heads=32, num_kv_heads=2,
        head_dim=128, intermediate_size=1856, moe_intermediate_size=1856, num_experts=128, topk=6,
        shared_expert_intermediate_size=3712,
        router=RouterConfig(score_function="sigmoid", use_expert_bias=True, scaling_factor=2.5),
        rms_norm_eps=1e-5, max_position_embeddings=262144, **NEMOTRON_FEATURES,
        mamba2=Mamba2Config(num_heads=64, head_dim=64, state_size=128, n_groups=8, conv_kernel=4, chunk_size=128,
                            use_conv_bias=True, use_bias=False, norm_eps=1e-5, dt_min=0.001),
        **_nemotron_kinds(NEMOTRON_3_NANO_PATTERN)),
    # Tiny hybrids for CPU tests: both recurrent families, a dense layer, MoE-only layers.
    "tiny-hybrid-gdn": ModelConfig(
        name="tiny-hybrid-gdn", vocab_size=512, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, moe_intermediate_size=32, num_experts=8, topk=2, shared_expert_intermediate_size=64,
        shared_expert_gate=True, qk_norm="per_head", max_position_embeddings=2048, eos_token_id=1,
        gated_deltanet=GatedDeltaNetConfig(num_k_heads=2, num_v_heads=4, head_k_dim=16, head_v_dim=16,
                                           conv_kernel=4, chunk_size=16),
        **QWEN_HYBRID_FEATURES, **_qwen_hybrid_kinds(4)),
    "tiny-hybrid-mamba": ModelConfig(
        name="tiny-hybrid-mamba", vocab_size=512, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, moe_intermediate_size=32, num_experts=8, topk=2, shared_expert_intermediate_size=64,
        router=RouterConfig(score_function="sigmoid", use_expert_bias=True, scaling_factor=2.5),
        rms_norm_eps=1e-5, max_position_embeddings=2048, eos_token_id=1, **NEMOTRON_FEATURES,
        mamba2=Mamba2Config(num_heads=4, head_dim=16, state_size=16, n_groups=2, conv_kernel=4, chunk_size=16,
                            dt_min=0.001),
        **_nemotron_kinds("ME*E-M*E")),
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


@torch.no_grad()
def init_random_weights(model: MoEGPT, seed: int) -> None:
    """Seeded weights scaled by 1/sqrt(fan_in) so signals keep unit scale through depth and
    routers see logits of order one (a realistic spread of expert choices). Norms start at
    the identity scale (weight 1, or 0 for zero-centred norms). A tensor-parallel model
    gets this rank's shards of exactly the unsharded model's weights."""
    if model.parallel is not None:
        return _init_random_shards(model, seed)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    zero_centred = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, ZeroCenteredRMSNorm)}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            p.fill_(0.0 if name in zero_centred else 1.0)
            continue
        fan_in = p.shape[-1]
        std = 0.02 if name.startswith("embed_tokens") else 1.0 / math.sqrt(fan_in)
        p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(std))
    for name, buf in model.named_buffers():
        if name.endswith("expert_bias"):
            buf.copy_(torch.randn(buf.shape, generator=gen, device=device) * 0.05)


def _init_random_shards(model: MoEGPT, seed: int) -> None:
    """``init_random_weights``'s draws in the unsharded order (one full tensor at a time, on
    this rank's device), each cut to this rank's shard: bit-identical to the single-process
    weights, with at most one full tensor alive."""
    from inference.parallel.loading import shard_targets
    device = next(model.parameters()).device
    targets = {name: (tensor, shard) for name, tensor, shard, _ in shard_targets(model)}
    with torch.device("meta"):
        full = MoEGPT(model.config)
    zero_centred = {f"{n}.weight" for n, m in full.named_modules() if isinstance(m, ZeroCenteredRMSNorm)}
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in full.named_parameters():
        tensor, shard = targets[name]
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            tensor.fill_(0.0 if name in zero_centred else 1.0)
            continue
        std = 0.02 if name.startswith("embed_tokens") else 1.0 / math.sqrt(p.shape[-1])
        tensor.copy_(shard.take(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(std)))
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
