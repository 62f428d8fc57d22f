"""Drives ``MoEGPT.forward`` step by step the way an engine would, without the engine: paged
KV blocks for the attention layers, a ``StatePool`` slot per sequence for the recurrent
layers, per-step ``AttentionMetadata`` + ``RecurrentMetadata``, padding rows, routing
staging. Tests compare what each step returns with ``forward_reference`` / transformers.

Imported as ``tests.inference.model.paged_steps`` (the repo root is on sys.path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference.attention_backends import select_attention
from inference.model import AttentionMetadata, ForwardContext, MoEGPT
from inference.model.context import AttentionBackend
from inference.model.recurrent import RecurrentMetadata
from inference.cache.state_pool import StatePool


@dataclass
class Chunk:
    """``n`` tokens of sequence ``seq`` starting at position ``start``."""

    seq: int
    start: int
    n: int


class PagedSteps:
    """Sequences of known tokens fed through the paged forward in caller-chosen chunks
    (teacher forcing). Invariant: sequence s owns blocks ``s * max_blocks ...`` and, from
    its first chunk on, one state-pool slot; ``computed[s]`` tokens have been fed."""

    def __init__(self, model: MoEGPT, sequences: list[list[int]], block_size: int = 4,
                 mode: str = "auto", num_slots: int | None = None,
                 attention: AttentionBackend | None = None) -> None:
        c = model.config
        self.model, self.sequences, self.block_size, self.mode = model, sequences, block_size, mode
        self.max_blocks = -(-max(len(s) for s in sequences) // block_size)
        self.num_blocks = self.max_blocks * len(sequences)
        param = next(model.parameters())
        self.device = param.device
        self.attention = attention if attention is not None else select_attention(self.device)
        shape = (self.num_blocks + 1, block_size, c.num_kv_heads, c.head_dim)
        # Only attention layers get KV (a mapping, as a hybrid-aware cache would hand over).
        self.kv = {i: (param.new_zeros(shape), param.new_zeros(shape)) for i in c.attention_layer_indices}
        self.pool = StatePool.for_model(c, num_slots or len(sequences) + 1, param.dtype, self.device)
        self.states = {i: self.pool.layer_states(i) for i in c.recurrent_layer_indices}
        self.computed = [0] * len(sequences)

    def _slot(self, seq: int) -> int:
        slot = self.pool.slot_of(seq)
        return self.pool.allocate(seq) if slot is None else slot

    def _attention(self, chunks: list[Chunk], padded: int) -> AttentionMetadata:
        bs, i32 = self.block_size, dict(dtype=torch.int32, device=self.device)
        slots, starts = [], [0]
        for ch in chunks:
            pos = torch.arange(ch.start, ch.start + ch.n)
            slots.append((ch.seq * self.max_blocks + pos // bs) * bs + pos % bs)
            starts.append(starts[-1] + ch.n)
        dummy = torch.full((padded - starts[-1],), self.num_blocks * bs)
        slot_mapping = torch.cat(slots + [dummy]).to(self.device)
        tables = [torch.arange(self.max_blocks) + ch.seq * self.max_blocks for ch in chunks]
        lens = [ch.start + ch.n for ch in chunks]
        decode_only = all(ch.n == 1 for ch in chunks)
        if decode_only:  # as StepBatch pads: one request row per token row, length 0, the dummy block
            pad = padded - len(chunks)
            tables += [torch.full((self.max_blocks,), self.num_blocks)] * pad
            lens, starts = lens + [0] * pad, starts + [starts[-1]] * pad
        return AttentionMetadata(
            slot_mapping=slot_mapping, block_tables=torch.stack(tables).to(**i32),
            query_start_loc=torch.tensor(starts, **i32), seq_lens=torch.tensor(lens, **i32),
            query_start_loc_host=starts, seq_lens_host=lens,
            max_query_len=max(ch.n for ch in chunks), max_seq_len=max(lens), decode_only=decode_only)

    @torch.no_grad()
    def step(self, chunks: list[Chunk], pad: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One step of ``chunks`` plus ``pad`` padding rows: per chunk, its logits [n, V]
        and its staged routing [n, num_moe_layers, topk]."""
        c = self.model.config
        for ch in chunks:
            assert ch.start == self.computed[ch.seq], "chunks must continue where their sequence stopped"
        ids = [torch.tensor(self.sequences[ch.seq][ch.start:ch.start + ch.n]) for ch in chunks]
        pos = [torch.arange(ch.start, ch.start + ch.n) for ch in chunks]
        tokens = sum(ch.n for ch in chunks)
        recurrent = RecurrentMetadata.build([ch.n for ch in chunks], [self._slot(ch.seq) for ch in chunks],
                                            [ch.start > 0 for ch in chunks], self.device) if self.states else None
        staging = torch.full((tokens + pad, c.num_moe_layers, c.topk), -1, dtype=torch.int64, device=self.device)
        ctx = ForwardContext(self._attention(chunks, tokens + pad), self.kv, self.attention, staging,
                             recurrent=recurrent, recurrent_states=self.states or None, recurrent_mode=self.mode)
        hidden = self.model(torch.cat(ids + [torch.zeros(pad, dtype=torch.int64)]).to(self.device),
                            torch.cat(pos + [torch.zeros(pad, dtype=torch.int64)]).to(self.device), ctx)
        assert hidden.shape[0] == tokens + pad
        for ch in chunks:
            self.computed[ch.seq] += ch.n
        self.pool.check_invariants()
        logits = self.model.compute_logits(hidden[:tokens])
        return list(logits.split([ch.n for ch in chunks])), list(staging[:tokens].split([ch.n for ch in chunks]))
