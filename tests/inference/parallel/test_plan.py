"""Per-rank memory plan: weights equal the parameters each rank's shards really hold (and
the whole model on one rank), KV follows the head partition, the routing buffer what the
recorder allocates, placed on every rank or the leader only."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from inference.config import EngineConfig
from inference.cache.kv_cache import KVCache
from inference.model import MoEGPT
from inference.parallel import ParallelGroups, ParallelLayout, ParallelLayoutError
from inference.parallel.plan import describe_rank_plans, memory_plan, rank_weight_elements
from inference.presets import PRESETS
from routing_replay import RoutingRecorder
from tests.inference.parallel.rank_checks import CONFIGS

ENGINE = EngineConfig(block_size=4, num_kv_blocks=32, max_step_tokens=64, record_routing=True)


def _parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


ALL_CONFIGS = {**CONFIGS, **PRESETS}     # hybrids too (tests/inference/parallel/test_hybrid_layout.py: by hand)


@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
def test_one_rank_holds_the_whole_model(name):
    with torch.device("meta"):
        full = MoEGPT(ALL_CONFIGS[name])
    assert rank_weight_elements(ALL_CONFIGS[name], ParallelLayout(1), 0) == _parameters(full)


def test_tiny_model_tp2_ep2_rank_weights_by_hand():
    """tiny-moe: vocab 512, hidden 64, 4 layers (layer 0 dense, width 128), 4 heads of 16,
    2 KV heads, 8 experts of width 32."""
    h = 64
    vocab = 2 * 256 * h                                  # embedding + head, 256 rows each
    norms = (2 * 4 + 1) * h
    attention = (2 + 2 * 1) * 16 * h + h * 2 * 16        # qkv of 2 q + 1 kv heads, o_proj columns
    dense = 3 * h * 64                                   # gate, up, down at width 128 / 2
    moe = 8 * h + 4 * 3 * h * 32                         # replicated router, 4 whole experts
    expected = vocab + norms + 4 * attention + dense + 3 * moe
    layout = ParallelLayout(2, 2, 2)
    assert [rank_weight_elements(CONFIGS["tiny"], layout, r) for r in range(2)] == [expected] * 2


@pytest.mark.parametrize("name,tp,ep", [("tiny", 2, 1), ("tiny", 4, 2), ("sigmoid", 4, 4), ("rich", 4, 2),
                                        ("rich", 2, 2), ("oss", 4, 2), ("mla", 2, 2)])
def test_rank_weights_equal_the_shards_built(name, tp, ep):
    config, layout = CONFIGS[name], ParallelLayout(2 * tp, tp, ep)
    plans = memory_plan(config, ENGINE, layout)
    for rank in range(layout.world_size):
        with torch.device("meta"):
            shards = MoEGPT(config, ParallelGroups.shard_only(layout, rank))
        assert plans[rank].weight_elements == _parameters(shards), f"rank {rank}"
        assert plans[rank].weight_bytes == 4 * plans[rank].weight_elements


def test_kv_cache_split_or_replicated_with_the_kv_heads():
    config = CONFIGS["tiny"]                                            # 2 KV heads
    full = KVCache.bytes_per_block(config, ENGINE.block_size, torch.float32) * (ENGINE.num_kv_blocks + 1)
    assert memory_plan(config, ENGINE, ParallelLayout(2, 2))[0].kv_cache_bytes * 2 == full
    assert all(p.kv_cache_bytes * 2 == full for p in memory_plan(config, ENGINE, ParallelLayout(4, 4)))
    mla = CONFIGS["mla"]                                                # the latent is replicated
    latent = KVCache.bytes_per_block(mla, ENGINE.block_size, torch.float32) * (ENGINE.num_kv_blocks + 1)
    assert {p.kv_cache_bytes for p in memory_plan(mla, ENGINE, ParallelLayout(4, 4, 2))} == {latent}


def test_routing_buffer_is_what_the_recorder_allocates_on_all_ranks_or_the_leader():
    config = CONFIGS["sigmoid"]
    recorder = RoutingRecorder(num_kv_blocks=ENGINE.num_kv_blocks, block_size=ENGINE.block_size,
                               num_moe_layers=config.num_moe_layers, topk=config.topk,
                               num_experts=config.num_experts, max_step_tokens=ENGINE.max_step_tokens, device="cpu")
    allocated = recorder.staging.nbytes + recorder.block_routing.nbytes
    layout = ParallelLayout(4, 2, 2)
    assert [p.routing_bytes for p in memory_plan(config, ENGINE, layout)] == [allocated] * 4
    leader_only = memory_plan(config, ENGINE, layout, routing_on="leader")
    assert [p.routing_bytes for p in leader_only] == [allocated, 0, allocated, 0]
    assert [p.is_replica_leader for p in leader_only] == [True, False, True, False]
    off = memory_plan(config, dataclasses.replace(ENGINE, record_routing=False), layout)
    assert {p.routing_bytes for p in off} == {0}
    text = describe_rank_plans(leader_only)
    assert text.count("\n") == 1 and text.startswith("ranks 0,2: weights ") and "routing 0 B" in text


def test_bad_inputs_rejected():
    with pytest.raises(ParallelLayoutError, match="attention heads"):
        memory_plan(CONFIGS["tiny"], ENGINE, ParallelLayout(8, 8))
    with pytest.raises(ValueError, match="routing_on"):
        memory_plan(CONFIGS["tiny"], ENGINE, ParallelLayout(1), routing_on="some")
