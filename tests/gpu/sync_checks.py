"""A shared GPU-test check: graph decode steps of a running engine make no host sync."""

from __future__ import annotations

import torch


def assert_graph_decode_without_host_sync(engine, warm_steps: int, checked_steps: int) -> None:
    """Run ``warm_steps`` steps (prefill, first decodes), then ``checked_steps`` steps with
    CUDA's sync debug mode raising on any host sync; each checked step must have replayed a
    graph. Then serve the rest. The caller has added the requests."""
    for _ in range(warm_steps):
        engine.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(checked_steps):
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    checked = engine.step_log.entries[-checked_steps:]
    assert len(checked) == checked_steps and all(e["cuda_graph"] for e in checked)
    while engine.has_unfinished():
        engine.step()
