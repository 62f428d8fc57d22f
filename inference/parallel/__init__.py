"""Tensor / expert / data parallelism on torch.distributed (gloo on CPU, nccl on CUDA).

- ``layout``: ``ParallelLayout`` (world = dp x tp, ep | tp; the rank mapping) and its checks.
- ``groups``: ``ParallelGroups``, the process groups of one rank, passed explicitly.
- ``shards``: ``TensorShard``, the part of a full tensor a rank holds.
- ``layers``: column / row / QKV / vocabulary-parallel layers, the sharded SwiGLU / relu^2 MLPs.
- ``attention``: attention (GQA or MLA) on this rank's heads.
- ``moe``: ``ExpertParallelMoE`` (replicated router, global expert ids, one all-reduce).
- ``loading``: per-rank loading from full tensors or safetensors slices.
- ``plan``: the per-rank memory plan; ``megatron_layout``: megatron-core's matching layout.
"""

from inference.parallel.attention import AttentionShard, attention_shard, sharded_attention
from inference.parallel.groups import GroupHandle, ParallelGroups
from inference.parallel.layers import (ColumnParallelLinear, ParallelLMHead, ParallelRelu2MLP, ParallelSwiGLUMLP,
                                       QKVParallelLinear, RowParallelLinear, ShardedRMSNorm, VocabParallelEmbedding)
from inference.parallel.layout import (HeadPartition, ParallelLayout, ParallelLayoutError, RankCoords,
                                       padded_vocab_size)
from inference.parallel.loading import SafetensorsCheckpoint, ShardLoadError, load_full, load_shards
from inference.parallel.moe import ExpertParallelMoE, localize_topk
from inference.parallel.shards import TensorShard, declare_shards

__all__ = [
    "AttentionShard", "ColumnParallelLinear", "ExpertParallelMoE", "GroupHandle", "HeadPartition",
    "ParallelGroups", "ParallelLMHead", "ParallelLayout", "ParallelLayoutError", "ParallelRelu2MLP",
    "ParallelSwiGLUMLP",
    "QKVParallelLinear", "RankCoords", "RowParallelLinear", "SafetensorsCheckpoint", "ShardLoadError",
    "ShardedRMSNorm", "TensorShard", "VocabParallelEmbedding", "attention_shard", "declare_shards", "load_full",
    "load_shards", "localize_topk", "padded_vocab_size", "sharded_attention",
]
