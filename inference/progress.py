"""A dependency-free progress line for long runs: requests done and tokens per second."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Redraws one line on a terminal (at most every ``interval_s``); silent elsewhere."""

    def __init__(self, total: int, *, enabled: bool | None = None, stream: TextIO | None = None,
                 interval_s: float = 0.2, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.width, self.interval_s = total, width, interval_s
        self.done = 0
        self.tokens = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0

    def update(self, requests: int = 0, tokens: int = 0) -> None:
        self.done += requests
        self.tokens += tokens
        now = time.perf_counter()
        if self.enabled and (now - self._last_draw >= self.interval_s or self.done >= self.total):
            self._last_draw = now
            self.stream.write("\r" + self.render(now))
            self.stream.flush()

    def render(self, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        filled = int(self.width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        return (f"[{bar}] {self.done}/{self.total} requests | {self.tokens} tokens | "
                f"{self.tokens / elapsed:,.1f} tok/s | {elapsed:.1f}s")

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
