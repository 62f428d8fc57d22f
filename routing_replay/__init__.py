"""Rollout routing replay: record, per token, the top-k experts every MoE layer chose.

This package is engine-agnostic: it knows KV block ids and per-step tensors, never the
engine (it must not import `inference`).

What an engine provides
-----------------------
- KV block ids per request, in sequence order: row i (token i) of a request lives at block
  ``block_ids[i // block_size]``, offset ``i % block_size``. A prefix-cache hit simply lists
  the producer's blocks, and their routing rows come with them.
- Per step, int64 device tensors ``token_to_block`` and ``token_to_offset`` (the ones that
  drive the KV append), padding rows pointing at the dummy block
  ``recorder.dummy_block == num_kv_blocks`` with offset 0.

Calling order
-------------
1. Build one ``RoutingRecorder(num_kv_blocks=..., block_size=..., num_moe_layers=...,
   topk=..., num_experts=..., max_step_tokens=..., device=...)``.
2. Every step, pass ``recorder.staging[:num_padded_tokens]`` to the model; the j-th MoE
   layer (depth order) writes its top-k ids into ``staging[:, j, :]``.
3. After the forward, ``recorder.gather(token_to_block[:n], token_to_offset[:n])``
   (capturable in a CUDA graph: no host sync).
4. Before freeing a preempted request's blocks,
   ``recorder.snapshot_preempted(key, block_ids, num_computed_rows)``.
5. When a request finishes, before freeing its blocks,
   ``recorder.reconstruct(key, block_ids, expected_num_rows(prompt_len, generated_len))``.
   ``recorder.discard(key)`` forgets an aborted request.
6. ``recorder.poll()`` every step returns ``{key: ndarray}`` for requests whose routing is
   final; ``recorder.wait_all()`` at the end (it blocks) returns the rest.

Time each call with ``time.perf_counter`` as its step_details phase (see
``routing_replay.recorder``) and write the log with ``StepDetailsLog``; save results with
``save_routing``. ``load_routing`` / ``load_results`` read a run directory, finished or
interrupted (layout in ``routing_replay.run_layout``).
"""

from routing_replay.dtypes import numpy_dtype, routing_dtype
from routing_replay.outputs import RoutingMeta, expand_to_all_layers, load_results, load_routing, save_routing
from routing_replay.recorder import RoutingRecorder, expected_num_rows
from routing_replay.step_details import STEP_KEYS, StepDetailsLog, step_kind

__all__ = [
    "STEP_KEYS",
    "RoutingMeta",
    "RoutingRecorder",
    "StepDetailsLog",
    "expand_to_all_layers",
    "expected_num_rows",
    "load_results",
    "load_routing",
    "numpy_dtype",
    "routing_dtype",
    "save_routing",
    "step_kind",
]
