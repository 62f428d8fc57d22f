"""ProgressBar: every-step state, a token rate over the recent window only, ETA, and the
two output styles (a redrawn terminal line, periodic log lines)."""

from __future__ import annotations

import io

from inference.progress import ProgressBar, ProgressSnapshot


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_rate_counts_only_the_recent_window():
    clock = Clock()
    bar = ProgressBar(10, enabled=False, window_s=5.0, clock=clock)
    for second in range(1, 11):       # 100 tok/s for 10 s ...
        clock.now += 1
        bar.update(ProgressSnapshot(done=0, tokens=100 * second))
    for second in range(1, 6):        # ... then 10 tok/s for 5 s
        clock.now += 1
        bar.update(ProgressSnapshot(done=0, tokens=1000 + 10 * second))
    assert bar.token_rate(clock.now) == 10.0    # the first ten seconds no longer count


def test_eta_from_request_rate_and_done_before():
    clock = Clock()
    bar = ProgressBar(100, enabled=False, window_s=10.0, done_before=40, clock=clock)
    assert bar.eta_s(ProgressSnapshot(done=40), clock.now) is None       # nothing finished yet
    for step in range(1, 6):
        clock.now += 1
        bar.update(ProgressSnapshot(done=40 + 2 * step))                 # 2 requests/s
    assert abs(bar.eta_s(ProgressSnapshot(done=50), clock.now) - 25.0) < 1e-9
    assert bar.eta_s(ProgressSnapshot(done=100), clock.now) == 0.0


def test_render_has_every_field():
    clock = Clock()
    bar = ProgressBar(8, enabled=False, clock=clock)
    clock.now += 2
    line = bar.render(ProgressSnapshot(done=3, failed=1, running=4, waiting=1, tokens=1234), clock.now)
    for part in ("3/8 done (1 failed)", "running 4 waiting 1", "1,234 tokens", "tok/s", "ETA", "2.0s"):
        assert part in line, line


def test_terminal_redraws_one_line_at_most_every_interval():
    clock, stream = Clock(), Tty()
    bar = ProgressBar(4, stream=stream, interval_s=1.0, clock=clock)
    assert bar.enabled
    for step in range(10):
        clock.now += 0.25
        bar.update(ProgressSnapshot(done=0, running=1, tokens=step))
    bar.update(ProgressSnapshot(done=4, tokens=12))     # finishing always draws
    bar.close()
    text = stream.getvalue()
    assert "\n" not in text[:-1] and text.endswith("\n") and 3 <= text.count("\r") <= 5
    assert "4/4 done" in text.split("\r")[-1]


def test_non_terminal_prints_lines_only_when_enabled():
    clock, stream = Clock(), io.StringIO()
    ProgressBar(2, stream=stream, clock=clock).update(ProgressSnapshot(done=1))
    assert stream.getvalue() == ""
    bar = ProgressBar(2, stream=stream, enabled=True, interval_s=5.0, clock=clock)
    for _ in range(12):
        clock.now += 1
        bar.update(ProgressSnapshot(done=1, tokens=3))
    assert "\r" not in stream.getvalue() and 2 <= stream.getvalue().count("\n") <= 3
