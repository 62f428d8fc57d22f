"""Shared harness of the kernel tests: skip markers, Triton-interpreter runs in a subprocess
and a no-host-sync guard.

A kernel test file checks its Triton kernels on CPU by running itself as a script with
TRITON_INTERPRET=1 (``assert_interpreter_checks_pass`` from the pytest side,
``run_interpreter_checks`` from the script's ``__main__``), so the interpreter setting never
leaks into other tests. Test files import this module as ``tests.inference.kernels.harness``:
the repo root is on ``sys.path`` both under pytest (tests/conftest.py) and in the subprocess
(PYTHONPATH).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[3]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
INTERPRETER_BROKEN = "SKIP: this Triton interpreter cannot use a loaded scalar as a loop bound"


def interpreter_handles_scalar_loop_bounds() -> bool:
    """Triton 3.6's interpreter turns a loaded scalar into a loop bound with int() on a
    1-element array, which numpy >= 2.4 refuses; later Triton squeezes first."""
    import triton
    import triton.language as tl

    @triton.jit
    def count_kernel(n_ptr, out_ptr):
        total = 0
        for _ in range(0, tl.load(n_ptr)):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count_kernel[(1,)](torch.tensor([3], dtype=torch.int32), out)
    except Exception as exc:  # noqa: BLE001  (the interpreter wraps the TypeError)
        if "0-dimensional" in str(exc):
            return False
        raise
    return int(out) == 3


def run_interpreter_checks(check_cases: Callable[[], int]) -> None:
    """Script side: run ``check_cases`` (it asserts and returns how many cases it checked)
    and report the count, or report ``INTERPRETER_BROKEN`` without running it."""
    if not interpreter_handles_scalar_loop_bounds():
        print(INTERPRETER_BROKEN)
        return
    print(f"checked {check_cases()} interpreter cases")


def assert_interpreter_checks_pass(script: str | os.PathLike[str], expected_cases: int) -> None:
    """Pytest side: run ``script`` with TRITON_INTERPRET=1 and require all of its
    ``expected_cases`` to pass; skip only when the interpreter itself is known broken."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if INTERPRETER_BROKEN in proc.stdout:
        pytest.skip(INTERPRETER_BROKEN.removeprefix("SKIP: ") + " (upstream bug, fixed in later Triton)")
    assert f"checked {expected_cases} interpreter cases" in proc.stdout


@contextlib.contextmanager
def forbid_host_sync() -> Iterator[None]:
    """Make any CUDA host sync inside the block raise instead of silently stalling."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
