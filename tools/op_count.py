"""Counting the device ops a piece of code dispatches (a ``TorchDispatchMode``).

On CUDA every counted op is a kernel launch or a copy, each costing host time, so the count
stands for a step's launch overhead where wall times on a CPU cannot show it.
"""

from __future__ import annotations

import collections
import contextlib

from torch.utils._python_dispatch import TorchDispatchMode


class DeviceOpCounter(TorchDispatchMode):
    """While active, counts every dispatched op that computes (views excluded) by op name
    (``ops``), except inside ``paused()``. Invariant: ``total == sum(ops.values())``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self._paused = 0

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._paused and not func.is_view:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
