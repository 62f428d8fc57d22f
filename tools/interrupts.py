"""SIGINT / SIGTERM during a run: the first one asks the run to stop cleanly (stop admitting,
abort in-flight requests, commit what finished, exit 130 / 143); a second one exits at
once. Files already committed stay valid either way: every file is renamed into place.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class InterruptGuard:
    """Installs SIGINT/SIGTERM handlers for the duration of a ``with`` block.

    Invariant: ``signum`` is the first signal received (None before); ``exit_code`` is
    ``128 + signum`` (130 for SIGINT, 143 for SIGTERM). On exit the previous handlers are
    restored, unless a signal arrived: the process is then on its way out, and a further
    signal must still exit at once rather than raise KeyboardInterrupt into the shutdown.
    Outside the main thread it installs nothing (Python allows handlers only there).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.signum is None:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "no signal"

    def adopt(self, signum: int) -> None:
        """Stop as if ``signum`` had arrived here: another rank of this tensor-parallel
        replica received it, and the replica stops together (``inference.replica``)."""
        if self.signum is None:
            self.signum = signum

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            # os.write: no buffered stream may be mid-write in the interrupted frame.
            os.write(2, f"\n{name} received: stopping; finished requests are being saved "
                        f"(send it again to exit at once)\n".encode())
            return
        os.write(2, f"\n{name} received again: exiting now; the output directory holds every "
                    f"checkpoint committed so far (continue with --resume)\n".encode())
        os._exit(128 + signum)
