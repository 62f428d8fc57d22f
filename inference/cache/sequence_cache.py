"""What a request holds in the engine's caches while it runs, behind one lifecycle interface.

The scheduler decides when requests are admitted, grow, are preempted and finish; it asks a
``SequenceCache`` to do the bookkeeping of each transition and never spells out what a model
family keeps per request:

- ``SequenceCache``: KV blocks of the ``BlockPool`` (every model), prefix hits by block hash.
- ``HybridSequenceCache`` (models with recurrent layers, ``inference.cache.hybrid_cache``): the
  same KV blocks for the attention layers, plus one ``StatePool`` slot per request for the
  recurrent layers and ``CheckpointStore`` entries that make a prefix hit restorable.

Lifecycle calls, in the order the scheduler makes them:

    match_prefix -> can_admit -> admit            (a waiting request starts, maybe from a hit)
    chunk_tokens                                  (how far one chunk of it may run)
    grow                                          (blocks for the next chunk; False: preempt)
    after_forward                                 (the runner, once a step's forward is enqueued)
    commit_scheduled                              (a chunk is final in this step's schedule)
    commit_full_blocks -> chunk_applied           (a step's results landed)
    detach -> free                                (finish / abort / preempt; ``free`` only once no
                                                   in-flight step writes what was detached)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from inference.cache.block_pool import BlockPool
from inference.request import Request

if TYPE_CHECKING:
    from inference.scheduled_step import ScheduledChunk


@dataclass
class Held:
    """What a request held when it was detached: KV blocks and, for hybrids, its state slot
    (``slot_owner`` is the StatePool owner key, None when it held none)."""

    blocks: list[int] = field(default_factory=list)
    slot_owner: object | None = None

    @property
    def is_empty(self) -> bool:
        return not self.blocks and self.slot_owner is None


class SequenceCache:
    """KV blocks per request. Invariant: a running request's ``block_ids`` are referenced in
    the pool once each; whatever ``detach`` takes off a request is given back to the pool
    exactly once, by ``free``."""

    def __init__(self, block_pool: BlockPool) -> None:
        self.block_pool = block_pool
        self.block_size = block_pool.block_size

    # ---- admission ---------------------------------------------------------------------
    def match_prefix(self, request: Request) -> list[int]:
        """Cached blocks a waiting request can start from (not taken yet). The last token is
        always recomputed (its logits are needed) and hits are whole blocks, so a shared
        block is never written; prompt log-probs need every prompt position computed."""
        if request.sampling_params.prompt_logprobs:
            return []
        return self.block_pool.match_prefix(request.all_token_ids, (request.num_tokens - 1) // self.block_size)

    def can_admit(self, request: Request, hits: list[int], num_new_blocks: int) -> bool:
        pool = self.block_pool
        revived = sum(pool.ref_count(block_id) == 0 for block_id in hits)
        return num_new_blocks <= pool.num_available - revived

    def admit(self, request: Request, hits: list[int], num_new_blocks: int) -> None:
        """Give the request its hits and ``num_new_blocks`` fresh blocks (``can_admit`` said yes)."""
        self.block_pool.take(hits)
        request.block_ids = hits + self.block_pool.allocate(num_new_blocks)

    def chunk_tokens(self, request: Request, start: int, num_tokens: int) -> int:
        """How many of ``num_tokens`` from ``start`` one chunk may compute (all of them here)."""
        return num_tokens

    def grow(self, request: Request, num_positions: int) -> bool:
        """Blocks for positions [0, num_positions); False if the pool is short."""
        missing = -(-num_positions // self.block_size) - len(request.block_ids)
        if missing <= 0:
            return True
        if missing > self.block_pool.num_available:
            return False
        request.block_ids.extend(self.block_pool.allocate(missing))
        return True

    # ---- a step ------------------------------------------------------------------------
    def after_forward(self, chunks: list[ScheduledChunk]) -> None:
        """Called by the runner once a step's forward is enqueued (nothing to do here)."""

    def commit_scheduled(self, request: Request, start: int, end: int) -> None:
        """Hash, as soon as a chunk of positions ``[start, end)`` is final in the schedule, the
        full blocks it completes whose tokens the host knows, so a request admitted after it
        (in this very step too: an RL group's copies of one prompt) hits them instead of
        computing the prompt again. Safe because the launched forward writes those blocks
        before anything reads them: within a step every attention layer writes the whole
        step's K/V before it attends, and later steps run after it on the same stream. Stops
        at a block whose parent is not hashed yet (its last token was still on the device
        when its chunk was scheduled; ``commit_full_blocks`` hashes it when that lands)."""
        self._hash_blocks(request, start, min(end, request.num_tokens), stop_at_unhashed_parent=True)

    def commit_full_blocks(self, request: Request, old_computed: int, new_computed: int) -> None:
        """Hash the blocks a landed chunk filled, so later requests can hit them."""
        self._hash_blocks(request, old_computed, new_computed, stop_at_unhashed_parent=False)

    def _hash_blocks(self, request: Request, start: int, end: int, stop_at_unhashed_parent: bool) -> None:
        """Hash the full blocks that positions ``[start, end)`` complete, in position order
        (the pool refuses a block whose parent has no hash, unless this stops there first)."""
        bs, pool = self.block_size, self.block_pool
        for index in range(start // bs, end // bs):
            parent = request.block_ids[index - 1] if index > 0 else None
            if stop_at_unhashed_parent and parent is not None and pool.block_hash(parent) is None:
                return
            pool.commit_full_block(request.block_ids[index], parent, request.token_slice(index * bs, (index + 1) * bs))

    def chunk_applied(self, chunk: ScheduledChunk, kept: bool) -> None:
        """A launched chunk's results were applied (``kept``) or discarded."""

    # ---- release -----------------------------------------------------------------------
    def detach(self, request: Request) -> Held:
        held = Held(blocks=request.block_ids)
        request.block_ids = []
        return held

    def free(self, held: Held) -> None:
        if held.blocks:
            self.block_pool.free(held.blocks)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; False (nothing changed) while blocks are in use."""
        return self.block_pool.reset_prefix_cache()

    def check_invariants(self) -> None:
        self.block_pool.check_invariants()
