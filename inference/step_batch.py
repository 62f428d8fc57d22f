"""Preallocated per-step tensors: the batch layout the model and the routing recorder read.

Every tensor is allocated once, at its maximum size, and updated in place each step, so
CUDA graphs can capture reads of it and the recorder can rely on stable storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from inference.model.context import AttentionMetadata
from inference.scheduler import ScheduledChunk


@dataclass
class PreparedStep:
    """One step's view of the static tensors (first ``num_padded_tokens`` rows)."""

    num_tokens: int
    num_padded_tokens: int
    input_ids: torch.Tensor
    positions: torch.Tensor
    token_to_block: torch.Tensor
    token_to_offset: torch.Tensor
    attn: AttentionMetadata
    logits_indices: torch.Tensor        # [S] rows whose logits are sampled, in ``sampling_chunks`` order
    sampling_chunks: list[ScheduledChunk]


class StepBatch:
    """Static tensors of ``max_step_tokens`` token rows and ``max_requests`` request rows.
    Invariant: token rows past ``num_tokens`` point at the dummy block with offset 0;
    block-table row r starts with the block ids of the step's r-th request."""

    _TOKEN_FIELDS = ("input_ids", "positions", "token_to_block", "token_to_offset", "slot_mapping")

    def __init__(self, *, max_step_tokens: int, max_requests: int, max_blocks_per_request: int,
                 block_size: int, dummy_block_id: int, device: torch.device) -> None:
        self.block_size = block_size
        self.dummy_block_id = dummy_block_id
        self.max_blocks_per_request = max_blocks_per_request
        self.device = device
        pin = device.type == "cuda"
        t, r = max_step_tokens, max_requests

        def pair(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return host, (torch.zeros(shape, dtype=dtype, device=device) if pin else host)

        self._host: dict[str, torch.Tensor] = {}
        for name in self._TOKEN_FIELDS:
            self._host[name], dev = pair((t,), torch.int64)
            setattr(self, name, dev)
        self._host["block_tables"], self.block_tables = pair((r, max_blocks_per_request), torch.int32)
        self._host["query_start_loc"], self.query_start_loc = pair((r + 1,), torch.int32)
        self._host["seq_lens"], self.seq_lens = pair((r,), torch.int32)
        self._host["logits_indices"], self.logits_indices = pair((r,), torch.int64)
        self._host_np = {k: v.numpy() for k, v in self._host.items()}
        # Per block-table row: (block_ids list, blocks written) of its last writer.
        self._row_owners: list[tuple | None] = [None] * r

    def prepare(self, chunks: list[ScheduledChunk], num_padded_tokens: int | None = None) -> PreparedStep:
        """Fill the static tensors for ``chunks`` (host work, then one non-blocking copy per
        tensor on CUDA: the host buffers are pinned and the previous step's sampled-token
        readback guarantees their earlier copies have completed).

        With ``num_padded_tokens`` (decode graphs: one token per request) the request rows
        are padded to the same count: padding rows have seq_len 0 and are never read."""
        host = self._host_np
        bs = self.block_size
        num_reqs = len(chunks)
        padded_reqs = num_reqs if num_padded_tokens is None else num_padded_tokens
        if all(c.num_tokens == 1 for c in chunks):
            n, starts, seq_lens = self._fill_single_tokens(chunks)
        else:
            n, starts, seq_lens = self._fill_chunks(chunks)
        self._fill_block_tables(chunks)
        sampling = [c for c in chunks if c.samples]
        logits_rows = [starts[r + 1] - 1 for r, c in enumerate(chunks) if c.samples]
        padded = n if num_padded_tokens is None else num_padded_tokens
        if padded < n:
            raise ValueError(f"num_padded_tokens={padded} is less than the step's {n} tokens")
        for name, fill in (("input_ids", 0), ("positions", 0), ("token_to_block", self.dummy_block_id),
                           ("token_to_offset", 0)):
            host[name][n:padded] = fill
        host["slot_mapping"][:padded] = host["token_to_block"][:padded] * bs + host["token_to_offset"][:padded]
        host["query_start_loc"][: num_reqs + 1] = starts
        host["query_start_loc"][num_reqs + 1: padded_reqs + 1] = n
        host["seq_lens"][:num_reqs] = seq_lens
        host["seq_lens"][num_reqs:padded_reqs] = 0
        host["logits_indices"][: len(logits_rows)] = logits_rows
        self._upload(padded, padded_reqs, len(logits_rows))
        attn = AttentionMetadata(
            slot_mapping=self.slot_mapping[:padded], block_tables=self.block_tables[:padded_reqs],
            query_start_loc=self.query_start_loc[: padded_reqs + 1], seq_lens=self.seq_lens[:padded_reqs],
            query_start_loc_host=starts, seq_lens_host=seq_lens,
            max_query_len=max((c.num_tokens for c in chunks), default=0), max_seq_len=max(seq_lens, default=0),
            decode_only=all(c.num_tokens == 1 for c in chunks))
        return PreparedStep(
            num_tokens=n, num_padded_tokens=padded, input_ids=self.input_ids[:padded],
            positions=self.positions[:padded], token_to_block=self.token_to_block[:padded],
            token_to_offset=self.token_to_offset[:padded], attn=attn,
            logits_indices=self.logits_indices[: len(logits_rows)], sampling_chunks=sampling)

    def _fill_single_tokens(self, chunks: list[ScheduledChunk]) -> tuple[int, list[int], list[int]]:
        """Decode steps: one token per request, filled with list comprehensions (the
        per-request host cost is what limits large decode batches)."""
        host, bs, n = self._host_np, self.block_size, len(chunks)
        positions = [c.start for c in chunks]
        host["input_ids"][:n] = [c.request.token_slice(c.start, c.start + 1)[0] for c in chunks]
        host["positions"][:n] = positions
        host["token_to_block"][:n] = [c.request.block_ids[c.start // bs] for c in chunks]
        host["token_to_offset"][:n] = [p % bs for p in positions]
        return n, list(range(n + 1)), [p + 1 for p in positions]

    def _fill_chunks(self, chunks: list[ScheduledChunk]) -> tuple[int, list[int], list[int]]:
        host, bs = self._host_np, self.block_size
        n, starts, seq_lens = 0, [0], []
        for chunk in chunks:
            req, k = chunk.request, chunk.num_tokens
            pos = np.arange(chunk.start, chunk.start + k)
            blocks = np.asarray(req.block_ids, dtype=np.int64)
            host["input_ids"][n:n + k] = req.token_slice(chunk.start, chunk.start + k)
            host["positions"][n:n + k] = pos
            host["token_to_block"][n:n + k] = blocks[pos // bs]
            host["token_to_offset"][n:n + k] = pos % bs
            n += k
            starts.append(n)
            seq_lens.append(chunk.start + k)
        return n, starts, seq_lens

    def _fill_block_tables(self, chunks: list[ScheduledChunk]) -> None:
        """Row r gets request r's block ids. A row whose last writer was the very same
        ``block_ids`` list only receives the blocks appended since: the scheduler only ever
        appends to a request's list and replaces the list object when it re-admits, preempts
        or finishes the request (and ``_row_owners`` keeps the old list alive, so identity is
        never reused). Columns past a row's blocks are never read (kernels stop at seq_len),
        so they are not cleared."""
        table = self._host_np["block_tables"]
        owners = self._row_owners
        for r, chunk in enumerate(chunks):
            blocks = chunk.request.block_ids
            owner = owners[r]
            written = owner[1] if owner is not None and owner[0] is blocks and owner[1] <= len(blocks) else 0
            if written < len(blocks):
                table[r, written:len(blocks)] = blocks[written:]
            owners[r] = (blocks, len(blocks))

    def _upload(self, num_tokens: int, num_reqs: int, num_samples: int) -> None:
        if self.device.type != "cuda":
            return
        rows = {"block_tables": num_reqs, "query_start_loc": num_reqs + 1, "seq_lens": num_reqs,
                "logits_indices": num_samples}
        for name, host in self._host.items():
            count = rows.get(name, num_tokens)
            if count:
                getattr(self, name)[:count].copy_(host[:count], non_blocking=True)
