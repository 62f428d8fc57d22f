"""RoutingRecorder: per-KV-block routing buffers filled and read without host syncs.

Routing lives where the token's KV lives: `block_routing[block, offset]`. A step's routing
reaches it through one scatter driven by the same token->block/offset tensors as the KV
append, so a prefix-cache hit shares rows for free and a reallocated block is simply
overwritten. Rows leave the device only when a request finishes (or is preempted), through
an index_select on the compute stream and an asynchronous copy on a side stream.

Timing: each public call is exactly one step_details phase and, given a `PhaseTimer`,
times its own sub-phases (which add up to the phase): `gather` -> routing_gather_{check,
scatter}, `snapshot_preempted` -> routing_store_{plan,gather,copy}, `reconstruct` ->
routing_reconstruct_{plan,gather,copy}, `poll` / `wait_all` -> routing_finalize_{poll,
assemble}. None of the step-path calls synchronises, so these host times are what enqueueing
the work costs the engine's thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from routing_replay.dtypes import numpy_dtype, routing_dtype
from routing_replay.phase_timer import PhaseTimer


def expected_num_rows(prompt_len: int, generated_len: int) -> int:
    """Number of routing rows a finished request has: `prompt_len + generated_len - 1`.

    Row i is the routing of token i. Every prompt token and every generated token except
    the last went through the model; the last generated token was sampled but never fed
    back, so it has no routing.
    """
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
    if generated_len < 1:
        raise ValueError(f"generated_len must be >= 1, got {generated_len}")
    return prompt_len + generated_len - 1


@dataclass(eq=False)
class _RowCopy:
    """Rows [first_row, first_row + num_rows) of one request on their way to the host.

    Invariant: until `done` has completed, every tensor the enqueued gather and copy read or
    write is referenced here, so neither caching allocator can hand its memory to other
    work early. `done is None` means the copy is already complete (CPU, or no rows).
    """

    first_row: int
    num_rows: int
    host: torch.Tensor | None          # [..., layers, topk]; this copy's rows start at `offset`
    offset: int = 0
    keepalive: tuple[torch.Tensor, ...] = ()
    done: torch.cuda.Event | None = None
    array: np.ndarray | None = None

    def is_done(self) -> bool:
        return self.done is None or self.done.query()

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()

    def result(self) -> np.ndarray:
        """The rows as numpy; only call once `is_done()` holds."""
        if self.array is None:
            # Copy out of the (pinned) host tensor: pinned memory is scarce, so it goes back
            # to the caching host allocator instead of living as long as the result.
            # Slicing in numpy, not torch: far cheaper per request on the host.
            flat = self.host.numpy()
            flat = flat.reshape(-1, *flat.shape[-2:])
            self.array = flat[self.offset : self.offset + self.num_rows].copy()
            self.host, self.keepalive, self.done = None, (), None
        return self.array


@dataclass(eq=False)
class _RequestRouting:
    """The copies that make up one request's routing.

    Invariant: `snapshots` are ordered, disjoint and together cover rows [0, covered);
    once `final` is set it covers rows [max(start, covered), num_rows), so the copies
    together cover [start, num_rows).
    """

    snapshots: list[_RowCopy] = field(default_factory=list)
    covered: int = 0
    final: _RowCopy | None = None
    start: int = 0
    num_rows: int = 0

    def copies(self) -> list[_RowCopy]:
        return self.snapshots + ([self.final] if self.final is not None else [])

    def is_final(self) -> bool:
        return self.final is not None and all(c.is_done() for c in self.copies())

    def release_completed(self) -> None:
        for copy in self.snapshots:
            if copy.array is None and copy.is_done():
                copy.result()

    def assemble(self, shape_tail: tuple[int, int], dtype: np.dtype) -> np.ndarray:
        """Merge snapshots (authoritative: they produced the sampled tokens) with the
        final rows, then cut the suffix [start, num_rows)."""
        if not self.snapshots:
            return self.final.result()
        out = np.empty((self.num_rows - self.start, *shape_tail), dtype=dtype)
        for copy in self.copies():
            rows = copy.result()
            lo = max(copy.first_row, self.start)
            hi = min(copy.first_row + copy.num_rows, self.num_rows)
            if hi > lo:
                out[lo - self.start : hi - self.start] = rows[lo - copy.first_row : hi - copy.first_row]
        return out


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class RoutingRecorder:
    """Records the top-k expert ids of every MoE layer for every token into per-KV-block
    buffers.

    Invariant: block_routing[b, o] holds the routing of the token whose KV sits at block b
    offset o, for every block whose tokens have been computed; row num_kv_blocks is the
    dummy block that padding rows write to. `staging` and `block_routing` are allocated
    once and never reallocated (CUDA graphs capture their addresses).
    """

    def __init__(
        self,
        *,
        num_kv_blocks: int,
        block_size: int,
        num_moe_layers: int,
        topk: int,
        num_experts: int,
        max_step_tokens: int,
        device: torch.device | str,
    ) -> None:
        _check_positive(
            num_kv_blocks=num_kv_blocks,
            block_size=block_size,
            num_moe_layers=num_moe_layers,
            topk=topk,
            num_experts=num_experts,
            max_step_tokens=max_step_tokens,
        )
        if topk > num_experts:
            raise ValueError(f"topk={topk} exceeds num_experts={num_experts}")
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.num_moe_layers = num_moe_layers
        self.topk = topk
        self.num_experts = num_experts
        self.max_step_tokens = max_step_tokens
        self.dtype: torch.dtype = routing_dtype(num_experts)
        self._numpy_dtype = numpy_dtype(self.dtype)
        self.staging = torch.zeros(
            (max_step_tokens, num_moe_layers, topk), dtype=self.dtype, device=device
        )
        self.block_routing = torch.zeros(
            (num_kv_blocks + 1, block_size, num_moe_layers, topk), dtype=self.dtype, device=device
        )
        self.device: torch.device = self.block_routing.device
        self._copy_stream = (
            torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        )
        self._device_index = self.device.index  # a tensor's CUDA device always has an index
        self._requests: dict[str, _RequestRouting] = {}
        # Copies of discarded requests still in flight: kept until done (see _RowCopy).
        self._retired: list[_RowCopy] = []

    @property
    def dummy_block(self) -> int:
        """Block id that padding rows point at; never part of a request."""
        return self.num_kv_blocks

    @property
    def num_pending(self) -> int:
        """Requests passed to `reconstruct` whose routing has not been returned yet."""
        return sum(1 for state in self._requests.values() if state.final is not None)

    def gather(self, token_to_block: torch.Tensor, token_to_offset: torch.Tensor,
               timer: PhaseTimer | None = None) -> None:
        """Scatter `staging[:n]` into `block_routing` at (token_to_block, token_to_offset).

        n = len(token_to_block). Both are int64 tensors on the recorder's device. Checks
        read only tensor metadata, so this never syncs and can be captured in a CUDA graph.
        """
        t = timer.now() if timer is not None else 0.0
        n = token_to_block.shape[0]
        for name, index in (("token_to_block", token_to_block), ("token_to_offset", token_to_offset)):
            if index.dtype != torch.int64 or index.dim() != 1:
                raise ValueError(f"{name} must be a 1-D int64 tensor, got {index.dtype} {tuple(index.shape)}")
            if index.device != self.device:
                raise ValueError(f"{name} is on {index.device}, recorder is on {self.device}")
        if token_to_offset.shape[0] != n:
            raise ValueError(f"token_to_offset has {token_to_offset.shape[0]} rows, token_to_block {n}")
        if n > self.max_step_tokens:
            raise ValueError(f"{n} tokens exceed max_step_tokens={self.max_step_tokens}")
        if timer is not None:
            t = timer.lap("routing_gather", "check", t)
        self.block_routing.index_put_((token_to_block, token_to_offset), self.staging[:n])
        if timer is not None:
            timer.lap("routing_gather", "scatter", t)

    def snapshot_preempted(self, key: str, block_ids: Sequence[int], num_rows: int,
                           timer: PhaseTimer | None = None) -> None:
        """Save rows [0, num_rows) of `key` before its blocks are freed for preemption.

        Row i sits at block_ids[i // block_size], offset i % block_size. Snapshot rows are
        authoritative (they produced the sampled tokens): at reconstruct time they win over
        recomputed rows. Rows an earlier snapshot already holds are not copied again.
        """
        state = self._requests.setdefault(key, _RequestRouting())
        if state.final is not None:
            raise ValueError(f"request {key!r} was already reconstructed")
        if num_rows <= state.covered:
            return
        state.snapshots.append(self._enqueue_copies([(block_ids, state.covered, num_rows)],
                                                    timer, "routing_store")[0])
        state.covered = num_rows

    def reconstruct(
        self, key: str, block_ids: Sequence[int], num_rows: int, start: int = 0,
        timer: PhaseTimer | None = None,
    ) -> None:
        """Enqueue the final read of `key`'s routing rows; call before freeing its blocks.

        The result, returned later by `poll` / `wait_all`, is rows [start, num_rows) after
        merging preemption snapshots. Rows after the snapshots are gathered on the compute
        stream now, so later writes into these blocks cannot affect them.
        """
        self.reconstruct_many([(key, block_ids, num_rows, start)], timer)

    def reconstruct_many(self, requests: Sequence[tuple[str, Sequence[int], int, int]],
                         timer: PhaseTimer | None = None) -> None:
        """`reconstruct` for several finished requests ``(key, block_ids, num_rows, start)``
        at once: one block gather, one device->host copy and one event for all of them, so
        the per-request host cost stays small when many requests finish in one step.
        Call it before any later forward can write into the requests' blocks."""
        spans, states = [], []
        for key, block_ids, num_rows, start in requests:
            if not 0 <= start <= num_rows:
                raise ValueError(f"need 0 <= start <= num_rows, got start={start} num_rows={num_rows}")
            state = self._requests.get(key)
            if state is not None and state.final is not None:
                raise ValueError(f"request {key!r} was already reconstructed")
            first = max(start, state.covered if state is not None else 0)
            spans.append((block_ids, first, max(first, num_rows)))
            states.append((key, start, num_rows))
        for (key, start, num_rows), copy in zip(states, self._enqueue_copies(spans, timer, "routing_reconstruct")):
            state = self._requests.setdefault(key, _RequestRouting())
            state.final = copy
            state.start, state.num_rows = start, num_rows

    def poll(self, timer: PhaseTimer | None = None) -> dict[str, np.ndarray]:
        """Routing of the requests whose copies have completed; never blocks.

        Each array is [num_rows - start, num_moe_layers, topk] of the compact dtype and
        owns its memory.
        """
        t = timer.now() if timer is not None else 0.0
        self._retired = [copy for copy in self._retired if not copy.is_done()]
        final: list[str] = []
        for key, state in self._requests.items():
            if state.is_final():
                final.append(key)
            else:
                state.release_completed()
        if timer is not None:
            t = timer.lap("routing_finalize", "poll", t)
        ready: dict[str, np.ndarray] = {}
        for key in final:
            ready[key] = self._requests.pop(key).assemble((self.num_moe_layers, self.topk), self._numpy_dtype)
        if timer is not None:
            timer.lap("routing_finalize", "assemble", t)
        return ready

    def wait_all(self, timer: PhaseTimer | None = None) -> dict[str, np.ndarray]:
        """Block until every reconstructed request is final and return them (off the step
        path only: this synchronises). Snapshots of still-preempted requests are kept."""
        for state in self._requests.values():
            if state.final is not None:
                for copy in state.copies():
                    copy.wait()
        for copy in self._retired:
            copy.wait()
        return self.poll(timer)

    def discard(self, key: str) -> None:
        """Forget the snapshots and pending result of an aborted request."""
        state = self._requests.pop(key, None)
        if state is not None:
            self._retired.extend(copy for copy in state.copies() if not copy.is_done())

    def _enqueue_copies(self, spans: Sequence[tuple[Sequence[int], int, int]],
                        timer: PhaseTimer | None, phase: str) -> list[_RowCopy]:
        """One batched gather for several (block_ids, lo, hi) spans (rows [lo, hi) of a
        request whose row i sits in block_ids[i // block_size]); each returned copy is a
        view of the shared result, kept alive by every copy that uses it. Times the
        sub-phases plan / gather / copy of `phase`."""
        t = timer.now() if timer is not None else 0.0
        ids: list[int] = []
        layout = []  # per span: (first block in the batch, rows to skip, rows) or None
        for block_ids, lo, hi in spans:
            if hi <= lo:
                layout.append(None)
                continue
            first_block, last_block = lo // self.block_size, (hi - 1) // self.block_size
            if len(block_ids) <= last_block:
                raise ValueError(f"{hi} rows need {last_block + 1} blocks, got {len(block_ids)}")
            span_ids = [int(b) for b in block_ids[first_block : last_block + 1]]
            if min(span_ids) < 0 or max(span_ids) >= self.num_kv_blocks:
                raise ValueError(f"block ids must be in [0, {self.num_kv_blocks}), got {span_ids}")
            layout.append((len(ids), lo - first_block * self.block_size, hi - lo))
            ids.extend(span_ids)
        if timer is not None:
            t = timer.lap(phase, "plan", t)
        blocks, keepalive, done = self._gather_blocks(ids, timer, phase, t) if ids else (None, (), None)
        copies = []
        for (_, lo, _), place in zip(spans, layout):
            if place is None:
                empty = torch.empty((0, self.num_moe_layers, self.topk), dtype=self.dtype)
                copies.append(_RowCopy(first_row=lo, num_rows=0, host=empty))
                continue
            first, skip, count = place
            copies.append(_RowCopy(first_row=lo, num_rows=count, host=blocks, offset=first * self.block_size + skip,
                                   keepalive=keepalive, done=done))
        return copies

    def _gather_blocks(self, ids: list[int], timer: PhaseTimer | None, phase: str, t: float
                       ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.cuda.Event | None]:
        """Host tensor [len(ids), block_size, layers, topk] of those blocks' rows, the
        tensors to keep alive until the copy is done, and its done event (None on CPU,
        where index_select already returns a private copy)."""
        ids_host = torch.tensor(ids, dtype=torch.int64)
        if self._copy_stream is None:
            rows = self.block_routing.index_select(0, ids_host)
            if timer is not None:
                timer.lap(phase, "gather", t)
            return rows, (), None
        compute = torch.cuda.current_stream(self._device_index)
        # From pageable memory this host->device copy would be synchronous.
        ids_pinned = ids_host.pin_memory()
        ids_dev = ids_pinned.to(self.device, non_blocking=True)
        # On the compute stream: ordered before any later step's write into these blocks.
        gathered_rows = self.block_routing.index_select(0, ids_dev)
        gathered = torch.cuda.Event()
        gathered.record(compute)
        if timer is not None:
            t = timer.lap(phase, "gather", t)
        host = torch.empty(gathered_rows.shape, dtype=self.dtype, pin_memory=True)
        self._copy_stream.wait_event(gathered)
        with torch.cuda.stream(self._copy_stream):
            host.copy_(gathered_rows, non_blocking=True)
        done = torch.cuda.Event()
        done.record(self._copy_stream)
        if timer is not None:
            timer.lap(phase, "copy", t)
        return host, (ids_pinned, ids_dev, gathered_rows), done
