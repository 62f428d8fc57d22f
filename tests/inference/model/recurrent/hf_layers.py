"""Tiny transformers recurrent layers with seeded random weights, and our layers holding
the same weights: the independent references of the layer tests.

Imported as ``tests.inference.model.recurrent.hf_layers`` (the repo root is on sys.path).
"""

from __future__ import annotations

import math

import torch

from inference.model.recurrent import GatedDeltaNet, Mamba2Mixer, RecurrentMetadata
from inference.recurrent_config import GatedDeltaNetConfig, Mamba2Config

HIDDEN = 32
GDN = GatedDeltaNetConfig(num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8, conv_kernel=4, chunk_size=8)
MAMBA = Mamba2Config(num_heads=4, head_dim=8, state_size=16, n_groups=2, conv_kernel=4, chunk_size=8,
                     dt_min=0.001, norm_eps=1e-5)
ATTENTION_SHAPE = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64)


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Unit-scale random weights; A_log, dt_bias and norm weights in realistic ranges."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.empty(p.shape).uniform_(1.0, 8.0, generator=gen).log())
        elif name.endswith("dt_bias"):
            p.copy_(torch.empty(p.shape).uniform_(-1.0, 1.0, generator=gen))
        elif name.startswith("norm") or name == "D":
            p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
        else:
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def _qwen_kwargs(config: GatedDeltaNetConfig) -> dict:
    return dict(hidden_size=HIDDEN, num_hidden_layers=1, layer_types=["linear_attention"],
                linear_num_key_heads=config.num_k_heads, linear_num_value_heads=config.num_v_heads,
                linear_key_head_dim=config.head_k_dim, linear_value_head_dim=config.head_v_dim,
                linear_conv_kernel_dim=config.conv_kernel, rms_norm_eps=config.norm_eps,
                num_experts=4, num_experts_per_tok=2, **ATTENTION_SHAPE)


def hf_gated_deltanet(family: str, seed: int, config: GatedDeltaNetConfig = GDN) -> torch.nn.Module:
    """transformers' Gated DeltaNet of ``family`` ("qwen3_5_moe" or "qwen3_next")."""
    import transformers
    if family == "qwen3_5_moe":
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeGatedDeltaNet
        layer = Qwen3_5MoeGatedDeltaNet(transformers.Qwen3_5MoeTextConfig(**_qwen_kwargs(config)), 0)
    elif family == "qwen3_next":
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet
        layer = Qwen3NextGatedDeltaNet(transformers.Qwen3NextConfig(**_qwen_kwargs(config)), 0)
    else:
        raise ValueError(family)
    randomize(layer, seed)
    return layer.eval()


def hf_mamba2(seed: int, config: Mamba2Config = MAMBA) -> torch.nn.Module:
    import transformers
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer
    hf_config = transformers.NemotronHConfig(
        hidden_size=HIDDEN, layers_block_type=["linear_attention"], mamba_num_heads=config.num_heads,
        mamba_head_dim=config.head_dim, ssm_state_size=config.state_size, n_groups=config.n_groups,
        conv_kernel=config.conv_kernel, chunk_size=config.chunk_size, use_conv_bias=config.use_conv_bias,
        use_bias=config.use_bias, layer_norm_epsilon=config.norm_eps, time_step_min=config.dt_min,
        **ATTENTION_SHAPE)
    layer = NemotronHMamba2Mixer(hf_config, 0)
    randomize(layer, seed)
    return layer.eval()


def ours_like(hf_layer: torch.nn.Module) -> torch.nn.Module:
    """Our layer of the same kind, holding ``hf_layer``'s weights."""
    if hasattr(hf_layer, "ssm_state_size"):
        ours = Mamba2Mixer(HIDDEN, MAMBA)
    else:
        ours = GatedDeltaNet(HIDDEN, GDN)
    ours.load_hf_weights(hf_layer.state_dict())
    return ours.eval()


@torch.no_grad()
def hf_full(hf_layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' whole-sequence forward (no cache) of one sequence x [T, hidden]."""
    return hf_layer(x[None])[0]


def state_tensors(layer: torch.nn.Module, num_slots: int, fill: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot tensors [num_slots + 1, ...] for ``layer``; ``fill`` None: random garbage."""
    c = layer.config
    shapes = (c.conv_state_shape, c.recurrent_state_shape)
    if fill is None:
        gen = torch.Generator().manual_seed(123)
        return tuple(torch.randn(num_slots + 1, *s, generator=gen) * 3 for s in shapes)
    return tuple(torch.full((num_slots + 1, *s), fill) for s in shapes)


@torch.no_grad()
def run_split(layer: torch.nn.Module, x: torch.Tensor, splits: list[int], mode: str) -> torch.Tensor:
    """Our layer over x [T, hidden] fed as consecutive pieces of ``splits`` tokens (one
    step each), its state carried in slot 2 of garbage-filled slot tensors."""
    assert sum(splits) == x.shape[0]
    conv, rec = state_tensors(layer, 3)
    outs, start = [], 0
    for i, n in enumerate(splits):
        meta = RecurrentMetadata.build([n], [2], [i > 0])
        outs.append(layer(x[start:start + n], meta, conv, rec, mode=mode))
        start += n
    return torch.cat(outs)
