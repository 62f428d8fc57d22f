"""The engine's side of routing recording: which rows to save when, and to whom they go.

The recorder (``routing_replay``) knows blocks and tensors; this adapter knows requests. It
keys every recorder call by an engine-internal key (a request's arrival number), never by
the caller's id, so an id reused after its result was returned can never meet a routing
copy still in flight for the earlier request of that id.
"""

from __future__ import annotations

from inference.request import Request, RequestResult
from routing_replay.phase_timer import PhaseTimer


def routing_key(request: Request) -> str:
    """The recorder key of a request: unique per engine (arrival numbers are never reused)."""
    return f"#{request.arrival_index}"


class RoutingCollector:
    """Snapshots preempted requests, reconstructs finished ones once per step, and attaches
    final routing to their results. Invariant: a result handed to ``await_routing`` comes
    back from ``poll`` exactly once, with ``prompt_len + generated_len - 1 - routing_start``
    rows, unless it is discarded first."""

    def __init__(self, recorder) -> None:
        self.recorder = recorder
        self._to_reconstruct: list[tuple[str, list[int], int, int]] = []
        self._awaiting: dict[str, RequestResult] = {}

    @property
    def num_awaiting(self) -> int:
        return len(self._awaiting)

    def snapshot_preempted(self, request: Request, timer: PhaseTimer) -> None:
        """Before a preempted request's blocks are freed: its rows so far are authoritative."""
        if request.num_computed_tokens > 0:
            self.recorder.snapshot_preempted(routing_key(request), request.block_ids,
                                             request.num_computed_tokens, timer)

    def request_finished(self, request: Request, routing_start: int) -> None:
        """Queue the final read of a finished request's rows (call before its blocks are
        freed; ``flush`` enqueues the reads of one step together)."""
        self._to_reconstruct.append((routing_key(request), list(request.block_ids),
                                     request.num_tokens - 1, routing_start))

    def flush(self, timer: PhaseTimer) -> None:
        """Enqueue the queued reads: one gather and one copy for all of them, on the compute
        stream, so no later step's write into those blocks can reach them."""
        if self._to_reconstruct:
            self.recorder.reconstruct_many(self._to_reconstruct, timer)
            self._to_reconstruct = []

    def await_routing(self, request: Request, result: RequestResult) -> None:
        self._awaiting[routing_key(request)] = result

    def discard(self, request: Request) -> bool:
        """Forget an aborted request; True if a finished result was waiting for routing."""
        key = routing_key(request)
        self._to_reconstruct = [item for item in self._to_reconstruct if item[0] != key]
        self.recorder.discard(key)
        return self._awaiting.pop(key, None) is not None

    def poll(self, timer: PhaseTimer, wait: bool = False) -> list[RequestResult]:
        """Results whose routing became final (``wait=True`` blocks for all of them: off
        the step path only)."""
        if not self._awaiting:
            return []
        done = self.recorder.wait_all(timer) if wait else self.recorder.poll(timer)
        ready = []
        for key, routing in done.items():
            result = self._awaiting.pop(key, None)
            if result is not None:
                result.routing = routing
                ready.append(result)
        return ready
