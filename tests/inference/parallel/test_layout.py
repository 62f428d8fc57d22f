"""ParallelLayout: the rank mapping, its groups, the head partition, and bad layouts
rejected up front with every problem named; ParallelGroups without processes."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from inference.config import ModelConfig
from inference.parallel import GroupHandle, ParallelGroups, ParallelLayout, ParallelLayoutError, padded_vocab_size
from inference.presets import get_preset

LAYOUTS = [(1, 1, 1), (2, 2, 1), (2, 2, 2), (4, 2, 2), (8, 4, 2), (8, 8, 4), (8, 2, 1), (8, 1, 1)]


@pytest.mark.parametrize("world,tp,ep", LAYOUTS)
def test_groups_partition_the_world_consistently_with_coords(world, tp, ep):
    layout = ParallelLayout(world, tp, ep)
    assert layout.dp * layout.tp == world and layout.ep * layout.etp == tp
    kinds = {"tp": (layout.tp_groups(), tp), "ep": (layout.ep_groups(), ep), "etp": (layout.etp_groups(), layout.etp),
             "dp": (layout.dp_groups(), layout.dp)}
    for name, (groups, size) in kinds.items():
        members = sorted(itertools.chain.from_iterable(groups))
        assert members == list(range(world)), f"{name} groups must cover every rank once"
        assert all(len(g) == size for g in groups), name
    for rank in range(world):
        c = layout.coords(rank)
        assert rank == c.dp_rank * tp + c.tp_rank and c.tp_rank == c.ep_rank * layout.etp + c.etp_rank
        tp_group = next(g for g in layout.tp_groups() if rank in g)
        assert tp_group[0] == layout.replica_leader(c.dp_rank) and tp_group.index(rank) == c.tp_rank
        ep_group = next(g for g in layout.ep_groups() if rank in g)
        assert [layout.coords(r).ep_rank for r in ep_group] == list(range(ep))
        assert {(layout.coords(r).dp_rank, layout.coords(r).etp_rank) for r in ep_group} == {(c.dp_rank, c.etp_rank)}
        etp_group = next(g for g in layout.etp_groups() if rank in g)
        assert {layout.coords(r).ep_rank for r in etp_group} == {c.ep_rank}
        dp_group = next(g for g in layout.dp_groups() if rank in g)
        assert {layout.coords(r).tp_rank for r in dp_group} == {c.tp_rank}


def test_documented_mapping_tp4_ep2_two_replicas():
    layout = ParallelLayout(8, 4, 2)
    assert layout.tp_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.ep_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]      # stride etp = 2
    assert layout.etp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.coords(5) == dataclasses.replace(layout.coords(5), dp_rank=1, tp_rank=1, ep_rank=0, etp_rank=1)
    assert layout.expert_range(1, 8) == (4, 8)


@pytest.mark.parametrize("world,tp,ep,fragment", [
    (6, 4, 1, "world size 6 is not divisible by --tensor-parallel-size 4"),
    (4, 4, 3, "--expert-parallel-size 3 must divide --tensor-parallel-size 4"),
    (8, 2, 4, "expert parallelism runs inside a replica"),
    (0, 1, 1, "world-size must be an int >= 1"),
    (2, True, 1, "tensor-parallel-size must be an int >= 1"),
])
def test_bad_layouts_rejected(world, tp, ep, fragment):
    with pytest.raises(ParallelLayoutError, match=fragment):
        ParallelLayout(world, tp, ep)


def test_model_problems_all_reported_at_once():
    config = ModelConfig(num_heads=6, num_kv_heads=3, num_experts=6, topk=2, intermediate_size=102,
                         moe_intermediate_size=30, shared_expert_intermediate_size=50)
    with pytest.raises(ParallelLayoutError) as info:
        ParallelLayout(4, 4, 4).validate_model(config)
    text = str(info.value)
    assert len(info.value.problems) == 5, text
    for fragment in ("does not divide the 6 attention heads", "3 KV heads", "does not divide the 6 experts",
                     "dense MLP width 102", "shared-expert width 50"):
        assert fragment in text
    with pytest.raises(ParallelLayoutError, match="moe_intermediate_size 30"):
        ParallelLayout(4, 4, 1).validate_model(dataclasses.replace(config, num_heads=4, num_kv_heads=4,
                                                                   num_experts=8, intermediate_size=128,
                                                                   shared_expert_intermediate_size=0))
    ParallelLayout(4, 2, 2).validate_model(get_preset("tiny-moe"))     # a valid one passes


@pytest.mark.parametrize("tp,kv", [(4, 2), (4, 1), (2, 2), (4, 4), (8, 2)])
def test_head_partition_keeps_each_query_head_with_its_kv_head(tp, kv):
    config = ModelConfig(num_heads=8, num_kv_heads=kv)
    layout = ParallelLayout(tp, tp)
    group = config.num_heads // kv
    seen_q = []
    for r in range(tp):
        p = layout.heads(config, r)
        seen_q += list(range(p.q_start, p.q_stop))
        assert {q // group for q in range(p.q_start, p.q_stop)} <= set(range(p.kv_start, p.kv_stop))
        assert p.num_kv_heads == max(1, kv // tp) and p.kv_replicas == max(1, tp // kv)
    assert seen_q == list(range(config.num_heads))
    assert layout.megatron_compatible(config) == (kv % tp == 0)


def test_padded_vocab_size():
    assert padded_vocab_size(509, 4) == 512 and padded_vocab_size(512, 4) == 512
    assert padded_vocab_size(151936, 8, multiple=128) == 152576       # megatron-training's padding


def test_shard_only_groups_describe_ranks_but_refuse_collectives():
    groups = ParallelGroups.shard_only(ParallelLayout(8, 4, 2), 6)
    assert (groups.tp.rank, groups.tp.size, groups.ep.rank, groups.etp.rank, groups.dp.rank) == (2, 4, 1, 0, 1)
    assert groups.replica_leader == 4 and not groups.is_replica_leader
    with pytest.raises(RuntimeError, match="shard_only"):
        groups.tp.all_reduce(torch.ones(2))
    x = torch.ones(3)
    assert GroupHandle(0, 1).all_reduce(x) is x and GroupHandle(0, 1).all_gather(x) is x
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        ParallelGroups.build(ParallelLayout(1))
