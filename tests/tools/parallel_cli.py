"""Rank side of the CLI's tensor/expert-parallel tests: every rank of a gloo world (see
``tests/inference/parallel/harness.py``) runs ``tools/run_inference.py``'s ``main`` on the
same command lines, one after the other, as torchrun's processes would (the process group
is already initialised, so the CLI uses it). Optionally one rank receives SIGTERM after a
number of engine steps, to check that its replica stops together and writes a resumable
directory."""

from __future__ import annotations

import contextlib
import io
import os
import signal

import numpy as np


def _signal_after(steps: int) -> None:
    """SIGTERM to this process once the serve loop has run ``steps`` engine steps."""
    import tools.serve_loop as serve_loop
    original, count = serve_loop._step, [0]

    def step(engine, hand_on):
        count[0] += 1
        if count[0] == steps:
            os.kill(os.getpid(), signal.SIGTERM)
        original(engine, hand_on)
    serve_loop._step = step


def run_cli(rank: int, world_size: int, argvs: list[list[str]], signal_rank: int = -1,
            signal_run: int = -1, signal_steps: int = 0) -> dict[str, np.ndarray]:
    """``main(argv)`` for each argv; returns each run's exit status (and rank 0's stdout)."""
    import tools.serve_loop as serve_loop
    from tools.run_inference import main
    original = serve_loop._step
    out: dict[str, np.ndarray] = {}
    for i, argv in enumerate(argvs):
        serve_loop._step = original
        if rank == signal_rank and i == signal_run:
            _signal_after(signal_steps)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            try:
                code = main(argv)
            except SystemExit as exc:      # parser.error: a usage error
                code = exc.code if isinstance(exc.code, int) else 1
        out[f"exit{i}"] = np.array(code)
        out[f"stdout{i}"] = np.array(stdout.getvalue())
        # The guard left its handlers in place after a signal (the process was on its way
        # out); the next run installs its own.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return out


def run_tool_main(rank: int, world_size: int, module: str, argv: list[str]) -> dict[str, np.ndarray]:
    """``module.main(argv)`` on this rank (a tool run under torchrun); returns its exit status."""
    import importlib
    with contextlib.redirect_stdout(io.StringIO()):
        code = importlib.import_module(module).main(argv)
    return {"exit": np.array(code)}
