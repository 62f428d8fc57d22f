"""HybridSequenceCache on its own: where a prompt's checkpoint boundaries fall (and how they
cut chunks), and the automatic checkpoint spacing for the real hybrid presets."""

from __future__ import annotations

import pytest
import torch

from inference.cache.block_pool import BlockPool
from inference.cache.hybrid_cache import HybridSequenceCache, auto_checkpoint_interval
from inference.cache.kv_cache import KVCache
from inference.presets import get_preset
from inference.request import Request, SamplingParams
from inference.cache.state_checkpoints import CheckpointStore
from inference.cache.state_pool import StatePool, state_bytes_per_sequence


def _cache(interval: int, caching: bool = True, capacity: int = 4) -> HybridSequenceCache:
    cache = HybridSequenceCache(BlockPool(32, 4, enable_prefix_caching=caching), interval)
    pool = StatePool.for_model(get_preset("tiny-hybrid-gdn"), 2, torch.float32)
    cache.attach(pool, CheckpointStore.for_pool(pool, capacity))
    return cache


def _request(prompt_len: int) -> Request:
    return Request("r", list(range(3, 3 + prompt_len)), SamplingParams(), arrival_index=0)


@pytest.mark.parametrize("prompt_len, interval, boundaries", [
    (19, 2, [8, 16]),          # every 2 blocks, the last full block (16) hittable by an identical prompt
    (17, 2, [8, 16]),          # (17 - 1) // 4 * 4 = 16
    (16, 2, [8, 12]),          # the whole prompt is 4 blocks, but a hit keeps its last token: 12
    (13, 8, [12]),             # a short prompt: only its last full block
    (3, 2, []),                # no full block before the last token
])
def test_boundaries_and_chunk_cuts(prompt_len, interval, boundaries):
    cache, request = _cache(interval), _request(prompt_len)
    found, position = [], 0
    while (b := cache.next_boundary(request, position)) is not None:
        found.append(b)
        position = b
    assert found == boundaries
    cuts, start = [], 0
    while start < prompt_len:        # chunks of at most 6 tokens, cut at boundaries
        n = cache.chunk_tokens(request, start, min(6, prompt_len - start))
        cuts.append(start + n)
        start += n
    assert set(boundaries) <= set(cuts) and all(0 < c <= prompt_len for c in cuts)


def test_no_boundaries_without_prefix_caching_or_checkpoints():
    for cache in (_cache(2, caching=False), _cache(2, capacity=0)):
        assert cache.next_boundary(_request(30), 0) is None
        assert cache.chunk_tokens(_request(30), 0, 30) == 30


@pytest.mark.parametrize("preset, expected", [("qwen3.5-35b-a3b-shape", 256), ("qwen3-next-80b-a3b-shape", 256),
                                              ("nemotron-3-nano-30b-a3b-shape", 512)])
def test_auto_interval_of_the_real_presets(preset, expected):
    """bf16 KV, fp32 states, block 16: a checkpoint is the KV of 196 (Qwen) / 499 (Nemotron)
    blocks, so the next power of two."""
    config = get_preset(preset)
    state = state_bytes_per_sequence(config, torch.bfloat16)
    block = KVCache.bytes_per_block(config, 16, torch.bfloat16)
    interval = auto_checkpoint_interval(state, block)
    assert interval == expected
    assert interval * block >= state > interval // 2 * block


def test_bad_interval_is_refused():
    with pytest.raises(ValueError, match="checkpoint interval must be an int >= 1"):
        HybridSequenceCache(BlockPool(4, 4), 0)
