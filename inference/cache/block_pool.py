"""KV block pool: reference counts, chained prefix hashes, prefix match and LRU eviction.

Every block is in exactly one of three states:

- free: reference count 0 and no hash (never used, or evicted); handed out first.
- cached-free: reference count 0 but hashed, so a later request with the same prefix can
  revive it; kept in least-recently-used order and evicted (hash dropped) only when no
  free block is left.
- in use: reference count > 0 (shared by every request whose prefix matched it).

Only full blocks are hashed, once the step computing them is launched or about to be (the
scheduler hashes a block as soon as its chunk is final, ``SequenceCache.commit_scheduled``).
A hashed block is written by that chunk only, never again, and every reader of it runs after
that write: in the same step, attention layers write all K/V before they attend; in later
steps, the stream orders them. So sharing it is safe. The hash of block i chains the hash of
block i-1, so equal hashes mean equal prefixes (a 128-bit digest makes an accidental
collision negligible, and a hit also compares the block's own token ids).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

from inference.errors import NoFreeBlocksError

__all__ = ["BlockPool", "NoFreeBlocksError"]


class BlockPool:
    """Reference-counted KV blocks with prefix caching.

    Invariant: num_free (never used or evicted: no hash) + num_cached_free (ref 0, hashed,
    evictable, LRU order) + num_in_use (ref > 0) == num_blocks. Block ids run
    `0 .. num_blocks - 1`; `dummy_block_id == num_blocks` is the KV cache's padding block and
    is never handed out. Every entry of the hash map points at a block carrying that hash.
    ``on_hash_dropped`` (optional) is called with each hash that stops being advertised
    (its block evicted or the cache reset), so state kept per cached prefix can follow.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dummy_block_id = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._hashes: list[int | None] = [None] * num_blocks
        # Kept per hashed block so a hit can be confirmed token by token.
        self._block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        # Insertion order is recency: first = least recently freed = next to evict.
        self._cached_free: OrderedDict[int, None] = OrderedDict()
        self._block_of_hash: dict[int, int] = {}
        self._num_in_use = 0
        self.on_hash_dropped: Callable[[int], None] | None = None

    # ----------------------------------------------------------------- counts

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached_free(self) -> int:
        return len(self._cached_free)

    @property
    def num_in_use(self) -> int:
        return self._num_in_use

    @property
    def num_available(self) -> int:
        """Blocks `allocate` can hand out: free ones plus evictable cached ones."""
        return len(self._free) + len(self._cached_free)

    def block_hash(self, block_id: int) -> int | None:
        self._check_id(block_id)
        return self._hashes[block_id]

    def is_advertised(self, block_hash: int) -> bool:
        """Whether ``match_prefix`` can find a block under ``block_hash``."""
        return block_hash in self._block_of_hash

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    # ----------------------------------------------------------------- hashing

    def compute_hash(self, parent_hash: int | None, token_ids: Sequence[int]) -> int:
        """Chained hash of one full block. Stable across processes; override to test collisions."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(b"root" if parent_hash is None else parent_hash.to_bytes(16, "little"))
        digest.update(array("q", token_ids).tobytes())
        return int.from_bytes(digest.digest(), "little")

    def match_prefix(self, token_ids: Sequence[int], max_blocks: int) -> list[int]:
        """Block ids of the longest cached chain of full blocks that starts `token_ids`.

        At most `max_blocks` blocks. Reference counts are not changed: `take` the result to
        keep the blocks. Empty when prefix caching is disabled.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        num_full = min(max_blocks, len(token_ids) // bs)
        hits: list[int] = []
        parent_hash: int | None = None
        for i in range(num_full):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            block_hash = self.compute_hash(parent_hash, tokens)
            block_id = self._block_of_hash.get(block_hash)
            if block_id is None or self._block_tokens[block_id] != tokens:
                break
            hits.append(block_id)
            parent_hash = block_hash
        return hits

    def commit_full_block(
        self, block_id: int, parent_block_id: int | None, token_ids: Sequence[int]
    ) -> None:
        """Register a full, computed block under its chained hash so later requests can hit it.

        `parent_block_id` is the block holding the previous `block_size` positions (None for
        the first block) and must be committed already. A no-op when prefix caching is off or
        the block already has a hash. When another block already holds this hash (two
        requests computed the same prefix at once) the existing mapping is kept; this block
        still carries the hash so its own children chain correctly.
        """
        if not self.enable_prefix_caching:
            return
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"block {block_id} is not in use; only held blocks can be committed")
        if self._hashes[block_id] is not None:
            return
        if len(token_ids) != self.block_size:
            raise ValueError(
                f"block {block_id}: a full block has {self.block_size} tokens, got {len(token_ids)}"
            )
        parent_hash = None
        if parent_block_id is not None:
            self._check_id(parent_block_id)
            parent_hash = self._hashes[parent_block_id]
            if parent_hash is None:
                raise ValueError(
                    f"block {block_id}: parent block {parent_block_id} is not committed; "
                    "commit blocks in position order"
                )
        tokens = tuple(token_ids)
        block_hash = self.compute_hash(parent_hash, tokens)
        self._hashes[block_id] = block_hash
        self._block_tokens[block_id] = tokens
        self._block_of_hash.setdefault(block_hash, block_id)

    # ----------------------------------------------------------------- ref counts

    def take(self, block_ids: list[int]) -> None:
        """Add one reference to each block (prefix hits), reviving cached-free ones in O(1)."""
        for block_id in block_ids:
            self._check_id(block_id)
            if self._ref_counts[block_id] == 0 and block_id not in self._cached_free:
                raise ValueError(f"block {block_id} is free and uncached; allocate it instead")
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._cached_free[block_id]
                self._num_in_use += 1
            self._ref_counts[block_id] += 1

    def allocate(self, n: int) -> list[int]:
        """`n` fresh blocks with reference count 1; all or nothing.

        Never-hashed free blocks go first; then the least recently used cached blocks are
        evicted (their hashes dropped), keeping useful prefixes as long as possible.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        if n > self.num_available:
            raise NoFreeBlocksError(
                f"asked for {n} KV blocks but only {self.num_available} of {self.num_blocks} "
                "are available"
            )
        blocks: list[int] = []
        for _ in range(n):
            if self._free:
                block_id = self._free.popleft()
            else:
                block_id, _ = self._cached_free.popitem(last=False)
                self._drop_hash(block_id)
            self._ref_counts[block_id] = 1
            blocks.append(block_id)
        self._num_in_use += n
        return blocks

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; all or nothing.

        Blocks reaching 0 are released in reverse order, so a request's tail blocks become
        the least recently used and are evicted before the shared prefix they extend.
        """
        released: dict[int, int] = {}
        for block_id in block_ids:
            self._check_id(block_id)
            released[block_id] = released.get(block_id, 0) + 1
            if released[block_id] > self._ref_counts[block_id]:
                raise ValueError(
                    f"block {block_id} freed more often than referenced "
                    f"(ref count {self._ref_counts[block_id]})"
                )
        for block_id in reversed(block_ids):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] > 0:
                continue
            self._num_in_use -= 1
            if self._hashes[block_id] is not None:
                self._cached_free[block_id] = None
            else:
                self._free.append(block_id)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix. Refused (returns False) while any block is in use,
        because running requests chain new hashes from the ones they hold."""
        if self._num_in_use:
            return False
        for block_id in self._cached_free:
            self._drop_hash(block_id)
            self._free.append(block_id)
        self._cached_free.clear()
        return True

    # ----------------------------------------------------------------- checks

    def check_invariants(self) -> None:
        """Raise AssertionError describing the first broken invariant."""

        def expect(condition: bool, message: str) -> None:
            if not condition:
                raise AssertionError(f"BlockPool invariant broken: {message}")

        n = self.num_blocks
        expect(
            len(self._ref_counts) == len(self._hashes) == len(self._block_tokens) == n,
            "per-block tables do not all have num_blocks entries",
        )
        expect(len(set(self._free)) == len(self._free), "a block is in the free list twice")
        in_use = 0
        for block_id in range(n):
            ref, block_hash = self._ref_counts[block_id], self._hashes[block_id]
            tokens = self._block_tokens[block_id]
            expect(ref >= 0, f"block {block_id} has negative ref count {ref}")
            expect(
                (block_hash is None) == (tokens is None),
                f"block {block_id}: hash and token ids must be set together",
            )
            expect(
                tokens is None or len(tokens) == self.block_size,
                f"block {block_id} is hashed with {0 if tokens is None else len(tokens)} tokens",
            )
            in_use += ref > 0
        for block_id in self._free:
            expect(0 <= block_id < n, f"free list holds out-of-range block {block_id}")
            expect(self._ref_counts[block_id] == 0, f"free block {block_id} has references")
            expect(self._hashes[block_id] is None, f"free block {block_id} is hashed")
        for block_id in self._cached_free:
            expect(0 <= block_id < n, f"LRU holds out-of-range block {block_id}")
            expect(self._ref_counts[block_id] == 0, f"cached-free block {block_id} has references")
            expect(self._hashes[block_id] is not None, f"cached-free block {block_id} has no hash")
        expect(in_use == self._num_in_use, f"{in_use} blocks in use, counter {self._num_in_use}")
        expect(
            len(self._free) + len(self._cached_free) + self._num_in_use == n,
            f"free {len(self._free)} + cached-free {len(self._cached_free)} + in use "
            f"{self._num_in_use} != {n} blocks (a block is lost or in two states)",
        )
        for block_hash, block_id in self._block_of_hash.items():
            expect(0 <= block_id < n, f"hash map points at out-of-range block {block_id}")
            expect(
                self._hashes[block_id] == block_hash,
                f"hash map entry for block {block_id} does not match the block's hash",
            )

    # ----------------------------------------------------------------- internals

    def _check_id(self, block_id: int) -> None:
        if isinstance(block_id, bool) or not isinstance(block_id, int):
            raise ValueError(f"block id must be an int, got {block_id!r}")
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(
                f"block id {block_id} is outside [0, {self.num_blocks}) "
                f"(the dummy block {self.dummy_block_id} is never handed out)"
            )

    def _drop_hash(self, block_id: int) -> None:
        block_hash = self._hashes[block_id]
        if block_hash is not None and self._block_of_hash.get(block_hash) == block_id:
            del self._block_of_hash[block_hash]
            if self.on_hash_dropped is not None:
                self.on_hash_dropped(block_hash)
        self._hashes[block_id] = None
        self._block_tokens[block_id] = None
