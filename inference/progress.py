"""A dependency-free progress line, updated every engine step: requests done and failed,
running / waiting, tokens generated, tok/s over the last few seconds, ETA."""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, TextIO


@dataclass(frozen=True)
class ProgressSnapshot:
    """Counts after one step. ``done`` includes ``failed``; ``tokens`` counts generated
    tokens of this process, also those of requests still running."""

    done: int
    failed: int = 0
    running: int = 0
    waiting: int = 0
    tokens: int = 0


class ProgressBar:
    """Redraws one line (``\\r``) on a terminal, or prints a line per ``interval_s`` when
    enabled elsewhere (logs). Invariant: rates use only samples from the last ``window_s``
    seconds; ``done_before`` requests (already on disk when a run resumed) count toward
    ``done`` but never toward a rate."""

    def __init__(self, total: int, *, enabled: bool | None = None, stream: TextIO | None = None,
                 interval_s: float | None = None, window_s: float = 5.0, width: int = 24, done_before: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = self.tty if enabled is None else enabled
        self.interval_s = interval_s if interval_s is not None else (0.1 if self.tty else 5.0)
        self.total, self.width, self.window_s, self.done_before = total, width, window_s, done_before
        self.clock = clock
        self.start = clock()
        self._samples: deque[tuple[float, int, int]] = deque([(self.start, 0, done_before)])
        self._last_draw = float("-inf")
        self._last: ProgressSnapshot | None = None

    def update(self, snapshot: ProgressSnapshot) -> None:
        now = self.clock()
        self._samples.append((now, snapshot.tokens, snapshot.done))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()
        self._last = snapshot
        finished = snapshot.done >= self.total
        if self.enabled and (now - self._last_draw >= self.interval_s or finished):
            self._last_draw = now
            self._draw(self.render(snapshot, now))

    def token_rate(self, now: float) -> float:
        t0, tokens0, _ = self._samples[0]
        _, tokens1, _ = self._samples[-1]
        return (tokens1 - tokens0) / (now - t0) if now > t0 else 0.0

    def eta_s(self, snapshot: ProgressSnapshot, now: float) -> float | None:
        """Remaining requests over the request rate of the window (of the whole run while
        the window saw no request finish); None before any request finished."""
        remaining = self.total - snapshot.done
        if remaining <= 0:
            return 0.0
        t0, _, done0 = self._samples[0]
        if snapshot.done > done0 and now > t0:
            return remaining * (now - t0) / (snapshot.done - done0)
        served = snapshot.done - self.done_before
        return remaining * (now - self.start) / served if served > 0 and now > self.start else None

    def render(self, snapshot: ProgressSnapshot, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        filled = int(self.width * snapshot.done / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        eta = self.eta_s(snapshot, now)
        failed = f" ({snapshot.failed} failed)" if snapshot.failed else ""
        return (f"[{bar}] {snapshot.done}/{self.total} done{failed} | running {snapshot.running} "
                f"waiting {snapshot.waiting} | {snapshot.tokens:,} tokens, {self.token_rate(now):,.1f} tok/s | "
                f"ETA {_fmt_duration(eta)} | {now - self.start:.1f}s")

    def _draw(self, line: str) -> None:
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._last is not None:
            now = self.clock()
            if now != self._last_draw:
                self._draw(self.render(self._last, now))
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
