"""Attention split by heads: the unsharded attention code (``inference.model.attention``)
runs on this rank's heads, with its head-dependent projections replaced by sharded ones.

- Grouped-query: ``qkv_proj`` column-parallel by heads (``QKVParallelLinear``: KV heads
  split or replicated), ``o_proj`` row-parallel (the block's one all-reduce; its bias added
  once), whole-projection q/k norm (OLMoE, MiniMax-M2) as ``ShardedRMSNorm``, per-head
  q/k norms replicated, sinks (GPT-OSS) split with the query heads. Sliding windows and
  partial rotary are per head and need nothing.
- Multi-head latent: ``q_proj`` / ``q_b_proj`` and ``kv_b_proj`` column-parallel by heads,
  ``o_proj`` row-parallel; the latent path (``q_a_proj``, ``kv_a_proj_with_mqa``, their
  norms) and so the latent KV cache are replicated on every TP rank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from inference.config import ModelConfig
from inference.model.attention import build_attention
from inference.parallel.groups import GroupHandle
from inference.parallel.layers import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear, ShardedRMSNorm
from inference.parallel.layout import HeadPartition, ParallelLayout
from inference.parallel.shards import TensorShard, declare_shards


@dataclass
class AttentionShard:
    """What tensor parallelism changes in one attention layer. ``local_config``: the config
    the attention code runs on (this rank's heads; its KV cache holds
    ``partition.num_kv_heads`` heads, or the whole latent for MLA). ``modules``: attribute
    name -> sharded module replacing the unsharded one. ``param_shards``: shards of the
    attention module's own parameters (sinks)."""

    partition: HeadPartition
    local_config: ModelConfig
    modules: dict[str, nn.Module]
    param_shards: dict[str, TensorShard]


def _local_config(config: ModelConfig, p: HeadPartition) -> ModelConfig:
    kv = p.num_heads if config.mla is not None else p.num_kv_heads
    return dataclasses.replace(config, num_heads=p.num_heads, num_kv_heads=kv)


def local_attention_config(config: ModelConfig, layout: ParallelLayout, tp_rank: int) -> ModelConfig:
    """The config TP rank ``tp_rank``'s attention runs on: its query and KV heads (every
    layer alike). Its KV cache is ``KVCache(local_attention_config(...))``: this rank's KV
    heads, or the whole (replicated) latent for MLA, whose cache ignores the head counts. A
    hybrid model replicates its attention: ``config`` itself, every head."""
    from inference.parallel.layout import replicates_blocks
    if replicates_blocks(config):
        return config
    return _local_config(config, layout.heads(config, tp_rank))


def attention_shard(config: ModelConfig, layout: ParallelLayout, tp: GroupHandle, *,
                    dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> AttentionShard:
    """This rank's sharded attention projections (GQA or MLA, from ``config.mla``)."""
    p = layout.heads(config, tp.rank)
    kw = dict(dtype=dtype, device=device)
    if config.mla is not None:
        return AttentionShard(p, _local_config(config, p), _mla_modules(config, p, tp, kw), {})
    d = config.head_dim
    q_cols = ((p.q_start * d, p.q_stop * d),)
    modules: dict[str, nn.Module] = {
        "qkv_proj": QKVParallelLinear(config.hidden_size, config.num_heads, config.num_kv_heads, d, p, tp,
                                      config.attention_bias, **kw),
        "o_proj": RowParallelLinear(config.num_heads * d, config.hidden_size, tp, config.o_proj_bias,
                                    cols=q_cols, **kw)}
    if config.qk_norm == "full":
        modules["q_norm"] = ShardedRMSNorm(config.num_heads * d, config.rms_norm_eps, tp, q_cols, **kw)
        modules["k_norm"] = ShardedRMSNorm(config.num_kv_heads * d, config.rms_norm_eps, tp,
                                           ((p.kv_start * d, p.kv_stop * d),), replicas=p.kv_replicas, **kw)
    shards = {"sinks": TensorShard.along((config.num_heads,), dim0=[(p.q_start, p.q_stop)])} \
        if config.attention_sinks else {}
    return AttentionShard(p, _local_config(config, p), modules, shards)


def _mla_modules(config: ModelConfig, p: HeadPartition, tp: GroupHandle, kw: dict) -> dict[str, nn.Module]:
    m, h, heads = config.mla, config.hidden_size, config.num_heads

    def by_head(in_features: int, per_head: int) -> ColumnParallelLinear:
        return ColumnParallelLinear(in_features, [heads * per_head], tp,
                                    rows=((p.q_start * per_head, p.q_stop * per_head),), **kw)
    q_name, q_in = ("q_b_proj", m.q_lora_rank) if m.q_lora_rank else ("q_proj", h)
    return {q_name: by_head(q_in, m.qk_head_dim),
            "kv_b_proj": by_head(m.kv_lora_rank, m.qk_nope_head_dim + m.v_head_dim),
            "o_proj": RowParallelLinear(heads * m.v_head_dim, h, tp,
                                        cols=((p.q_start * m.v_head_dim, p.q_stop * m.v_head_dim),), **kw)}


def sharded_attention(config: ModelConfig, layer_index: int, layout: ParallelLayout, tp: GroupHandle, *,
                      dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> nn.Module:
    """Decoder layer ``layer_index``'s attention module (the model's own class) on this
    rank's heads: what ``DecoderLayer`` builds instead of ``build_attention`` under TP."""
    shard = attention_shard(config, layout, tp, dtype=dtype, device=device)
    with torch.device("meta"):
        attn = build_attention(shard.local_config, layer_index)
    for name, module in shard.modules.items():
        setattr(attn, name, module)
    # The rest (per-head norms, the MLA latent path, sinks) is replicated or local as built.
    target = torch.device(device) if device is not None else torch.get_default_device()
    for module in attn.modules():
        if any(t.is_meta for t in module.parameters(recurse=False)):
            module.to_empty(device=target, recurse=False)
            if dtype is not None:
                module.to(dtype)
    declare_shards(attn, shard.param_shards)
    return attn
