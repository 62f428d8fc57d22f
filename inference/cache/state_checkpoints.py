"""Recurrent-state checkpoints for the hybrid prefix cache, keyed by KV block hash.

Attention layers resume a cached prefix from its KV blocks; recurrent layers need their
state at the end of that prefix. A checkpoint is a copy of one pool slot (every recurrent
layer's conv and recurrent state) taken when a request's computed tokens reach a block
boundary, stored under the hash of the block that ends there. A prefix hit that ends at a
block with a checkpoint restores it into the new request's slot.

Lifecycle of an entry, matching the asynchronous step pipeline:

    free --snapshot (at launch, on the compute stream, after the forward that produced it)--> pending
    pending --commit(key) (when that step completed, with the KV block commit)--> committed
    pending --release (the step was discarded: abort, finish one step early)--> free
    committed --drop(key) (the KV owner evicted or invalidated that block)--> free
    committed --evicted (the store is full and a new snapshot needs room; LRU)--> free

Committed entries are kept in least-recently-used order (commit and restore count as a
use); keys that the store evicted on its own are reported by ``take_evicted`` so the KV
owner can stop advertising those boundaries.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch

from inference.cache.state_pool import StatePool, StateSpec

__all__ = ["CheckpointStore"]


class CheckpointStore:
    """A fixed number of state checkpoints.

    Invariant: ``num_free + num_pending + num_committed == capacity``; every committed
    entry carries exactly one key and every key names exactly one committed entry; pending
    entries carry no key and are never evicted.
    """

    def __init__(self, specs: list[StateSpec], capacity: int, device: torch.device | str = "cpu") -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"checkpoint capacity must be an int >= 0, got {capacity!r}")
        self.capacity = capacity
        self.tensors = {s.name: torch.zeros(len(s.layers), capacity, *s.shape, dtype=s.dtype, device=device)
                        for s in specs}
        self.bytes_per_entry = sum(s.bytes_per_slot for s in specs)
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._pending: set[int] = set()
        self._entry_of: OrderedDict[Hashable, int] = OrderedDict()   # first = least recently used
        self._key_of: dict[int, Hashable] = {}
        self._evicted: list[Hashable] = []

    @classmethod
    def for_pool(cls, pool: StatePool, capacity: int) -> "CheckpointStore":
        return cls(list(pool.specs.values()), capacity, pool.device)

    # ----------------------------------------------------------------- counts

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    @property
    def num_committed(self) -> int:
        return len(self._entry_of)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entry_of

    # ----------------------------------------------------------------- lifecycle

    def snapshot(self, pool: StatePool, slot: int) -> int | None:
        """Enqueue a copy of ``slot`` into a pending entry and return its id; evicts the
        least recently used committed entry when none is free. None when every entry is
        pending (the caller simply skips this checkpoint)."""
        if not self._free:
            if not self._entry_of:
                return None
            key, entry = self._entry_of.popitem(last=False)
            del self._key_of[entry]
            self._evicted.append(key)
            self._free.append(entry)
        entry = self._free.pop()
        pool.copy_slot_to(slot, self.tensors, entry)
        self._pending.add(entry)
        return entry

    def commit(self, entry: int, key: Hashable) -> int:
        """Make a pending entry restorable under ``key``. If ``key`` is already committed
        (another request computed the same prefix) the new copy is released and the
        existing entry is kept; returns the entry that now holds ``key``."""
        self._take_pending(entry)
        if key in self._entry_of:
            self._free.append(entry)
            self._entry_of.move_to_end(key)
            return self._entry_of[key]
        self._entry_of[key] = entry
        self._key_of[entry] = key
        return entry

    def release(self, entry: int) -> None:
        """Discard a pending entry (the step that would have made it valid was dropped)."""
        self._take_pending(entry)
        self._free.append(entry)

    def restore(self, key: Hashable, pool: StatePool, slot: int) -> bool:
        """Enqueue the copy of ``key``'s checkpoint into ``slot``; False if there is none."""
        entry = self._entry_of.get(key)
        if entry is None:
            return False
        pool.copy_slot_from(slot, self.tensors, entry)
        self._entry_of.move_to_end(key)
        return True

    def drop(self, key: Hashable) -> bool:
        """Forget ``key``'s checkpoint (its KV block was evicted); False if there was none."""
        entry = self._entry_of.pop(key, None)
        if entry is None:
            return False
        del self._key_of[entry]
        self._free.append(entry)
        return True

    def clear(self) -> int:
        """Drop every committed checkpoint (weights changed, prefix cache reset); pending
        entries stay pending. Returns how many were dropped."""
        keys = list(self._entry_of)
        for key in keys:
            self.drop(key)
        return len(keys)

    def take_evicted(self) -> list[Hashable]:
        """Keys the store evicted on its own since the last call."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def check_invariants(self) -> None:
        def expect(condition: bool, message: str) -> None:
            if not condition:
                raise AssertionError(f"CheckpointStore invariant broken: {message}")

        committed = set(self._key_of)
        expect(self.num_free + self.num_pending + self.num_committed == self.capacity,
               f"free {self.num_free} + pending {self.num_pending} + committed {self.num_committed} "
               f"!= {self.capacity}")
        expect(len(set(self._free)) == len(self._free), "an entry is free twice")
        expect(not (set(self._free) & self._pending or set(self._free) & committed or self._pending & committed),
               "an entry is in two states")
        expect(len(committed) == len(self._entry_of)
               and all(self._key_of[e] == k for k, e in self._entry_of.items()), "key and entry maps disagree")

    def _take_pending(self, entry: int) -> None:
        if entry not in self._pending:
            raise ValueError(f"checkpoint entry {entry!r} is not pending")
        self._pending.remove(entry)
