"""Per-step state handed to the model explicitly (no globals): attention metadata, the KV
cache tensors, the attention implementation, the routing capture buffer and, for hybrid
models, the recurrent layers' metadata and state slots."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:   # the recurrent package imports kernels; the context stays a leaf module
    from inference.model.recurrent.metadata import RecurrentMetadata


@dataclass
class AttentionMetadata:
    """Layout of one step's tokens. Request r owns query rows
    ``query_start_loc[r]:query_start_loc[r+1]``: the last ``q_len`` tokens of its
    ``seq_lens[r]``-token context. Rows past ``query_start_loc[-1]`` are padding whose
    ``slot_mapping`` points into the dummy block."""

    slot_mapping: torch.Tensor            # [T_pad] int64: block * block_size + offset
    block_tables: torch.Tensor            # [R, max_blocks] int32
    query_start_loc: torch.Tensor         # [R + 1] int32
    seq_lens: torch.Tensor                # [R] int32
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
    max_query_len: int
    max_seq_len: int
    decode_only: bool


class AttentionBackend(ABC):
    """One attention implementation per kind of attention layer, over the paged KV cache,
    chosen per device (``inference.attention_backends``). Every method reads this step's
    K/V from the cache (the layer wrote it before calling) and returns one output row per
    query row of ``q``; padding rows (past ``query_start_loc[-1]``, or ``seq_lens`` 0) are
    zeros. A backend holds no per-step state, so one instance serves every step."""

    @abstractmethod
    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, window: int = 0, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Grouped-query attention. q: [T, heads, d]; caches [num_blocks + 1, block_size,
        kv_heads, d]; ``window`` > 0: the last ``window`` positions only; ``sinks`` [heads]
        fp32: one extra logit per head in each softmax denominator."""

    @abstractmethod
    def attend_latent(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float, latent_dim: int) -> torch.Tensor:
        """Multi-head latent attention with absorbed weights: q [T, heads, L + R] against
        the cached rows [num_blocks + 1, block_size, 1, L + R]; values are the first
        ``latent_dim`` (L) elements of each row. Returns [T, heads, L]."""


# Older name of the backend type (a function, before attention kinds multiplied).
AttentionFn = AttentionBackend


@dataclass
class ForwardContext:
    """Everything a paged forward needs besides token ids and positions. ``kv_caches[i]``
    is layer i's (k, v) pair [num_blocks + 1, block_size, kv_heads, head_dim]; for an MLA
    layer it is (rows [.., 1, L + R], their latent view [.., 1, L]). Only attention layers
    index it, by global layer index (a list over every layer or a mapping of the attention
    layers both work).

    Hybrid models only (None otherwise, and then never read): ``recurrent`` lays out this
    step's sequences for the recurrent layers (the same sequences, in the same order, as
    ``attn``) and names each one's state slot; ``recurrent_states[i]`` is recurrent layer
    i's slot tensors (conv state, recurrent / SSM state), each ``[num_slots + 1, ...]``
    (``StatePool.layer_states(i)``), advanced in place by exactly this step's tokens;
    ``recurrent_mode`` picks the recurrences' implementation
    (``inference.model.recurrent.MODES``)."""

    attn: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | Mapping[int, tuple[torch.Tensor, torch.Tensor]]
    attention: AttentionBackend
    routing_staging: torch.Tensor | None = None          # [T_pad, num_moe_layers, topk]
    recurrent: RecurrentMetadata | None = None
    recurrent_states: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    recurrent_mode: str = "auto"
