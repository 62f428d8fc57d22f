"""Fixtures for CLI tests: ``cli`` runs ``tools/run_inference.py``'s ``main`` in forked
child processes of one pre-imported server (see cli_server.py), so tests can start, signal
and SIGKILL many real processes cheaply."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class CliRun:
    """One finished (or killed) child: exit status (negative: killed by that signal)."""

    status: int
    stdout: str
    stderr: str


class CliServer:
    """Client of cli_server.py. Invariant: one request in flight at a time; every child it
    started is waited for (no zombies) before the server exits."""

    def __init__(self, workdir: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cli_server.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.workdir = workdir
        self._names = itertools.count()
        self._files: dict[int, tuple[Path, Path]] = {}
        self.run(["--dry-run"])   # the first answer waits for the server's imports: not a test's time

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(orjson.dumps(request).decode() + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("cli_server exited")
        return orjson.loads(line)

    def start(self, argv: list[str], *, block: list[str] = (), enospc_after: int | None = None,
              enospc_only: str | None = None) -> int:
        n = next(self._names)
        out, err = self.workdir / f"cli{n}.out", self.workdir / f"cli{n}.err"
        pid = self._ask({"op": "start", "argv": [str(a) for a in argv], "out": str(out), "err": str(err),
                         "block": list(block), "enospc_after": enospc_after, "enospc_only": enospc_only})["pid"]
        self._files[pid] = (out, err)
        return pid

    def wait(self, pid: int, timeout: float | None = None) -> CliRun | None:
        """The finished run, or None when it is still running after ``timeout`` seconds."""
        status = self._ask({"op": "wait", "pid": pid, "timeout": timeout})["status"]
        if status is None:
            return None
        out, err = self._files.pop(pid)
        return CliRun(status, out.read_text(), err.read_text())

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> CliRun:
        os.kill(pid, sig)
        return self.wait(pid)

    def run(self, argv: list[str], **kwargs) -> CliRun:
        return self.wait(self.start(argv, **kwargs))

    def close(self) -> None:
        for pid in list(self._files):
            self.kill(pid)
        self.proc.stdin.write('{"op": "quit"}\n')
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def cli(tmp_path_factory) -> CliServer:
    server = CliServer(tmp_path_factory.mktemp("cli"))
    yield server
    server.close()
