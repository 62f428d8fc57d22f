"""The per-rank memory plan of a layout (for ``--dry-run``): weights, KV cache and routing
buffer bytes of every rank, computed from the configs alone (nothing is allocated).

Per rank, with ``tp`` / ``ep`` / ``etp = tp / ep``:
- weights: the vocabulary shard (padded vocabulary / tp rows, embedding and an untied
  head), this rank's attention heads, ``1/tp`` of each dense and shared-expert MLP,
  ``num_experts / ep`` experts at ``1/etp`` of their width, and the replicated rest
  (norms, routers, the shared-expert gate);
- KV cache: ``num_kv_blocks + 1`` blocks of this rank's KV heads (``kv_heads / tp``, or one
  replicated head when ``tp > kv_heads``). Every rank of a replica has the same block ids:
  the replica's one schedule drives all of them. (A latent-attention cache, MLA, is
  replicated over TP instead: the later integration must count it whole per rank.)
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

import torch

from inference.config import EngineConfig, ModelConfig
from inference.parallel.layout import ParallelLayout, padded_vocab_size

ROUTING_PLACEMENTS = ("all", "leader")


@dataclass(frozen=True)
class RankMemoryPlan:
    """Bytes one rank allocates for weights, KV cache and the routing buffer. Invariant:
    ``total_bytes`` is their sum; ranks of one replica differ at most in ``routing_bytes``."""

    rank: int
    dp_rank: int
    tp_rank: int
    is_replica_leader: bool
    weight_elements: int
    weight_bytes: int
    kv_cache_bytes: int
    routing_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.routing_bytes


def rank_weight_elements(config: ModelConfig, layout: ParallelLayout, tp_rank: int) -> int:
    """Parameters held by the rank at ``tp_rank`` of a replica (buffers such as expert
    biases excluded, as in the single-process count)."""
    t, h, d = layout.tp, config.hidden_size, config.head_dim
    heads = layout.heads(config, tp_rank)
    vocab_rows = padded_vocab_size(config.vocab_size, t) // t
    total = vocab_rows * h * (1 if config.tie_word_embeddings else 2) + h     # + final norm
    qkv_rows = (heads.num_heads + 2 * heads.num_kv_heads) * d
    attention = qkv_rows * h + h * heads.num_heads * d + (qkv_rows if config.attention_bias else 0)
    if config.qk_norm == "per_head":
        attention += 2 * d
    elif config.qk_norm == "full":
        attention += (heads.num_heads + heads.num_kv_heads) * d
    local_experts = config.num_experts // layout.ep
    moe = (config.num_experts * h + 3 * local_experts * h * (config.moe_intermediate_size // layout.etp)
           + 3 * h * (config.shared_expert_intermediate_size // t))
    if config.shared_expert_intermediate_size and config.shared_expert_gate:
        moe += h
    dense = 3 * h * (config.intermediate_size // t)
    total += config.num_layers * (attention + 2 * h) + config.num_moe_layers * moe
    return total + (config.num_layers - config.num_moe_layers) * dense


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
    plans = []
    for rank in range(layout.world_size):
        c = layout.coords(rank)
        leader = rank == layout.replica_leader(c.dp_rank)
        kv_heads = layout.heads(config, c.tp_rank).num_kv_heads
        kv = 2 * config.num_layers * kv_heads * config.head_dim * engine.block_size * (engine.num_kv_blocks + 1) * elem
        weights = rank_weight_elements(config, layout, c.tp_rank)
        plans.append(RankMemoryPlan(rank, c.dp_rank, c.tp_rank, leader, weights, weights * elem, kv,
                                    routing if routing_on == "all" or leader else 0))
    return plans


def describe_rank_plans(plans: list[RankMemoryPlan]) -> str:
    """``--dry-run`` lines: one per distinct per-rank plan (ranks listed), bytes in GiB/MiB."""
    groups: dict[tuple[int, int, int], list[int]] = {}
    for p in plans:
        groups.setdefault((p.weight_bytes, p.kv_cache_bytes, p.routing_bytes), []).append(p.rank)
    lines = []
    for (w, kv, r), ranks in groups.items():
        lines.append(f"ranks {_ranks(ranks)}: weights {_fmt(w)}, KV cache {_fmt(kv)}, routing {_fmt(r)}, "
                     f"total {_fmt(w + kv + r)}")
    return "\n".join(lines)


def _ranks(ranks: list[int]) -> str:
    return ",".join(map(str, ranks)) if len(ranks) <= 8 else f"{ranks[0]}..{ranks[-1]} ({len(ranks)} ranks)"


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"
