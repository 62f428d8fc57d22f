"""How a ``ParallelLayout`` maps onto megatron-core 0.16's parallel layout, for the
TP/EP-sharded export (issue 12, item 4) and for routing replay targets.

Rank groups. ``parallel_state.initialize_model_parallel(**megatron_parallel_kwargs(layout))``
builds the same groups as ``ParallelLayout``: its decoder ``RankGenerator`` (order
"tp-cp-ep-dp-pp") puts TP innermost, and its expert ``RankGenerator`` (tp = expert tensor
parallel size, then ep, then expert data parallel) gives EP groups of stride ``etp`` inside
each TP group (tests/inference/parallel/test_megatron_layout.py checks both generators).

Shards (megatron-core local spec, ``T | kv_heads``):
- ``linear_qkv``: megatron orders rows per query group ``[q_g; k_g; v_g]`` and TP rank r
  holds groups ``[r * G / T, (r + 1) * G / T)``: the same query and KV heads as our
  ``QKVParallelLinear`` on rank r, regrouped. With ``T > kv_heads`` we replicate KV heads;
  megatron cannot, so ``ParallelLayout.megatron_compatible`` is False there.
- ``linear_proj``: columns of rank r's heads (row-parallel), as our ``o_proj``.
- ``linear_fc1`` (SwiGLU): rank r holds ``[gate_r; up_r]`` (megatron's
  ``apply_swiglu_sharded_factory`` shards the two halves separately), as our
  ``ColumnParallelLinear(output_sizes=[I, I])``; ``linear_fc2`` row-parallel.
- Experts: EP rank e holds ``local_experts.l`` = global expert ``e * N / E + l``
  (``MoELayer.local_expert_indices``), each split over ``expert_tensor_parallel_size`` ranks
  like a dense fc1/fc2; the router is replicated.
- Vocabulary: ``VocabParallelEmbedding`` needs ``T | vocab_size`` and gives rank r rows
  ``[r * V / T, (r + 1) * V / T)``. Export with ``megatron_vocab_size`` (our padded
  vocabulary) and the ranges equal ours; megatron-training's own padding (128 * T) would
  not.

Tokens under sequence parallelism. Megatron keeps activations ``[seq, batch, hidden]``;
with ``sequence_parallel=True`` the embedding output is split along seq
(``scatter_to_sequence_parallel_region``): TP rank r holds sequence rows
``[r * S / T, (r + 1) * S / T)`` of every batch column, and its router flattens them
s-major (``logits.view(-1, num_experts)``). In the ``order="sb"`` targets of
``routing_replay.replay_targets`` (row ``s * batch + b``) those are the contiguous rows
``[r * S * B / T, (r + 1) * S * B / T)``: exactly ``sequence_parallel_slice(targets,
tp_rank, tp_size)``, where rank and size are the *tensor-parallel* rank and size
(``get_tensor_model_parallel_rank()``), not the global ones. Packed (THD) batches are one
``[T_total, 1]`` sequence, split the same way. Without sequence parallelism every TP rank
routes every token and takes the whole targets. Context parallelism (load-balanced
zig-zag chunks) is not covered.
"""

from __future__ import annotations

from typing import Any

from inference.config import ModelConfig
from inference.parallel.layout import ParallelLayout, padded_vocab_size, split_range


def megatron_parallel_kwargs(layout: ParallelLayout) -> dict[str, Any]:
    """Arguments of megatron-core's ``initialize_model_parallel`` for the same groups."""
    return dict(tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=1,
                context_parallel_size=1, expert_model_parallel_size=layout.ep,
                expert_tensor_parallel_size=layout.etp)


def megatron_vocab_size(config: ModelConfig, layout: ParallelLayout) -> int:
    """The vocabulary size to build the megatron model with, so its shards equal ours."""
    return padded_vocab_size(config.vocab_size, layout.tp)


def sequence_parallel_rows(seq_len: int, batch: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """``[start, stop)`` of the router rows (``order="sb"`` flattening) that TP rank
    ``tp_rank`` routes under megatron's sequence parallelism."""
    start, stop = split_range(seq_len, tp_size, tp_rank)
    return start * batch, stop * batch
