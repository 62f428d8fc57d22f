"""The baseline we measure against: Megatron-core 0.19's approach to routing recording,
reimplemented against the same recorder protocol so it plugs into the same engine.

Every step it copies the step's routing and token->block/offset tensors to the host with
``.cpu().numpy()`` (each a device synchronisation), groups tokens by block with numpy and
stores them in a Python dict of per-block arrays; at finish it concatenates the request's
blocks. Like the original it keeps nothing across preemption: a preempted request's rows
are simply recomputed and stored again after it resumes.

It exists for ``tools/bench_routing.py``'s ``host-sync`` mode; use ``RoutingRecorder``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from routing_replay.phase_timer import PhaseTimer


class HostSyncRecorder:
    """Per-step host copies into ``{block_id: ndarray[block_size, layers, topk]}``.
    Invariant: a stored block holds the rows last written for its tokens; the dummy block
    is never stored. Not graph-safe: ``gather`` must run outside CUDA graphs."""

    graph_safe = False

    def __init__(self, *, num_kv_blocks: int, block_size: int, num_moe_layers: int, topk: int,
                 num_experts: int, max_step_tokens: int, device: torch.device | str) -> None:
        self.num_kv_blocks, self.block_size = num_kv_blocks, block_size
        self.num_moe_layers, self.topk = num_moe_layers, topk
        self.device = torch.device(device)
        # Megatron records int32 routing indices into a static [max_tokens, layers, topk] buffer.
        self.dtype = torch.int32
        self.staging = torch.zeros((max_step_tokens, num_moe_layers, topk), dtype=torch.int32, device=self.device)
        self.block_routing: dict[int, np.ndarray] = {}
        self._ready: dict[str, np.ndarray] = {}

    @property
    def num_pending(self) -> int:
        return len(self._ready)

    def gather(self, token_to_block: torch.Tensor, token_to_offset: torch.Tensor,
               timer: PhaseTimer | None = None) -> None:
        t = timer.now() if timer is not None else 0.0
        self._store_step(token_to_block, token_to_offset)
        if timer is not None:  # the whole host copy + dict update is Megatron's "scatter"
            timer.lap("routing_gather", "scatter", t)

    def _store_step(self, token_to_block: torch.Tensor, token_to_offset: torch.Tensor) -> None:
        n = token_to_block.shape[0]
        flat = self.staging[:n].cpu().numpy()
        blocks = token_to_block.cpu().numpy()
        offsets = token_to_offset.cpu().numpy()
        unique_blocks, inverse, counts = np.unique(blocks, return_inverse=True, return_counts=True)
        order = np.argsort(inverse, kind="stable")
        sorted_offsets, sorted_rows = offsets[order], flat[order]
        start = 0
        for block, count in zip(unique_blocks.tolist(), counts.tolist()):
            if block != self.num_kv_blocks:  # the dummy block holds padding only
                stored = self.block_routing.get(block)
                if stored is None:
                    stored = np.zeros((self.block_size, self.num_moe_layers, self.topk), dtype=np.int32)
                    self.block_routing[block] = stored
                stored[sorted_offsets[start:start + count]] = sorted_rows[start:start + count]
            start += count

    def snapshot_preempted(self, key: str, block_ids: Sequence[int], num_rows: int,
                           timer: PhaseTimer | None = None) -> None:
        """Megatron keeps nothing here; the resumed request re-records its rows."""

    def reconstruct(self, key: str, block_ids: Sequence[int], num_rows: int, start: int = 0,
                    timer: PhaseTimer | None = None) -> None:
        t = timer.now() if timer is not None else 0.0
        self._concat(key, block_ids, num_rows, start)
        if timer is not None:
            timer.lap("routing_reconstruct", "copy", t)

    def _concat(self, key: str, block_ids: Sequence[int], num_rows: int, start: int) -> None:
        parts, collected = [], 0
        for block in block_ids:
            if collected >= num_rows:
                break
            take = min(self.block_size, num_rows - collected)
            parts.append(self.block_routing[int(block)][:take])
            collected += take
        routing = np.concatenate(parts, axis=0) if parts else np.zeros((0, self.num_moe_layers, self.topk), np.int32)
        self._ready[key] = routing[start:]

    def reconstruct_many(self, requests: Sequence[tuple[str, Sequence[int], int, int]],
                         timer: PhaseTimer | None = None) -> None:
        for key, block_ids, num_rows, start in requests:
            self.reconstruct(key, block_ids, num_rows, start, timer)

    def poll(self, timer: PhaseTimer | None = None) -> dict[str, np.ndarray]:
        ready, self._ready = self._ready, {}
        return ready

    def wait_all(self, timer: PhaseTimer | None = None) -> dict[str, np.ndarray]:
        return self.poll(timer)

    def discard(self, key: str) -> None:
        self._ready.pop(key, None)
