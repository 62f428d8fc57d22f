"""Driving one rank's requests through the engine step by step, through its public API only
(``add_request`` / ``step`` / ``has_unfinished`` / ``abort``), so a stop request (a signal)
is honoured between two steps and every final result is handed on as soon as it exists."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from inference.engine import LLMEngine
from inference.errors import InvalidRequestError
from inference.progress import ProgressBar, ProgressSnapshot
from inference.request import RequestResult, SamplingParams
from inference.workload import PromptSpec

log = logging.getLogger("run_inference")


@dataclass
class ServeStats:
    """Counts over the results this process handed on. Invariant: ``finished + failed``
    equals the number of results seen."""

    finished: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    preemptions: int = 0
    with_routing: int = 0
    unserved: list[str] = field(default_factory=list)   # ids aborted or never admitted (interrupted)

    def add(self, result: RequestResult) -> None:
        if result.finish_reason == "error":
            self.failed += 1
            return
        self.finished += 1
        self.prompt_tokens += len(result.prompt_token_ids)
        self.output_tokens += len(result.output_token_ids)
        self.cached_tokens += result.num_cached_tokens
        self.preemptions += result.num_preemptions
        self.with_routing += result.routing is not None


def serve_requests(engine: LLMEngine, specs: Sequence[PromptSpec], params_for: Callable[[PromptSpec], SamplingParams],
                   sink: Callable[[RequestResult], None], stop_requested: Callable[[], bool],
                   progress: ProgressBar | None = None, done_before: int = 0) -> ServeStats:
    """Serve ``specs`` (admitting at most ``max_requests`` waiting at a time), passing every
    final result to ``sink``. When ``stop_requested()`` turns true: stop admitting, abort
    the in-flight requests, and drain the results that are already final; the aborted and
    never-admitted ids end in ``stats.unserved`` (a resumed run serves them)."""
    stats = ServeStats()
    pending = deque(specs)
    in_flight: dict[str, None] = {}    # ordered: ranks of a replica abort in the same order

    def hand_on(result: RequestResult) -> None:
        in_flight.pop(result.request_id, None)
        stats.add(result)
        if result.finish_reason == "error":
            log.warning("%s", result.error)
        sink(result)

    while not stop_requested():
        while pending and engine.scheduler.num_waiting < engine.config.max_requests:
            spec = pending.popleft()
            if spec.problem is not None:     # e.g. a chat its template refused: fails alone
                hand_on(RequestResult.failed(spec.request_id, [], spec.problem))
                continue
            try:
                engine.add_request(spec.prompt_token_ids, params_for(spec), request_id=spec.request_id,
                                   routing_start=spec.routing_start)
                in_flight[spec.request_id] = None
            except InvalidRequestError as exc:
                hand_on(RequestResult.failed(spec.request_id, list(spec.prompt_token_ids)
                                             if isinstance(spec.prompt_token_ids, (list, tuple)) else [], str(exc)))
        if not engine.has_unfinished():
            if not pending:
                break
            continue
        _step(engine, hand_on)
        if progress is not None and progress.enabled:
            progress.update(snapshot(engine, stats, done_before))
    if stop_requested():
        stats.unserved = [i for i in list(in_flight) if engine.abort(i)] + [s.request_id for s in pending]
        for request_id in stats.unserved:
            in_flight.pop(request_id, None)
        while engine.has_unfinished():   # results that were already final (e.g. awaiting routing)
            _step(engine, hand_on)
    return stats


def snapshot(engine: LLMEngine, stats: ServeStats, done_before: int = 0) -> ProgressSnapshot:
    return ProgressSnapshot(done=done_before + stats.finished + stats.failed, failed=stats.failed,
                            running=engine.scheduler.num_running, waiting=engine.scheduler.num_waiting,
                            tokens=engine.num_generated_tokens)


def _step(engine: LLMEngine, hand_on: Callable[[RequestResult], None]) -> None:
    debug = log.isEnabledFor(logging.DEBUG)
    if debug:
        waiting, steps = engine.scheduler.num_waiting, len(engine.step_log)
    results = engine.step()
    for result in results:
        hand_on(result)
    if debug:
        _log_decisions(engine, waiting, steps, results)


def _log_decisions(engine: LLMEngine, waiting_before: int, steps_before: int, results: list[RequestResult]) -> None:
    """One debug line per step: admitted, preempted, finished (derived from the public
    queue counts and the step's step_details entry: waiting_after = waiting_before -
    admitted + preempted)."""
    entry = _last_entry(engine) if len(engine.step_log) > steps_before else None
    preempted = int(entry.get("preempted_requests", 0)) if entry else 0
    admitted = waiting_before - engine.scheduler.num_waiting + preempted
    step = entry["step"] if entry else "-"
    log.debug("step %s: admitted %d, preempted %d, finished %s (running %d, waiting %d)", step, admitted, preempted,
              [r.request_id for r in results], engine.scheduler.num_running, engine.scheduler.num_waiting)


def _last_entry(engine: LLMEngine) -> dict | None:
    return engine.step_log.last_entry
