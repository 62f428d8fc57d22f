"""RL groups in a workload: ``with_samples`` (n samples per prompt, ids ``<id>_<k>``) and
``replica_share`` (each data-parallel replica's requests; a group never split)."""

from __future__ import annotations

import random

import pytest

from inference.workload import PromptSpec, replica_share, with_samples


def _prompts(n: int) -> list[PromptSpec]:
    return [PromptSpec(f"p{i}", [i + 2, 5, 7], max_new_tokens=i + 1, routing_start=i % 2) for i in range(n)]


def test_samples_are_neighbours_with_their_prompt_and_index():
    prompts = _prompts(3)
    samples = with_samples(prompts, 4)
    assert [s.request_id for s in samples] == [f"p{i}_{k}" for i in range(3) for k in range(4)]
    for s in samples:
        prompt = prompts[int(s.prompt_id[1:])]
        assert s.request_id == f"{prompt.request_id}_{s.sample_index}"
        assert (s.prompt_token_ids, s.max_new_tokens, s.routing_start) == (
            prompt.prompt_token_ids, prompt.max_new_tokens, prompt.routing_start)


def test_one_sample_per_prompt_changes_nothing():
    prompts = _prompts(3)
    assert with_samples(prompts, 1) == prompts
    assert all(s.prompt_id is None and s.sample_index is None for s in with_samples(prompts, 1))


@pytest.mark.parametrize("bad", [0, -2, True, 1.5])
def test_a_bad_sample_count_is_refused(bad):
    with pytest.raises(ValueError, match="--samples-per-prompt"):
        with_samples(_prompts(2), bad)


def test_sample_ids_stay_unique_for_prompt_ids_that_look_like_sample_ids():
    prompts = [PromptSpec(i, [3]) for i in ("a", "a_1", "a_1_0", "a_10", "a_")]
    ids = [s.request_id for s in with_samples(prompts, 12)]
    assert len(set(ids)) == len(ids) == 60


def test_ids_that_grow_too_long_are_refused():
    with_samples([PromptSpec("x" * 254, [3])], 10)
    with pytest.raises(ValueError, match="shorter prompt ids"):
        with_samples([PromptSpec("x" * 254, [3])], 11)


def test_without_groups_the_share_is_the_stride():
    specs = _prompts(11)
    for size in (1, 2, 3, 4):
        for rank in range(size):
            assert replica_share(specs, rank, size) == specs[rank::size]


def test_groups_stay_whole_and_the_shares_partition_the_workload():
    rng = random.Random(0)
    for _ in range(50):
        prompts = _prompts(rng.randint(1, 9))
        specs = with_samples(prompts, rng.randint(2, 5))
        specs = [s for s in specs if rng.random() < 0.7]            # a resumed run: some samples already done
        size = rng.randint(1, 4)
        shares = [replica_share(specs, r, size) for r in range(size)]
        assert sorted((s.request_id for share in shares for s in share)) == sorted(s.request_id for s in specs)
        owner = {}
        for rank, share in enumerate(shares):
            assert share == [s for s in specs if s in share], "input order"
            for s in share:
                assert owner.setdefault(s.prompt_id, rank) == rank, "a group split over replicas"
        groups = list(dict.fromkeys(s.prompt_id for s in specs))
        for g, prompt_id in enumerate(groups):          # round robin over groups, in input order
            assert owner[prompt_id] == g % size


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="dp_rank"):
        replica_share(_prompts(2), 2, 2)
