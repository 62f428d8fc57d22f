"""What the engine keeps per token and per request across steps: the paged KV cache and its
block pool (hashes, prefix reuse, LRU), the recurrent-state pool and its prefix-cache
checkpoints, and the sequence caches that give the scheduler one lifecycle over both
(``SequenceCache`` for attention-only models, ``HybridSequenceCache`` for hybrids)."""
