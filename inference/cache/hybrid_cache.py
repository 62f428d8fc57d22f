"""The sequence cache of hybrid models: KV blocks for the attention layers, a state slot and
prefix-cache state checkpoints for the recurrent layers.

A request gets a zeroed ``StatePool`` slot when it is admitted and keeps it while it runs;
the scheduler frees it (through ``detach`` / ``free``) once no in-flight step writes it, as
it does with KV blocks. Preemption is recompute: the slot is freed and a new one taken on
re-admission.

Prefix caching. Attention layers resume a cached prefix from its KV blocks; recurrent layers
need their state at the end of that prefix, so states are checkpointed at *checkpoint
boundaries* of each prompt: the end of its last full block that a prompt sharing it can hit
(``((prompt_len - 1) // block_size) * block_size``: the RL case, a group of samples of one
prompt), and every ``interval_blocks`` blocks before that (long shared prefixes). A prefill
chunk never crosses one of its request's boundaries (it may end at one), so the state at a
boundary exists in the slot right after the forward of the chunk that ends there:

    after_forward: snapshot the slot into a pending CheckpointStore entry (enqueued after the forward)
    chunk_applied: the step landed and the request still runs -> commit under the hash of the
                   block that ends at the boundary; else (finished a step early, aborted,
                   preempted) -> release the entry
    BlockPool.on_hash_dropped: that block was evicted / the cache reset -> drop the checkpoint

A prefix hit is cut back to the deepest matched block that has a committed checkpoint, which
is restored into the request's new slot at admission (enqueued before its first forward;
``has_initial_state`` is then True because the chunk starts past 0). A checkpoint the store
evicted on its own (LRU, to make room) is simply no longer found, so its boundary is no
longer offered as a hit. Routing rows stay keyed by KV block: the hit's rows are reused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from inference.cache.block_pool import BlockPool
from inference.request import Request, RequestStatus
from inference.cache.sequence_cache import Held, SequenceCache

if TYPE_CHECKING:
    import torch

    from inference.scheduled_step import ScheduledChunk
    from inference.cache.state_checkpoints import CheckpointStore
    from inference.cache.state_pool import StatePool


def auto_checkpoint_interval(state_bytes: int, kv_block_bytes: int) -> int:
    """The default spacing of checkpoints inside long prompts, in blocks: the smallest power
    of two whose KV is at least one checkpoint's state, so checkpoints never take more memory
    than the KV blocks they make reusable (Qwen3.5-35B-A3B / Qwen3-Next: 256 blocks,
    Nemotron-3-Nano: 512 at block size 16, bf16 KV, fp32 states)."""
    blocks = max(1, -(-state_bytes // max(1, kv_block_bytes)))
    return 1 << (blocks - 1).bit_length()


class HybridSequenceCache(SequenceCache):
    """KV blocks, one state slot per admitted request, and state checkpoints at block
    boundaries. Invariant: a running request holds a slot (``pool.slot_of(request)``); every
    pending checkpoint entry belongs to one chunk in flight (``_pending``) and is committed
    or released when that chunk is applied; a committed checkpoint's key is a block hash the
    block pool advertises (dropped with it)."""

    def __init__(self, block_pool: BlockPool, interval_blocks: int) -> None:
        super().__init__(block_pool)
        if isinstance(interval_blocks, bool) or not isinstance(interval_blocks, int) or interval_blocks < 1:
            raise ValueError(f"checkpoint interval must be an int >= 1 block, got {interval_blocks!r}")
        self.interval_blocks = interval_blocks
        self.pool: StatePool | None = None
        self.store: CheckpointStore | None = None
        self._pending: dict[tuple[Request, int], int] = {}     # (request, boundary) -> entry
        self.stats = {"snapshots": 0, "commits": 0, "restores": 0, "restored_tokens": 0, "store_evictions": 0,
                      "dropped": 0}
        block_pool.on_hash_dropped = self._hash_dropped

    def attach(self, pool: StatePool | None, store: CheckpointStore | None) -> None:
        """Use these device tensors (the engine's ``DeviceState``; None once it sleeps or is
        closed: slots still held then belong to requests that are never served again)."""
        if pool is not None and self.pool is not None and self.pool.num_used:
            raise RuntimeError("state slots are still in use")
        self.pool, self.store = pool, store
        self._pending.clear()

    @property
    def layer_states(self) -> dict[int, tuple[torch.Tensor, ...]]:
        """Recurrent layer index -> its slot tensors (``ForwardContext.recurrent_states``)."""
        pool = self._pool()
        return {layer: pool.layer_states(layer) for spec in pool.specs.values() for layer in spec.layers}

    def slot_of(self, request: Request) -> int:
        slot = self._pool().slot_of(request)
        if slot is None:
            raise RuntimeError(f"request {request.request_id!r} is scheduled but holds no state slot")
        return slot

    def _pool(self) -> StatePool:
        if self.pool is None:
            raise RuntimeError("the state pool is released (the engine sleeps)")
        return self.pool

    @property
    def caching(self) -> bool:
        return self.block_pool.enable_prefix_caching and self.store is not None and self.store.capacity > 0

    # ---- boundaries --------------------------------------------------------------------
    def next_boundary(self, request: Request, position: int) -> int | None:
        """The request's first checkpoint boundary after ``position`` (None: none left)."""
        if not self.caching:
            return None
        prompt_len, bs = request.num_prompt_tokens, self.block_size
        last = ((prompt_len - 1) // bs) * bs
        if position >= last:
            return None
        step = self.interval_blocks * bs
        return min(last, (position // step + 1) * step)

    def _is_boundary(self, request: Request, position: int) -> bool:
        return position > 0 and self.next_boundary(request, position - 1) == position

    # ---- admission ---------------------------------------------------------------------
    def match_prefix(self, request: Request) -> list[int]:
        """KV hits cut back to the deepest matched block whose end has a checkpoint (the
        recurrent layers cannot resume anywhere else)."""
        hits = super().match_prefix(request)
        if not self.caching:
            return []
        for depth in range(len(hits), 0, -1):
            if self.block_pool.block_hash(hits[depth - 1]) in self.store:
                return hits[:depth]
        return []

    def can_admit(self, request: Request, hits: list[int], num_new_blocks: int) -> bool:
        return self._pool().num_free > 0 and super().can_admit(request, hits, num_new_blocks)

    def admit(self, request: Request, hits: list[int], num_new_blocks: int) -> None:
        super().admit(request, hits, num_new_blocks)
        pool = self._pool()
        slot = pool.allocate(request)                      # zeroed (enqueued on the device)
        if hits:
            key = self.block_pool.block_hash(hits[-1])
            if not self.store.restore(key, pool, slot):
                raise AssertionError(f"request {request.request_id!r}: matched checkpoint {key:x} vanished")
            self.stats["restores"] += 1
            self.stats["restored_tokens"] += len(hits) * self.block_size

    def chunk_tokens(self, request: Request, start: int, num_tokens: int) -> int:
        boundary = self.next_boundary(request, start)
        if boundary is not None and boundary < start + num_tokens:
            return boundary - start
        return num_tokens

    # ---- a step ------------------------------------------------------------------------
    def after_forward(self, chunks: list[ScheduledChunk]) -> None:
        """Snapshot the slot of every chunk that ends at one of its request's boundaries."""
        if not self.caching:
            return
        for chunk in chunks:
            request, end = chunk.request, chunk.start + chunk.num_tokens
            if chunk.is_decode or request.status is not RequestStatus.RUNNING or not self._is_boundary(request, end):
                continue
            entry = self.store.snapshot(self._pool(), self.slot_of(request))
            if entry is not None:
                self._pending[(request, end)] = entry
                self.stats["snapshots"] += 1
        self.stats["store_evictions"] += len(self.store.take_evicted())

    def commit_scheduled(self, request: Request, start: int, end: int) -> None:
        """Nothing: a hit needs its recurrent-state checkpoint, which exists only once the
        chunk's forward has run (``chunk_applied``), so blocks are hashed when they land."""

    def chunk_applied(self, chunk: ScheduledChunk, kept: bool) -> None:
        request, end = chunk.request, chunk.start + chunk.num_tokens
        entry = self._pending.pop((request, end), None)
        if entry is None:
            return
        key = self.block_pool.block_hash(request.block_ids[end // self.block_size - 1]) if kept else None
        if key is not None and self.block_pool.is_advertised(key):
            self.store.commit(entry, key)
            self.stats["commits"] += 1
        else:
            self.store.release(entry)

    def _hash_dropped(self, block_hash: int) -> None:
        if self.store is not None and self.store.drop(block_hash):
            self.stats["dropped"] += 1

    # ---- release -----------------------------------------------------------------------
    def detach(self, request: Request) -> Held:
        held = super().detach(request)
        if self.pool is not None and self.pool.slot_of(request) is not None:
            held.slot_owner = request
        return held

    def free(self, held: Held) -> None:
        super().free(held)
        if held.slot_owner is not None:
            self._pool().free(held.slot_owner)

    def reset_prefix_cache(self) -> bool:
        if not super().reset_prefix_cache():
            return False
        if self.store is not None:
            self.store.clear()
        return True

    def check_invariants(self) -> None:
        super().check_invariants()
        if self.pool is not None:
            self.pool.check_invariants()
        if self.store is not None:
            self.store.check_invariants()
            if self.store.num_pending != len(self._pending):
                raise AssertionError(f"{self.store.num_pending} pending checkpoints, {len(self._pending)} "
                                     "known to the sequence cache")

    def check_idle(self) -> None:
        """With no request left: no slot held, no checkpoint pending."""
        self.check_invariants()
        if self.pool is not None and self.pool.num_used:
            raise AssertionError(f"{self.pool.num_used} state slots still held with no request left")
        if self._pending:
            raise AssertionError(f"{len(self._pending)} checkpoints still pending with no request left")
