"""Attention backends (``inference.model.context.AttentionBackend``), chosen per device.

- ``EagerBackend`` (CPU): the plain-torch loop over requests, the simplest correct path.
- ``DecodeBackend``: decode-only steps (one query row per request; what decode graphs and
  the padded decode path run): Triton decode kernels on CUDA, their vectorized torch
  references elsewhere. No host sync, graph-capturable.
- ``TritonBackend`` (CUDA): ``DecodeBackend`` for decode-only steps; otherwise Triton paged
  prefill, and for latent attention the eager loop (prefill of MLA models is compute-bound
  and runs SDPA per request).
"""

from __future__ import annotations

import torch

from inference.kernels import mla_decode_attention, paged_decode_attention, prefill_attention
from inference.model.context import AttentionBackend, AttentionMetadata
from inference.paged_attention import paged_attention_eager


class EagerBackend(AttentionBackend):
    """Per-request torch attention using host-side lengths (reads only each window)."""

    def attend(self, q, k_cache, v_cache, meta, scale, window=0, sinks=None):
        return paged_attention_eager(q, k_cache, v_cache, meta, scale, window, sinks)

    def attend_latent(self, q, cache, meta, scale, latent_dim):
        return paged_attention_eager(q, cache, cache[..., :latent_dim], meta, scale)


class DecodeBackend(AttentionBackend):
    """Row r of ``q`` is request r's single new token (padding rows have seq_len 0).
    ``mha_dot``: whether MHA decode takes the kernel's ``tl.dot`` path (None: the kernel's
    default; ``EngineConfig.decode_attention_mha_dot``)."""

    def __init__(self, mha_dot: bool | None = None) -> None:
        self.mha_dot = mha_dot

    def attend(self, q, k_cache, v_cache, meta, scale, window=0, sinks=None):
        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                      window=window, sinks=sinks, mha_dot=self.mha_dot)

    def attend_latent(self, q, cache, meta, scale, latent_dim):
        return mla_decode_attention(q[..., :latent_dim], q[..., latent_dim:], cache, meta.block_tables,
                                    meta.seq_lens, scale)


class TritonBackend(AttentionBackend):
    """Any mix of prefill chunks and decodes on CUDA, dispatching decode-only steps to the
    decode kernels."""

    def __init__(self, mha_dot: bool | None = None) -> None:
        self._decode, self._eager = DecodeBackend(mha_dot), EagerBackend()

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale, window=0, sinks=None):
        if meta.decode_only:
            return self._decode.attend(q, k_cache, v_cache, meta, scale, window, sinks)
        return prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                                 scale, meta.max_query_len, meta.max_seq_len, window, sinks)

    def attend_latent(self, q, cache, meta: AttentionMetadata, scale, latent_dim):
        backend = self._decode if meta.decode_only else self._eager
        return backend.attend_latent(q, cache, meta, scale, latent_dim)


def select_attention(device: torch.device, mha_dot: bool | None = None) -> AttentionBackend:
    """The backend for eager (non-graph) steps on ``device``."""
    return TritonBackend(mha_dot) if device.type == "cuda" else EagerBackend()
