"""Errors the inference engine raises on purpose.

Each one names what was wrong (a request id or a flag) so a caller serving many requests can
tell which input to fix without reading a traceback.
"""

from __future__ import annotations


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
