"""Token-budget scheduler: decodes and prefill chunks share one budget per step.

Every request has `num_computed_tokens` catching up to `num_scheduled_tokens` (prompt +
generated + sampled-but-not-yet-received), so chunked prefill, decode and recompute after
preemption are one mechanism: each step a request gets the next slice of its uncomputed
positions. When KV blocks run out, the most recently arrived running request is preempted:
its blocks are freed (they stay in the prefix cache while nothing evicts them) and it is
recomputed later, outputs kept.

Steps may be in flight. `schedule()` treats what it returns as launched: computed tokens
advance at once and a sampling chunk leaves a pending token whose value reaches the host
with `update()` one step later (asynchronous scheduling) or right away (synchronous). So
`schedule()` for step N+1 may run before `update()` of step N. A request whose pending
token is certainly its last (max_new_tokens, max_model_len) is not scheduled again; one
that stops on EOS, a stop token or a stop string learns it a step late, and the one extra
chunk it was given is discarded by `update()`. What a request holds (KV blocks; for hybrid
models also a recurrent-state slot) is managed by a `SequenceCache` that the scheduler calls at each
transition (admit, grow, chunk applied, preempt, finish); what a request that finishes or is
aborted while a chunk of it is still in flight holds is freed only once that chunk's output
has been applied.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from inference.cache.block_pool import BlockPool
from inference.errors import InvalidRequestError, NoFreeBlocksError
from inference.cache.sequence_cache import Held, SequenceCache
from inference.request import Request, RequestStatus
from inference.scheduled_step import ScheduledChunk, SchedulerOutput


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one step.

    Invariant: every field is a positive int (checked at construction).
    """

    max_requests: int  # max running requests at once
    max_step_tokens: int  # token budget per step (decodes + prefill chunks)
    block_size: int
    chunked_prefill: bool = True  # if False a prompt must fit the budget whole
    eos_token_id: int | None = None
    extra_eos_token_ids: tuple[int, ...] = ()   # further ids that stop like eos_token_id
    max_model_len: int = 2**62  # a request stops ("length") when it holds this many tokens

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_step_tokens", "block_size", "max_model_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be an int >= 1, got {value!r}")


