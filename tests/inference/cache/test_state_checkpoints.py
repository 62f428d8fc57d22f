"""CheckpointStore: snapshot / commit / restore / drop, LRU eviction, invariants, and a
prefix-cache hit that resumes a layer exactly where a cold run would be."""

from __future__ import annotations

import random

import pytest
import torch

from inference.model.recurrent import GatedDeltaNet, Mamba2Mixer, RecurrentMetadata
from inference.presets import get_preset
from inference.cache.state_checkpoints import CheckpointStore
from inference.cache.state_pool import StatePool


def make(capacity=3, num_slots=4):
    pool = StatePool.for_model(get_preset("tiny-hybrid-mamba"), num_slots, torch.float32)
    return pool, CheckpointStore.for_pool(pool, capacity)


def fill(pool, slot, value):
    for t in pool.tensors.values():
        t[:, slot].fill_(value)


def slot_values(pool, slot):
    return {float(t[:, slot].flatten()[0]) for t in pool.tensors.values()}


def test_snapshot_then_restore_copies_every_state_kind():
    pool, store = make()
    fill(pool, 1, 7.0)
    entry = store.snapshot(pool, 1)
    fill(pool, 1, -1.0)                          # the slot moves on after the snapshot
    store.commit(entry, "h1")
    assert "h1" in store and store.restore("h1", pool, 2)
    assert slot_values(pool, 2) == {7.0}
    assert not store.restore("h2", pool, 3)
    assert store.bytes_per_entry == pool.bytes_per_slot and store.nbytes == 3 * pool.bytes_per_slot
    store.check_invariants()


def test_pending_entries_are_released_not_restorable_and_never_evicted():
    pool, store = make(capacity=2)
    a, b = store.snapshot(pool, 0), store.snapshot(pool, 1)
    assert store.snapshot(pool, 2) is None       # all pending: skip the checkpoint
    store.release(a)
    with pytest.raises(ValueError, match="not pending"):
        store.release(a)
    store.commit(b, "hb")
    with pytest.raises(ValueError, match="not pending"):
        store.commit(b, "again")
    assert store.num_free == 1 and store.num_committed == 1 and store.num_pending == 0
    store.check_invariants()


def test_lru_eviction_order_and_report():
    pool, store = make(capacity=2)
    for key, value in (("h1", 1.0), ("h2", 2.0)):
        fill(pool, 0, value)
        store.commit(store.snapshot(pool, 0), key)
    store.restore("h1", pool, 3)                 # h1 is now the most recently used
    fill(pool, 0, 3.0)
    store.commit(store.snapshot(pool, 0), "h3")  # evicts h2
    assert "h2" not in store and "h1" in store and "h3" in store
    assert store.take_evicted() == ["h2"] and store.take_evicted() == []
    store.restore("h3", pool, 3)
    assert slot_values(pool, 3) == {3.0}
    store.check_invariants()


def test_duplicate_commit_keeps_the_existing_entry_and_drop_frees():
    pool, store = make(capacity=3)
    fill(pool, 0, 1.0)
    first = store.commit(store.snapshot(pool, 0), "h")
    fill(pool, 0, 2.0)
    assert store.commit(store.snapshot(pool, 0), "h") == first
    assert store.num_committed == 1 and store.num_free == 2
    store.restore("h", pool, 1)
    assert slot_values(pool, 1) == {1.0}
    assert store.drop("h") and not store.drop("h")
    assert store.clear() == 0 and store.num_free == 3
    store.check_invariants()


def test_invariants_under_random_traffic():
    pool, store = make(capacity=4)
    rng = random.Random(1)
    pending: list[int] = []
    for step in range(400):
        op = rng.random()
        if op < 0.35:
            entry = store.snapshot(pool, rng.randrange(4))
            assert entry is not None or store.num_pending == store.capacity
            if entry is not None:
                pending.append(entry)
        elif op < 0.6 and pending:
            store.commit(pending.pop(rng.randrange(len(pending))), rng.randrange(8))
        elif op < 0.7 and pending:
            store.release(pending.pop())
        elif op < 0.8:
            store.drop(rng.randrange(8))
        elif op < 0.95:
            store.restore(rng.randrange(8), pool, rng.randrange(4))
        else:
            store.clear()
        store.check_invariants()
        assert store.num_pending == len(pending)


@pytest.mark.parametrize("preset", ["tiny-hybrid-gdn", "tiny-hybrid-mamba"])
def test_prefix_hit_resumes_exactly_like_a_cold_run(preset):
    """Request A computes a 12-token prefix (checkpoint at its end) and more; request B with
    the same prefix restores the checkpoint and computes only its own suffix: its outputs
    equal a cold run of its whole prompt."""
    config = get_preset(preset)
    torch.manual_seed(1)
    layer = (GatedDeltaNet(config.hidden_size, config.gated_deltanet) if config.gated_deltanet
             else Mamba2Mixer(config.hidden_size, config.mamba2))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    index = config.recurrent_layer_indices[-1]
    prefix, a_tail, b_tail = (torch.randn(n, config.hidden_size) for n in (12, 5, 7))
    pool = StatePool.for_model(config, 2, torch.float32)
    store = CheckpointStore.for_pool(pool, 2)
    with torch.no_grad():
        a = pool.allocate("A")
        layer(prefix, RecurrentMetadata.build([12], [a], [False]), *pool.layer_states(index))
        entry = store.snapshot(pool, a)          # enqueued right after the forward of the boundary
        layer(a_tail, RecurrentMetadata.build([5], [a], [True]), *pool.layer_states(index))
        store.commit(entry, "hash-of-block-2")   # at completion, with the KV commit
        pool.free("A")
        b = pool.allocate("B")
        assert store.restore("hash-of-block-2", pool, b)
        warm = layer(b_tail, RecurrentMetadata.build([7], [b], [True]), *pool.layer_states(index))
        cold_pool = StatePool.for_model(config, 1, torch.float32)
        cold = layer(torch.cat([prefix, b_tail]), RecurrentMetadata.build([19], [cold_pool.allocate("C")], [False]),
                     *cold_pool.layer_states(index))
    torch.testing.assert_close(warm, cold[12:], rtol=1e-5, atol=1e-5)
