"""The per-rank memory plan of a layout (for ``--dry-run``): weights, KV cache, recurrent
state and routing buffer bytes of every rank, computed from the configs alone (nothing is
allocated).

Per rank, with ``tp`` / ``ep`` / ``etp = tp / ep``:
- weights: the vocabulary shard (padded vocabulary / tp rows, embedding and an untied
  head), this rank's attention heads, ``1/tp`` of each dense and shared-expert MLP,
  ``num_experts / ep`` experts at ``1/etp`` of their width, and the replicated rest
  (norms, routers, the shared-expert gate, MLA's latent path), counted on blocks built
  on the meta device exactly as the TP model builds them;
- KV cache: ``num_kv_blocks + 1`` blocks of this rank's KV heads (``kv_heads / tp``, or one
  replicated head when ``tp > kv_heads``). Every rank of a replica has the same block ids:
  the replica's one schedule drives all of them. A latent-attention (MLA) cache is
  replicated over TP: counted whole on every rank.
- hybrid models (``replicates_blocks``): weights are the rank's model built on the meta
  device (the vocabulary shard, ``num_experts / ep`` experts at ``1/etp`` width, ``1/tp`` of
  each shared expert, everything else whole); the KV cache holds every KV head of the
  attention layers, and the recurrent state pool (``max_requests + 1`` slots) and the
  prefix cache's state checkpoints are replicated too: the single-process sizes on every
  rank (``state_bytes``).
- routing: ``staging [max_step_tokens]`` + ``block_routing [(num_kv_blocks + 1) *
  block_size]`` rows of ``num_moe_layers * topk`` ids. ``routing_on="all"`` (recommended)
  allocates them on every rank so every rank's forward and decode graphs are the same
  kernels; ``"leader"`` only on the replica leader. Either way the host side (reconstruct,
  finalize, files) is the leader's alone. The buffer is < 1% of the KV cache, and a TP
  step is as slow as its slowest rank, so skipping the writes on other ranks saves memory
  but no time.
"""

from __future__ import annotations

from dataclasses import dataclass

import dataclasses

import torch
from torch import nn

from inference.config import EngineConfig, ModelConfig
from inference.parallel.attention import sharded_attention
from inference.parallel.groups import ParallelGroups
from inference.parallel.layers import ParallelLMHead, ParallelSwiGLUMLP, VocabParallelEmbedding
from inference.parallel.layout import ParallelLayout, replicates_blocks
from inference.parallel.moe import ExpertParallelMoE

ROUTING_PLACEMENTS = ("all", "leader")


@dataclass(frozen=True)
class RankMemoryPlan:
    """Bytes one rank allocates for weights, KV cache, the routing buffer and (hybrid models)
    the recurrent state pool plus state checkpoints. Invariant: ``total_bytes`` is their
    sum; ranks of one replica differ at most in ``routing_bytes``."""

    rank: int
    dp_rank: int
    tp_rank: int
    is_replica_leader: bool
    weight_elements: int
    weight_bytes: int
    kv_cache_bytes: int
    routing_bytes: int
    state_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.routing_bytes + self.state_bytes


def rank_modules(config: ModelConfig, groups: ParallelGroups, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> nn.ModuleDict:
    """Every sharded block one rank holds (vocabulary, each layer's attention and MLP), built
    as the TP model builds them; norms are left out (replicated ``hidden_size`` vectors,
    counted by ``rank_weight_elements``). Not for hybrid models, which shard only their MoE
    layers: their rank's blocks are ``MoEGPT(config, parallel=groups)``'s."""
    if replicates_blocks(config):
        raise ValueError(f"{config.name}: a hybrid model splits only its MoE layers (ExpertParallelMoE) and "
                         "replicates every other block; build MoEGPT(config, parallel=groups) for its rank's blocks")
    kw = dict(dtype=dtype, device=device)
    tp = groups.tp
    embed = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp, **kw)
    parts = {"embed": embed, "head": ParallelLMHead(config.vocab_size, config.hidden_size, tp,
                                                    tied_to=embed if config.tie_word_embeddings else None, **kw)}
    for i in range(config.num_layers):
        parts[f"attn{i}"] = sharded_attention(config, i, groups.layout, tp, **kw)
        parts[f"mlp{i}"] = (ExpertParallelMoE(config, groups, **kw) if i in config.moe_layer_indices
                            else ParallelSwiGLUMLP(config.hidden_size, config.intermediate_size, tp, **kw))
    return nn.ModuleDict(parts)


