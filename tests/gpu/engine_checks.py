"""Checks the GPU engine tests share: graph decode makes no host sync; a fast path's
results equal the plain path's and the fp32 full-sequence reference."""

from __future__ import annotations

import numpy as np
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


def assert_same_results_as_the_reference(model, results, plain_results) -> None:
    """fp32: each result's tokens and routing equal the plain path's, and its greedy tokens
    and routing equal ``model.forward_reference`` over the whole sequence (no KV cache)."""
    assert results and len(results) == len(plain_results)
    for a, b in zip(results, plain_results):
        assert a.output_token_ids == b.output_token_ids
        assert np.array_equal(a.routing, b.routing)
        seq = torch.tensor(a.prompt_token_ids + a.output_token_ids, device="cuda")
        logits, routing = model.forward_reference(seq[:-1])
        assert logits[len(a.prompt_token_ids) - 1:].argmax(-1).tolist() == a.output_token_ids
        assert torch.equal(torch.from_numpy(a.routing.astype(np.int64)).cuda(), routing)
