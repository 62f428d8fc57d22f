"""The one way the engine's host thread waits for the GPU: polling an event it recorded.

``event.query()`` is not a synchronising call (CUDA's sync debug mode does not flag it), and
yielding between polls keeps other host threads (an output writer, say) running. The engine
only ever waits for an event of an earlier step while the GPU already runs a later one, or,
with synchronous scheduling, for the step it just launched.
"""

from __future__ import annotations

import time

import torch


def wait_for_event(event: torch.cuda.Event) -> None:
    """Return once ``event`` has completed."""
    while not event.query():
        time.sleep(0)
