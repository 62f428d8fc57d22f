"""BlockPool: allocation, ref counts, chained prefix hashes, LRU eviction, invariants."""

from __future__ import annotations

import random

import pytest

from inference.cache.block_pool import BlockPool, NoFreeBlocksError

BS = 4


def _commit_chain(pool: BlockPool, blocks: list[int], tokens: list[int]) -> None:
    """Commit `blocks` as the full blocks of `tokens`, in position order."""
    for i, block in enumerate(blocks):
        parent = blocks[i - 1] if i else None
        pool.commit_full_block(block, parent, tokens[i * BS : (i + 1) * BS])


def _cached_sequence(pool: BlockPool, tokens: list[int]) -> list[int]:
    """Allocate, commit and release blocks for `tokens` (like a finished request)."""
    blocks = pool.allocate(len(tokens) // BS)
    _commit_chain(pool, blocks, tokens)
    pool.free(blocks)
    return blocks


def _counts(pool: BlockPool) -> tuple[int, int, int]:
    return pool.num_free, pool.num_cached_free, pool.num_in_use


def test_new_pool_is_all_free():
    pool = BlockPool(8, BS)
    assert _counts(pool) == (8, 0, 0)
    assert pool.num_available == 8
    assert pool.dummy_block_id == 8
    assert all(pool.ref_count(b) == 0 and pool.block_hash(b) is None for b in range(8))
    pool.check_invariants()


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0), (-1, 4), (2.0, 4)])
def test_bad_sizes_are_rejected(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockPool(num_blocks, block_size)


def test_allocate_hands_out_distinct_blocks_with_one_reference():
    pool = BlockPool(8, BS)
    a, b = pool.allocate(3), pool.allocate(5)
    assert len(set(a + b)) == 8 and set(a + b) == set(range(8))
    assert all(pool.ref_count(x) == 1 for x in a + b)
    assert _counts(pool) == (0, 0, 8)
    assert pool.allocate(0) == []
    pool.check_invariants()


def test_allocate_is_all_or_nothing():
    pool = BlockPool(4, BS)
    held = pool.allocate(2)
    with pytest.raises(NoFreeBlocksError) as info:
        pool.allocate(3)
    assert isinstance(info.value, RuntimeError)
    assert "3" in str(info.value) and "2" in str(info.value)
    assert _counts(pool) == (2, 0, 2)
    assert sorted(held + pool.allocate(2)) == [0, 1, 2, 3]
    pool.check_invariants()


def test_free_returns_unhashed_blocks_to_the_free_list():
    pool = BlockPool(4, BS)
    blocks = pool.allocate(4)
    pool.free(blocks[:3])
    assert _counts(pool) == (3, 0, 1)
    assert all(pool.ref_count(b) == 0 for b in blocks[:3])
    pool.check_invariants()


def test_over_free_and_bad_ids_are_rejected_without_changes():
    pool = BlockPool(4, BS)
    blocks = pool.allocate(2)
    with pytest.raises(ValueError, match="freed more often"):
        pool.free([blocks[0], blocks[1], blocks[0]])
    with pytest.raises(ValueError):
        pool.free([pool.dummy_block_id])
    with pytest.raises(ValueError):
        pool.free([-1])
    assert [pool.ref_count(b) for b in blocks] == [1, 1]
    assert _counts(pool) == (2, 0, 2)
    with pytest.raises(ValueError):
        pool.ref_count(pool.dummy_block_id)
    pool.check_invariants()


def test_committed_chain_is_matched_and_freed_blocks_stay_cached():
    pool = BlockPool(8, BS)
    tokens = list(range(100, 112))
    blocks = _cached_sequence(pool, tokens)
    assert _counts(pool) == (5, 3, 0)
    assert all(pool.block_hash(b) is not None for b in blocks)
    assert pool.match_prefix(tokens, max_blocks=10) == blocks
    assert pool.match_prefix(tokens + [1, 2, 3], max_blocks=10) == blocks  # partial tail
    assert pool.match_prefix(tokens, max_blocks=2) == blocks[:2]
    assert pool.match_prefix(tokens, max_blocks=0) == []
    assert pool.match_prefix(tokens[:7], max_blocks=10) == blocks[:1]  # only full blocks
    # Matching is a query: nothing is revived.
    assert _counts(pool) == (5, 3, 0)
    pool.check_invariants()


def test_match_stops_at_the_first_differing_block():
    pool = BlockPool(8, BS)
    tokens = list(range(12))
    blocks = _cached_sequence(pool, tokens)
    changed = tokens[:4] + [99] + tokens[5:]
    assert pool.match_prefix(changed, max_blocks=3) == blocks[:1]
    assert pool.match_prefix([99] + tokens[1:], max_blocks=3) == []


def test_hashes_are_chained_so_equal_blocks_after_different_prefixes_do_not_match():
    pool = BlockPool(8, BS)
    first = [1, 1, 1, 1, 7, 7, 7, 7]
    blocks = _cached_sequence(pool, first)
    assert pool.block_hash(blocks[1]) != BlockPool(8, BS).compute_hash(None, [7, 7, 7, 7])
    # Same second block, different first block: the second block must not be reused.
    assert pool.match_prefix([2, 2, 2, 2, 7, 7, 7, 7], max_blocks=2) == []


def test_hash_is_stable_across_pools():
    a, b = BlockPool(4, BS), BlockPool(16, BS)
    assert a.compute_hash(None, [1, 2, 3, 4]) == b.compute_hash(None, (1, 2, 3, 4))
    parent = a.compute_hash(None, [1, 2, 3, 4])
    assert a.compute_hash(parent, [5, 6, 7, 8]) == b.compute_hash(parent, [5, 6, 7, 8])
    assert a.compute_hash(parent, [5, 6, 7, 8]) != a.compute_hash(None, [5, 6, 7, 8])


class _CollidingPool(BlockPool):
    """Every block of a given depth hashes alike, whatever its tokens."""

    def compute_hash(self, parent_hash, token_ids):
        return 0 if parent_hash is None else parent_hash + 1


def test_token_ids_guard_against_hash_collisions():
    pool = _CollidingPool(8, BS)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    blocks = _cached_sequence(pool, tokens)
    assert pool.match_prefix(tokens, max_blocks=2) == blocks
    assert pool.match_prefix([9, 9, 9, 9] + tokens[4:], max_blocks=2) == []
    assert pool.match_prefix(tokens[:4] + [9, 9, 9, 9], max_blocks=2) == blocks[:1]


def test_duplicate_content_keeps_the_first_mapping():
    pool = BlockPool(8, BS)
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    a, b = pool.allocate(2), pool.allocate(2)
    _commit_chain(pool, a, tokens)
    _commit_chain(pool, b, tokens)  # two requests computed the same prefix at once
    assert pool.match_prefix(tokens, max_blocks=2) == a
    # The duplicate still carries the hash, so its own children could chain from it.
    assert [pool.block_hash(x) for x in b] == [pool.block_hash(x) for x in a]
    pool.free(a + b)
    assert _counts(pool) == (4, 4, 0)
    pool.check_invariants()


def test_commit_is_a_noop_when_hashed_and_checks_its_arguments():
    pool = BlockPool(8, BS)
    blocks = pool.allocate(2)
    pool.commit_full_block(blocks[0], None, [1, 2, 3, 4])
    first_hash = pool.block_hash(blocks[0])
    pool.commit_full_block(blocks[0], None, [5, 6, 7, 8])
    assert pool.block_hash(blocks[0]) == first_hash
    with pytest.raises(ValueError, match="full block"):
        pool.commit_full_block(blocks[1], blocks[0], [1, 2, 3])
    other = pool.allocate(1)[0]
    with pytest.raises(ValueError, match="not committed"):
        pool.commit_full_block(blocks[1], other, [1, 2, 3, 4])
    pool.free([other])
    with pytest.raises(ValueError, match="not in use"):
        pool.commit_full_block(other, None, [1, 2, 3, 4])
    pool.check_invariants()


def test_take_revives_cached_free_blocks_and_shares_in_use_ones():
    pool = BlockPool(8, BS)
    tokens = list(range(8))
    blocks = _cached_sequence(pool, tokens)
    hits = pool.match_prefix(tokens, max_blocks=2)
    pool.take(hits)
    assert _counts(pool) == (6, 0, 2)
    assert pool.num_available == 6
    pool.take(hits)  # a second request shares them
    assert [pool.ref_count(b) for b in blocks] == [2, 2]
    pool.free(hits)
    assert _counts(pool) == (6, 0, 2)
    pool.free(hits)
    assert _counts(pool) == (6, 2, 0)
    pool.check_invariants()


def test_take_refuses_free_uncached_blocks():
    pool = BlockPool(4, BS)
    with pytest.raises(ValueError, match="allocate"):
        pool.take([0])
    assert _counts(pool) == (4, 0, 0)


def test_allocate_uses_free_blocks_before_evicting_cached_ones():
    pool = BlockPool(4, BS)
    tokens = list(range(8))
    blocks = _cached_sequence(pool, tokens)
    fresh = pool.allocate(2)
    assert not set(fresh) & set(blocks)
    assert pool.match_prefix(tokens, max_blocks=2) == blocks
    pool.check_invariants()


def test_lru_evicts_older_requests_first_and_tails_before_heads():
    pool = BlockPool(4, BS)
    a_tokens, b_tokens = [1] * 8, [2] * 8
    a = _cached_sequence(pool, a_tokens)  # freed first: least recently used
    b = _cached_sequence(pool, b_tokens)
    assert _counts(pool) == (0, 4, 0)
    assert pool.allocate(1) == [a[1]]  # tail of the oldest request goes first
    assert pool.block_hash(a[1]) is None
    assert pool.match_prefix(a_tokens, max_blocks=2) == a[:1]
    assert pool.allocate(1) == [a[0]]
    assert pool.match_prefix(a_tokens, max_blocks=2) == []
    assert pool.match_prefix(b_tokens, max_blocks=2) == b
    pool.check_invariants()


def test_reviving_a_block_refreshes_its_recency():
    pool = BlockPool(4, BS)
    a_tokens, b_tokens = [1] * 8, [2] * 8
    a = _cached_sequence(pool, a_tokens)
    b = _cached_sequence(pool, b_tokens)
    hits = pool.match_prefix(a_tokens, max_blocks=2)
    pool.take(hits)
    pool.free(hits)  # A is now the most recently used
    assert pool.allocate(2) == [b[1], b[0]]
    assert pool.match_prefix(a_tokens, max_blocks=2) == a
    pool.check_invariants()


def test_prefix_caching_disabled_never_hashes():
    pool = BlockPool(4, BS, enable_prefix_caching=False)
    tokens = list(range(8))
    blocks = _cached_sequence(pool, tokens)
    assert all(pool.block_hash(b) is None for b in blocks)
    assert pool.match_prefix(tokens, max_blocks=2) == []
    assert _counts(pool) == (4, 0, 0)


def test_reset_prefix_cache_forgets_only_when_idle():
    pool = BlockPool(4, BS)
    tokens = list(range(8))
    _cached_sequence(pool, tokens)
    held = pool.allocate(1)
    assert pool.reset_prefix_cache() is False
    assert pool.match_prefix(tokens, max_blocks=2) != []
    pool.free(held)
    assert pool.reset_prefix_cache() is True
    assert pool.match_prefix(tokens, max_blocks=2) == []
    assert _counts(pool) == (4, 0, 0)
    pool.check_invariants()


def test_check_invariants_detects_corruption():
    pool = BlockPool(4, BS)
    blocks = pool.allocate(2)
    pool.check_invariants()
    # Corrupt the pool the way a double release would, bypassing the public checks.
    pool._ref_counts[blocks[0]] = 0  # noqa: SLF001 - deliberate corruption
    with pytest.raises(AssertionError, match="invariant"):
        pool.check_invariants()


# ------------------------------------------------------------------ randomized stress


class _Model:
    """What the pool must agree with: references held by simulated requests, and which
    full prefix each committed block's KV was computed for."""

    def __init__(self) -> None:
        self.holders: dict[int, list[int]] = {}  # holder id -> blocks (one reference each)
        self.prefix_of_block: dict[int, tuple[int, ...]] = {}

    def refs(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for blocks in self.holders.values():
            for b in blocks:
                counts[b] = counts.get(b, 0) + 1
        return counts


def _random_tokens(rng: random.Random, bases: list[list[int]]) -> list[int]:
    # Shared bases make prefix hits common; a tiny vocabulary makes equal blocks common.
    base = rng.choice(bases)
    cut = rng.randrange(len(base) + 1)
    return base[:cut] + [rng.randrange(3) for _ in range(rng.randrange(0, 13))]


def _stress_admit(pool, model, rng, bases, holder_id) -> None:
    tokens = _random_tokens(rng, bases)
    num_full = len(tokens) // BS
    hits = pool.match_prefix(tokens, max_blocks=rng.randrange(num_full + 1))
    for i, b in enumerate(hits):  # a hit holds exactly this prefix's KV
        assert model.prefix_of_block[b] == tuple(tokens[: (i + 1) * BS])
    before = _counts(pool)
    refs = model.refs()
    need = num_full - len(hits) + rng.randrange(2)  # sometimes a partial tail block
    revived = sum(refs.get(b, 0) == 0 for b in hits)
    if need > pool.num_available - revived:
        with pytest.raises(NoFreeBlocksError):
            pool.allocate(pool.num_available + 1)
        assert _counts(pool) == before
        return
    pool.take(hits)
    fresh = pool.allocate(need)
    assert all(refs.get(b, 0) == 0 for b in fresh), "allocate handed out a held block"
    blocks = hits + fresh
    for i in range(len(hits), num_full):
        parent = blocks[i - 1] if i else None
        pool.commit_full_block(blocks[i], parent, tokens[i * BS : (i + 1) * BS])
        model.prefix_of_block[blocks[i]] = tuple(tokens[: (i + 1) * BS])
    model.holders[holder_id] = blocks


def test_randomized_stress_against_a_reference_model():
    rng = random.Random(1234)
    pool = BlockPool(24, BS)
    model = _Model()
    bases = [[rng.randrange(3) for _ in range(20)] for _ in range(4)]
    num_ops = 6000
    for op in range(num_ops):
        action = rng.random()
        if action < 0.45 or not model.holders:
            _stress_admit(pool, model, rng, bases, holder_id=op)
        elif action < 0.9:
            holder = rng.choice(list(model.holders))
            pool.free(model.holders.pop(holder))
        elif action < 0.97:
            # Share an existing holder's committed prefix outright, like a forked request.
            blocks = model.holders[rng.choice(list(model.holders))]
            shared = [b for b in blocks if pool.block_hash(b) is not None]
            pool.take(shared)
            model.holders[op] = shared
        elif not model.holders or pool.num_in_use == 0:
            assert pool.reset_prefix_cache() is True
        else:
            assert pool.reset_prefix_cache() is False
        pool.check_invariants()
        refs = model.refs()
        assert all(pool.ref_count(b) == refs.get(b, 0) for b in range(pool.num_blocks)), op
        assert pool.num_in_use == len(refs)
        assert pool.num_free + pool.num_cached_free + pool.num_in_use == pool.num_blocks
    for blocks in model.holders.values():
        pool.free(blocks)
    pool.check_invariants()
    assert pool.num_available == pool.num_blocks
