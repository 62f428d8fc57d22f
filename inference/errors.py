"""Errors the inference engine raises on purpose.

Each one names what was wrong (a request id, a flag, a component, a missing package) so a
caller serving many requests can tell which input to fix without reading a traceback.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator


class InvalidRequestError(ValueError):
    """A request (or a flag) is bad.

    Invariant: `str(error)` starts with `request '<id>': ` whenever `request_id` is set, so
    every message names the offending request; for a bad flag `request_id` is None and the
    message names the flag instead.
    """

    def __init__(self, message: str, request_id: str | None = None) -> None:
        prefix = f"request {request_id!r}: " if request_id is not None else ""
        super().__init__(prefix + message)
        self.request_id = request_id


class NoFreeBlocksError(RuntimeError):
    """The KV block pool cannot hand out as many blocks as were asked for.

    Invariant: raised before any state changes, so the pool is exactly as it was.
    """


class AllocationError(MemoryError):
    """Allocating one component of the engine failed (device or host out of memory).

    Invariant: ``component`` is one of the names the memory plan uses ("weights",
    "KV cache", "routing buffer", "CUDA graphs", ...) and ``str(error)`` starts with it, so
    the message says what to shrink; ``hint`` names the flag that changes its size.
    """

    def __init__(self, component: str, detail: str, hint: str | None = None) -> None:
        self.component, self.detail, self.hint = component, detail, hint
        super().__init__(f"{component}: allocation failed ({detail})" + (f"; {hint}" if hint else ""))


_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate")


@contextmanager
def allocating(component: str, hint: str | None = None) -> Iterator[None]:
    """Turn an out-of-memory failure inside the block into ``AllocationError(component)``.

    ``torch.OutOfMemoryError`` always qualifies; another RuntimeError only when its message
    says an allocation failed (the CPU allocator raises a plain RuntimeError). Everything
    else propagates unchanged.
    """
    try:
        yield
    except MemoryError as exc:
        if isinstance(exc, AllocationError):
            raise
        raise AllocationError(component, str(exc).splitlines()[0] if str(exc) else "MemoryError", hint) from exc
    except RuntimeError as exc:
        message = str(exc)
        oom = isinstance(exc, _torch_oom_error()) or any(m in message.lower() for m in _OOM_MARKERS)
        if not oom:
            raise
        raise AllocationError(component, _short(message), hint) from exc


def _torch_oom_error() -> type:
    import torch
    return getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def _short(message: str) -> str:
    # The CPU allocator prefixes "[enforce fail at alloc_cpu.cpp:127] err == 0. "; CUDA adds
    # a paragraph of allocator advice. The first sentence that names the size is enough.
    first = message.strip().splitlines()[0]
    marker = first.find("DefaultCPUAllocator:")
    return first[marker + len("DefaultCPUAllocator:"):].strip() if marker >= 0 else first


class MissingDependencyError(ImportError):
    """An optional dependency is not installed.

    Invariant: the message names the feature that needs it and the exact ``pip install``
    command of the extra that provides it.
    """


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise MissingDependencyError naming ``extra`` (setup.cfg extras)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{feature} needs the optional dependency {module.split('.')[0]!r} ({exc}); install it with "
            f"pip install -e \".[{extra}]\" (or pip install \"moe-routing-replay[{extra}]\")") from exc


class NoFreeStateSlotsError(RuntimeError):
    """The recurrent state pool has no free slot for another running request.

    Invariant: raised before any state changes, so the pool is exactly as it was.
    """
