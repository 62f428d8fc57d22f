"""A fork server for CLI fault-injection tests: imports ``tools.run_inference`` once, then
runs each requested command line as ``main(argv)`` in a forked child process, with stdout
and stderr going to files. The child is a real separate process (tests SIGKILL it at random
moments) that starts in milliseconds instead of the seconds a fresh interpreter needs to
import torch. The server never runs a torch op itself, so forking it is safe.

Protocol, one JSON object per line: on stdin ``{"op": "start", "argv": [...], "out": path,
"err": path, "block": [module, ...], "enospc_after": n, "enospc_only": suffix}`` -> ``{"pid": n}``;
``{"op": "wait", "pid": n, "timeout": s | null}`` -> ``{"status": code | -signal | null}``.
"""

from __future__ import annotations

import errno
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import orjson  # noqa: E402

import torch._dynamo  # noqa: E402,F401  # pyflakes: ignore - imported lazily by the first meta-device model build: 2-5 s
from tools.run_inference import main  # noqa: E402


class _FullDisk:
    """A file whose writes fail with ENOSPC once the process has written ``budget`` bytes."""

    def __init__(self, handle, budget: list[int]) -> None:
        self._handle, self._budget = handle, budget

    def write(self, data) -> int:
        if self._budget[0] < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget[0] -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


def _inject_enospc(after_bytes: int, only_names_ending: str | None) -> None:
    """Writes fail once ``after_bytes`` were written (to files whose name ends with
    ``only_names_ending``, when given; other files are written normally)."""
    from routing_replay import run_layout
    original = run_layout._open_for_write
    budget = [after_bytes]

    def open_for_write(path):
        handle = original(path)
        return handle if only_names_ending and not str(path).endswith(only_names_ending) else _FullDisk(handle, budget)

    run_layout._open_for_write = open_for_write


def _child(request: dict) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, request["out"]), (2, request["err"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_APPEND), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    for module in request.get("block", []):
        sys.modules[module] = None          # `import module` now raises ImportError
    if request.get("enospc_after") is not None:
        _inject_enospc(request["enospc_after"], request.get("enospc_only"))
    try:
        code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - report like the interpreter would
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _wait(pid: int, timeout: float | None) -> int | None:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(0.005)


def serve() -> None:
    for line in sys.stdin:
        request = orjson.loads(line)
        if request["op"] == "start":
            for path in (request["out"], request["err"]):   # exist even for a child killed at once
                open(path, "wb").close()
            pid = os.fork()
            if pid == 0:
                _child(request)
            reply = {"pid": pid}
        elif request["op"] == "wait":
            reply = {"status": _wait(request["pid"], request.get("timeout"))}
        else:
            return
        sys.stdout.write(orjson.dumps(reply).decode() + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