class Scheduler:
    """Waiting and running queues over one SequenceCache (a bare BlockPool is wrapped in one).

    Invariant: every unfinished request is in exactly one of waiting / running; running is
    ordered by arrival; a running request's block_ids cover positions
    [0, num_computed_tokens); waiting requests hold no blocks. A request with chunks in
    flight (scheduled, not yet passed to `update`) is counted in `_in_flight`; what such a
    request that finished or was aborted held waits in `_retiring` until its count is 0.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        cache: SequenceCache | BlockPool,
        on_preempt: Callable[[Request], None] | None = None,
        on_finish: Callable[[Request], None] | None = None,
        stop_checker: Callable[[list[Request]], list[tuple[Request, str]]] | None = None,
    ) -> None:
        """``stop_checker`` (an ``inference.stop_strings.StopStringChecker``'s ``check``)
        gets, once per ``update``, the requests with stop strings that received a token and
        did not stop on an EOS or stop token; it returns those whose output now holds one, with the string."""
        if isinstance(cache, BlockPool):
            cache = SequenceCache(cache)
        if config.block_size != cache.block_size:
            raise ValueError(
                f"scheduler block_size {config.block_size} != pool block_size "
                f"{cache.block_size}"
            )
        self.config = config
        self._eos_ids = frozenset(() if config.eos_token_id is None else (config.eos_token_id,
                                                                          *config.extra_eos_token_ids))
        self.cache = cache
        self.block_pool = cache.block_pool
        self._on_preempt = on_preempt
        self._on_finish = on_finish
        self._stop_checker = stop_checker
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._requests: dict[str, Request] = {}
        # Ties in arrival_index fall back to add() order, so ordering is total and stable.
        self._order: dict[str, tuple[int, int]] = {}
        self._num_added = 0
        self._in_flight: dict[Request, int] = {}
        self._retiring: dict[Request, Held] = {}

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_retiring_blocks(self) -> int:
        """Blocks of finished or aborted requests held until their last chunk lands."""
        return sum(len(held.blocks) for held in self._retiring.values())

    @property
    def num_retiring_requests(self) -> int:
        """Finished or aborted requests whose held blocks / state wait for their last chunk."""
        return len(self._retiring)

    def is_in_flight(self, request: Request) -> bool:
        """Whether a scheduled chunk of `request` has not been passed to `update` yet."""
        return request in self._in_flight

    def add(self, request: Request) -> None:
        """Queue a new request at the back of waiting (FIFO)."""
        request_id = request.request_id
        if request_id in self._requests:
            raise InvalidRequestError("a request with this id is already queued", request_id)
        if request.status is not RequestStatus.WAITING or request.block_ids:
            raise InvalidRequestError("only a fresh WAITING request can be added", request_id)
        if request.num_tokens == 0:
            raise InvalidRequestError("prompt is empty", request_id)
        self._requests[request_id] = request
        self._order[request_id] = (request.arrival_index, self._num_added)
        self._num_added += 1
        self._waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Remove a request wherever it is and free its blocks; None if unknown.

        The request ends FINISHED with `finish_reason` None; `on_finish` is not called. What
        it holds is freed once no chunk of it is in flight.
        """
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        del self._order[request_id]
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        else:
            self._waiting.remove(request)
        request.status = RequestStatus.FINISHED
        request.num_pending_tokens = 0
        self._release_blocks(request)
        return request

    # ----------------------------------------------------------------- schedule

    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks: running requests first (decodes before prefill
        continuations, each in arrival order), then waiting requests while budget, request
        slots and blocks allow. Admission never preempts and is skipped in a step that
        preempted, so a request just pushed out is not pulled straight back in."""
        scheduled: dict[str, ScheduledChunk] = {}
        preempted: list[Request] = []
        budget = self.config.max_step_tokens
        decodes_first = sorted(
            self._running, key=lambda r: r.num_scheduled_tokens - r.num_computed_tokens > 1
        )
        for request in decodes_first:
            if budget == 0:
                break
            # Skipped: preempted earlier in this loop, or certain to stop on its pending token.
            if request.status is RequestStatus.RUNNING and not self._stops_on_pending(request):
                budget -= self._schedule_running(request, budget, scheduled, preempted)
        # Final from here on (admission never preempts): their blocks may be hit this step.
        # (Decode chunks' blocks are hashed when they land: nobody else shares generated tokens.)
        for chunk in scheduled.values():
            if not chunk.is_decode:
                self.cache.commit_scheduled(chunk.request, chunk.start, chunk.start + chunk.num_tokens)
        if not preempted:
            budget = self._admit_waiting(budget, scheduled)
        chunks = list(scheduled.values())
        chunks.sort(key=lambda chunk: not chunk.is_decode)  # stable: keeps arrival order
        for chunk in chunks:  # launched from here on: advance the requests
            request = chunk.request
            request.num_computed_tokens = chunk.start + chunk.num_tokens
            request.num_pending_tokens += chunk.samples
            self._in_flight[request] = self._in_flight.get(request, 0) + 1
        return SchedulerOutput(chunks=chunks, preempted=preempted)

    def _stops_on_pending(self, request: Request) -> bool:
        """Whether the request's pending token is certainly its last (a length limit)."""
        if request.num_pending_tokens == 0:
            return False
        num_outputs = len(request.output_token_ids) + request.num_pending_tokens
        return (num_outputs >= request.sampling_params.max_new_tokens
                or request.num_scheduled_tokens >= self.config.max_model_len)

    def _schedule_running(
        self,
        request: Request,
        budget: int,
        scheduled: dict[str, ScheduledChunk],
        preempted: list[Request],
    ) -> int:
        """Schedule the request's next chunk, preempting the newest running requests until
        its blocks fit. Returns the tokens spent (0 if it preempted itself, or if blocks of
        finished requests are about to be freed: then it waits a step instead).

        A victim already scheduled this step loses its chunk; its tokens are not handed to
        anyone else this step (rare, and keeps the budget accounting one-way)."""
        start = request.num_computed_tokens
        num_tokens = self.cache.chunk_tokens(request, start, min(request.num_scheduled_tokens - start, budget))
        while not self.cache.grow(request, start + num_tokens):
            if self._retiring:
                return 0  # blocks free up when the in-flight step lands: no need to preempt
            victim = max(self._running, key=lambda r: self._order[r.request_id])
            if victim is request and len(self._running) == 1:
                raise NoFreeBlocksError(
                    f"request {request.request_id!r} needs "
                    f"{self._blocks_for(start + num_tokens)} KV blocks alone, more than the "
                    f"pool's {self.block_pool.num_blocks}"
                )
            scheduled.pop(victim.request_id, None)
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return 0
        samples = start + num_tokens == request.num_scheduled_tokens
        scheduled[request.request_id] = ScheduledChunk(request, start, num_tokens, samples)
        return num_tokens

    def _admit_waiting(self, budget: int, scheduled: dict[str, ScheduledChunk]) -> int:
        """Move waiting requests to running in FIFO order; returns the budget left."""
        while self._waiting and budget > 0 and len(self._running) < self.config.max_requests:
            request = self._waiting[0]
            if request in self._in_flight:
                break  # preempted with a chunk in flight: wait for its output (and token)
            chunk = self._admit(request, budget)
            if chunk is None:
                break  # FIFO: nobody overtakes the head of the queue
            self._waiting.popleft()
            bisect.insort(self._running, request, key=lambda r: self._order[r.request_id])
            scheduled[request.request_id] = chunk
            self.cache.commit_scheduled(request, chunk.start, chunk.start + chunk.num_tokens)
            budget -= chunk.num_tokens
        return budget

    def _admit(self, request: Request, budget: int) -> ScheduledChunk | None:
        """Give a waiting request its prefix hits and first chunk's blocks, or return None
        (changing nothing) when the budget or the cache cannot take it this step."""
        cache, block_size = self.cache, self.config.block_size
        hits = cache.match_prefix(request)
        start = len(hits) * block_size
        remaining = request.num_tokens - start
        num_tokens = min(remaining, budget)
        # Without chunked prefill a prompt is admitted whole; a recompute after preemption
        # (prompt + outputs, possibly past the budget) may still take several steps.
        if num_tokens < remaining and not self.config.chunked_prefill and request.num_preemptions == 0:
            if not self._running:  # a whole budget is free and still too small: never fits
                raise InvalidRequestError(
                    f"needs {remaining} tokens in one step but max_step_tokens is "
                    f"{self.config.max_step_tokens}; enable chunked_prefill or make "
                    "max_step_tokens >= max_model_len",
                    request.request_id,
                )
            return None
        num_tokens = cache.chunk_tokens(request, start, num_tokens)
        num_new_blocks = self._blocks_for(start + num_tokens) - len(hits)
        if not cache.can_admit(request, hits, num_new_blocks):
            if not self._running and not self._retiring:  # everything is available and still too few
                raise NoFreeBlocksError(
                    f"request {request.request_id!r} cannot start even with every KV "
                    f"block free ({self.block_pool.num_blocks} blocks of {block_size})"
                )
            return None
        cache.admit(request, hits, num_new_blocks)
        request.num_computed_tokens = start
        if request.num_preemptions == 0:  # only a request's first admission counts
            request.num_cached_tokens = start
        request.status = RequestStatus.RUNNING
        return ScheduledChunk(request, start, num_tokens, start + num_tokens == request.num_tokens)

    # ----------------------------------------------------------------- update

    def update(self, output: SchedulerOutput, sampled: Mapping[str, int]) -> list[Request]:
        """Apply a launched step's results: commit newly full blocks to the prefix cache,
        append sampled tokens, and finish requests. Returns the finished requests in chunk
        order, except that requests with stop strings come last (one batched check after
        every token landed); `on_finish` sees each before its blocks are freed.

        `sampled` maps the request id of every sampling chunk to its token. Chunks of
        requests that finished or were aborted after the step was scheduled are discarded
        (their extra token included). A preempted request (now WAITING) still receives its
        token, and may finish on it."""
        if output.applied:
            ids = [c.request.request_id for c in output.chunks]
            raise ValueError(f"scheduler output for requests {ids} was already applied")
        output.applied = True
        finished: list[Request] = []
        to_check: list[tuple[Request, str | None]] = []
        for chunk in output.chunks:
            request = chunk.request
            self._chunk_landed(request)
            if request.status is RequestStatus.FINISHED:
                continue  # stopped a step earlier, or aborted: discard the extra work
            kept = request.status is RequestStatus.RUNNING
            if kept:
                self.cache.commit_full_blocks(request, chunk.start, chunk.start + chunk.num_tokens)
            self.cache.chunk_applied(chunk, kept)
            if not chunk.samples:
                continue
            if request.request_id not in sampled:
                raise ValueError(f"request {request.request_id!r}: no sampled token for it")
            token = sampled[request.request_id]
            request.num_pending_tokens -= 1
            request.output_token_ids.append(token)
            reason = _finish_reason(request, token, self._eos_ids, self.config.max_model_len)
            if reason != "stop" and request.sampling_params.stop and self._stop_checker is not None:
                to_check.append((request, reason))   # as in vLLM, a stop string beats "length"
            elif reason is not None:
                self._finish(request, reason)
                finished.append(request)
        if to_check:
            finished += self._finish_on_stop_strings(to_check)
        return finished

    def _finish_on_stop_strings(self, checked: list[tuple[Request, str | None]]) -> list[Request]:
        """One batched stop-string check; finishes (through `_finish`, like any stop, so a
        chunk still in flight is discarded when it lands) the matches and the length stops."""
        matched = dict(self._stop_checker([request for request, _ in checked]))
        finished = []
        for request, reason in checked:
            if request in matched:
                request.stop_string = matched[request]
                reason = "stop"
            if reason is not None:
                self._finish(request, reason)
                finished.append(request)
        return finished

    def _chunk_landed(self, request: Request) -> None:
        count = self._in_flight[request] - 1
        if count:
            self._in_flight[request] = count
            return
        del self._in_flight[request]
        held = self._retiring.pop(request, None)
        if held is not None:
            self.cache.free(held)

    def _release_blocks(self, request: Request) -> None:
        """Free what a finished or aborted request holds now, or once its last chunk lands."""
        held = self.cache.detach(request)
        if held.is_empty:
            return
        if request in self._in_flight:
            self._retiring[request] = held
        else:
            self.cache.free(held)

    def _finish(self, request: Request, reason: str) -> None:
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        else:  # preempted with its last token in flight
            self._waiting.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.num_pending_tokens = 0
        if self._on_finish is not None:
            self._on_finish(request)
        self._release_blocks(request)
        del self._requests[request.request_id]
        del self._order[request.request_id]

    # ----------------------------------------------------------------- blocks

    def _blocks_for(self, num_positions: int) -> int:
        return -(-num_positions // self.config.block_size)

    def _preempt(self, request: Request) -> None:
        # Still holds its blocks: routing can be snapshotted, and the engine waits there for
        # an in-flight step that writes them (so its blocks and state slot can be freed now).
        # Its pending token, if any, arrives later.
        if self._on_preempt is not None:
            self._on_preempt(request)
        self.cache.free(self.cache.detach(request))
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self._running.remove(request)
        self._waiting.appendleft(request)

    def check_invariants(self) -> None:
        """Raise AssertionError if a request is in the wrong queue or lacks blocks."""
        block_size = self.config.block_size
        seen: set[str] = set()
        queues = ((self._waiting, RequestStatus.WAITING), (self._running, RequestStatus.RUNNING))
        for queue, status in queues:
            for request in queue:
                rid = request.request_id
                tracked = self._requests.get(rid) is request
                if rid in seen or not tracked or request.status is not status:
                    raise AssertionError(f"request {rid!r} is misplaced ({request.status})")
                seen.add(rid)
                holds = bool(request.block_ids) or request.num_computed_tokens > 0
                if status is RequestStatus.WAITING and holds:
                    raise AssertionError(f"waiting request {rid!r} holds blocks or computed tokens")
                if request.num_pending_tokens not in (0, 1) or (
                        request.num_pending_tokens and request not in self._in_flight):
                    raise AssertionError(f"request {rid!r} has {request.num_pending_tokens} pending "
                                         "tokens and no chunk in flight")
                if len(request.block_ids) * block_size < request.num_computed_tokens:
                    raise AssertionError(f"running request {rid!r} has too few blocks")
        if seen != set(self._requests):
            raise AssertionError("a known request is in neither waiting nor running")
        for request, held in self._retiring.items():
            if not request.is_finished or request.block_ids or request not in self._in_flight or held.is_empty:
                raise AssertionError(f"retiring request {request.request_id!r} is inconsistent")
        keys = [self._order[r.request_id] for r in self._running]
        if keys != sorted(keys):
            raise AssertionError("running requests are not in arrival order")

def _finish_reason(
    request: Request, token: int, eos_token_ids: frozenset[int], max_model_len: int
) -> str | None:
    # Like vLLM: ignore_eos only disables the model's EOS ids; explicit stop_token_ids still stop.
    params = request.sampling_params
    if (not params.ignore_eos and token in eos_token_ids) or token in params.stop_token_ids:
        return "stop"
    if len(request.output_token_ids) >= params.max_new_tokens:
        return "length"
    if request.num_tokens >= max_model_len:
        return "length"
    return None