def rank_weight_elements(config: ModelConfig, layout: ParallelLayout, rank: int) -> int:
    """Parameters held by global rank ``rank`` (buffers such as expert biases excluded, as in
    the single-process count), from its blocks built on the meta device."""
    layout.validate_model(config)
    if replicates_blocks(config):       # the MoE blocks are the only split ones: count the whole rank model
        from inference.model.gpt import MoEGPT
        with torch.device("meta"):
            model = MoEGPT(config, ParallelGroups.shard_only(layout, rank))
        return sum(p.numel() for p in model.parameters())
    modules = rank_modules(config, ParallelGroups.shard_only(layout, rank), device="meta")
    norms = (2 * config.num_layers + 1) * config.hidden_size
    return norms + sum(p.numel() for p in modules.parameters())


def _element_size(dtype_name: str) -> int:
    from inference.presets import torch_dtype
    return torch.empty((), dtype=torch_dtype(dtype_name)).element_size()


def routing_buffer_bytes(config: ModelConfig, engine: EngineConfig) -> int:
    """Staging plus block-keyed routing rows, in the compact routing dtype."""
    from routing_replay import routing_dtype
    elem = torch.empty((), dtype=routing_dtype(config.num_experts)).element_size()
    rows = (engine.num_kv_blocks + 1) * engine.block_size + engine.max_step_tokens
    return rows * config.num_moe_layers * config.topk * elem


def memory_plan(config: ModelConfig, engine: EngineConfig, layout: ParallelLayout,
                routing_on: str = "all") -> list[RankMemoryPlan]:
    """One entry per global rank (raises ``ParallelLayoutError`` for a layout that cannot
    split the model)."""
    if routing_on not in ROUTING_PLACEMENTS:
        raise ValueError(f"routing_on must be one of {ROUTING_PLACEMENTS}, got {routing_on!r}")
    layout.validate_model(config)
    elem = _element_size(engine.dtype)
    routing = routing_buffer_bytes(config, engine) if engine.record_routing else 0
    state = recurrent_state_bytes(config, engine)
    plans, per_position = [], {}          # replicas hold the same shards: count each position once
    for rank in range(layout.world_size):
        c = layout.coords(rank)
        leader = rank == layout.replica_leader(c.dp_rank)
        kv = _kv_elements_per_token(config, layout, c.tp_rank) * engine.block_size * (engine.num_kv_blocks + 1) * elem
        if c.tp_rank not in per_position:
            per_position[c.tp_rank] = rank_weight_elements(config, layout, rank)
        weights = per_position[c.tp_rank]
        plans.append(RankMemoryPlan(rank, c.dp_rank, c.tp_rank, leader, weights, weights * elem, kv,
                                    routing if routing_on == "all" or leader else 0, state))
    return plans


def recurrent_state_bytes(config: ModelConfig, engine: EngineConfig) -> int:
    """A hybrid model's state pool (``max_requests`` slots + the dummy) and state
    checkpoints: replicated, so every rank holds what one process holds."""
    if not config.is_hybrid:
        return 0
    from inference.cache.state_pool import state_bytes_per_sequence
    from inference.presets import torch_dtype
    per_seq = state_bytes_per_sequence(config, torch_dtype(engine.dtype))
    return per_seq * (engine.max_requests + 1 + engine.num_state_checkpoints)


def _kv_elements_per_token(config: ModelConfig, layout: ParallelLayout, tp_rank: int) -> int:
    if config.mla is not None or replicates_blocks(config):
        return config.kv_bytes_per_token            # the latent / a hybrid's attention is replicated over TP
    local = layout.heads(config, tp_rank).num_kv_heads
    return dataclasses.replace(config, num_kv_heads=local, num_heads=local).kv_bytes_per_token


def describe_rank_plans(plans: list[RankMemoryPlan]) -> str:
    """``--dry-run`` lines: one per distinct per-rank plan (ranks listed), bytes in GiB/MiB."""
    groups: dict[tuple[int, int, int, int], list[int]] = {}
    for p in plans:
        groups.setdefault((p.weight_bytes, p.kv_cache_bytes, p.routing_bytes, p.state_bytes), []).append(p.rank)
    lines = []
    for (w, kv, r, s), ranks in groups.items():
        state = f", recurrent state {_fmt(s)}" if s else ""
        lines.append(f"ranks {_ranks(ranks)}: weights {_fmt(w)}, KV cache {_fmt(kv)}, routing {_fmt(r)}{state}, "
                     f"total {_fmt(w + kv + r + s)}")
    return "\n".join(lines)


def _ranks(ranks: list[int]) -> str:
    return ",".join(map(str, ranks)) if len(ranks) <= 8 else f"{ranks[0]}..{ranks[-1]} ({len(ranks)} ranks)"


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"
