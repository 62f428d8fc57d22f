"""Committing finished requests to a run directory while the engine serves the rest.

The step thread only enqueues (``CheckpointWriter.submit`` is a queue put). A writer thread
turns results into results.jsonl records and routing arrays, and commits a checkpoint shard
(``routing_replay.run_layout``: routing file first, then the results file, each written to
a tmp name, fsynced and renamed) every ``every_requests`` results or ``every_seconds`` after
the oldest uncommitted one, whichever comes first. All file I/O and fsync happen there, so
checkpointing never stalls a step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import orjson

from inference.request import RequestResult
from inference.run_outputs import result_record
from routing_replay import RoutingMeta
from routing_replay.outputs import check_routings
from routing_replay.run_layout import CHECKPOINT_DIR, atomic_write, npz_writer, shard_name, shard_paths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointPolicy:
    """When to commit: after ``every_requests`` finished requests, or ``every_seconds``
    after the oldest finished request not yet on disk. Invariant: both are positive."""

    every_requests: int = 64
    every_seconds: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.every_requests, bool) or not isinstance(self.every_requests, int) or self.every_requests < 1:
            raise ValueError(f"--checkpoint-every must be an int >= 1, got {self.every_requests!r}")
        if not self.every_seconds > 0:
            raise ValueError(f"--checkpoint-interval must be > 0 seconds, got {self.every_seconds!r}")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written. The message names the shard, the directory and
    the OS error; every shard committed before it is intact."""


class _Flush:
    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


class CheckpointWriter:
    """Writes one rank's finished results into ``OUT/checkpoint/`` as numbered shards.

    Invariant: results are committed in ``submit`` order; when ``flush()`` returns without
    raising, every result submitted before it is in a committed shard. After a write error
    nothing more is written, and ``submit``/``flush``/``check`` raise the CheckpointError.
    """

    def __init__(self, out_dir: str | Path, *, attempt: int, rank: int, routing_meta: RoutingMeta | None,
                 policy: CheckpointPolicy | None = None,
                 record_extra: Callable[[RequestResult], Mapping[str, Any] | None] | None = None) -> None:
        """``record_extra(result)``: the caller's extra results.jsonl fields of a result
        (``result_record``'s ``extra``), computed on the writer thread."""
        self.out_dir = Path(out_dir)
        self.record_extra = record_extra or (lambda result: None)
        self.attempt, self.rank = attempt, rank
        self.routing_meta = routing_meta
        self.policy = policy or CheckpointPolicy()
        (self.out_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        self._queue: queue.Queue = queue.Queue()
        self._seq = 1
        self._num_committed = 0
        self._error: CheckpointError | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"checkpoint-writer-r{rank}", daemon=True)
        self._thread.start()

    @property
    def num_committed(self) -> int:
        """Results in committed shards (written by this writer)."""
        return self._num_committed

    @property
    def error(self) -> CheckpointError | None:
        return self._error

    def check(self) -> None:
        """Raise the writer's error, if a write failed."""
        if self._error is not None:
            raise self._error

    def submit(self, result: RequestResult) -> None:
        """Queue a final result for the next checkpoint (no I/O on the caller's thread)."""
        self.check()
        if self._closed:
            raise RuntimeError("CheckpointWriter.submit after close()")
        self._queue.put(result)

    def flush(self) -> None:
        """Commit everything submitted so far; blocks until it is on disk."""
        if self._closed:
            self.check()
            return
        marker = _Flush()
        self._queue.put(marker)
        marker.done.wait()
        self.check()

    def close(self) -> None:
        """Commit what is queued and stop the thread (idempotent). Raises a write error."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
        self.check()

    # ---- the writer thread --------------------------------------------------------------
    def _loop(self) -> None:
        pending: list[RequestResult] = []
        oldest: float | None = None
        while True:
            timeout = None if oldest is None else max(0.0, oldest + self.policy.every_seconds - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if isinstance(item, RequestResult):
                pending.append(item)
                oldest = time.monotonic() if oldest is None else oldest
            due = bool(pending) and (item is _STOP or isinstance(item, _Flush)
                                     or len(pending) >= self.policy.every_requests
                                     or time.monotonic() - oldest >= self.policy.every_seconds)
            if due:
                if self._error is None:
                    self._commit(pending)
                pending, oldest = [], None
            if isinstance(item, _Flush):
                item.done.set()
            if item is _STOP:
                return

    def _commit(self, results: list[RequestResult]) -> None:
        name = shard_name(self.attempt, self.rank, self._seq)
        results_path, routing_path = shard_paths(self.out_dir, name)
        try:
            routings = {r.request_id: r.routing for r in results if r.routing is not None}
            if routings:
                check_routings(routings, self.routing_meta)
                atomic_write(routing_path, npz_writer(routings))
            lines = b"".join(orjson.dumps(result_record(r, self.record_extra(r)), option=orjson.OPT_SERIALIZE_NUMPY)
                             + b"\n" for r in results)
            atomic_write(results_path, lines)
        except Exception as exc:  # noqa: BLE001 - any failure must reach the step thread, not kill this one
            reason = f"[Errno {exc.errno}] {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else repr(exc)
            self._error = CheckpointError(f"cannot write checkpoint {name} in {self.out_dir / CHECKPOINT_DIR}: {reason}")
            log.error("%s", self._error)
            return
        self._seq += 1
        self._num_committed += len(results)
        log.debug("checkpoint %s committed %d results: %s", name, len(results),
                  orjson.dumps([r.request_id for r in results]).decode())
