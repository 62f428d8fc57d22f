"""Tensor-parallel layers: each holds one rank's shard and computes what the unsharded layer
computes, with at most one collective per block.

Every layer keeps the parameter names of its unsharded counterpart (``weight``, ``bias``,
``gate_up_proj``, ``down_proj``) and reports which part of the full tensor each parameter
holds through ``tensor_shards()``, so ``inference.parallel.loading`` can fill it from full
tensors or read only its slices from safetensors. Parameters are allocated uninitialised.

Conventions (megatron-core's, vLLM's):
- column-parallel: output features split, input replicated, no communication;
- row-parallel: input features split, output summed over the TP group by one all-reduce;
- a block (attention, MLP) is column then row: one all-reduce per block.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from inference.parallel.groups import GroupHandle
from inference.parallel.layout import HeadPartition, padded_vocab_size, split_range
from inference.parallel.shards import Range, TensorShard, row_ranges


def _empty(*shape: int, dtype: torch.dtype | None, device: torch.device | str | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """``y = x @ W[rows].T (+ b[rows])`` for this rank's rows of the full ``[sum(output_sizes),
    in_features]`` weight: by default each block of ``output_sizes`` (``[gate, up]``:
    two blocks) split evenly over the TP group, local rows in block order. Output stays
    split. Invariant: ``weight.shape == (sum of rows lengths, in_features)``."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], tp: GroupHandle, bias: bool = False, *,
                 rows: Sequence[Range] | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.full_out_features = in_features, int(sum(output_sizes))
        self.rows = tuple(rows) if rows is not None else row_ranges(output_sizes, tp.size, tp.rank)
        self.out_features = sum(b - a for a, b in self.rows)
        self.weight = _empty(self.out_features, in_features, dtype=dtype, device=device)
        self.bias = _empty(self.out_features, dtype=dtype, device=device) if bias else None

    def tensor_shards(self) -> dict[str, TensorShard]:
        shards = {"weight": TensorShard.along((self.full_out_features, self.in_features), dim0=self.rows)}
        if self.bias is not None:
            shards["bias"] = TensorShard.along((self.full_out_features,), dim0=self.rows)
        return shards

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """``y = sum over TP ranks of x_r @ W[:, cols_r].T (+ b)``: this rank holds input columns
    ``cols`` (default: an even split). With ``reduce`` the sum is one all-reduce; without,
    the caller reduces (the MoE block sums routed and shared parts first) and the bias is
    added on TP rank 0 only, so one reduction counts it once. Invariant:
    ``weight.shape == (out_features, cols length)``; the bias is replicated."""

    def __init__(self, in_features: int, out_features: int, tp: GroupHandle, bias: bool = False, *,
                 reduce: bool = True, cols: Sequence[Range] | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.tp, self.reduce = tp, reduce
        self.full_in_features, self.out_features = in_features, out_features
        self.cols = tuple(cols) if cols is not None else (split_range(in_features, tp.size, tp.rank),)
        self.in_features = sum(b - a for a, b in self.cols)
        self.weight = _empty(out_features, self.in_features, dtype=dtype, device=device)
        self.bias = _empty(out_features, dtype=dtype, device=device) if bias else None

    def tensor_shards(self) -> dict[str, TensorShard]:
        return {"weight": TensorShard.along((self.out_features, self.full_in_features), dim1=self.cols)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.reduce:
            y = self.tp.all_reduce(y)
            return y if self.bias is None else y + self.bias
        if self.bias is not None and self.tp.rank == 0:
            y = y + self.bias
        return y


class QKVParallelLinear(ColumnParallelLinear):
    """The fused ``[q; k; v]`` projection split by heads: this rank computes its query heads
    and their KV heads, output ``[q_local; k_local; v_local]`` (the unsharded layout, so the
    attention code runs unchanged on ``partition.num_heads`` / ``num_kv_heads`` heads).
    Invariant: local output width == (local q heads + 2 * local kv heads) * head_dim."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 partition: HeadPartition, tp: GroupHandle, bias: bool = False, *,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        d, q_size, kv_size = head_dim, num_heads * head_dim, num_kv_heads * head_dim
        p = partition
        rows = ((p.q_start * d, p.q_stop * d), (q_size + p.kv_start * d, q_size + p.kv_stop * d),
                (q_size + kv_size + p.kv_start * d, q_size + kv_size + p.kv_stop * d))
        super().__init__(hidden_size, [q_size, kv_size, kv_size], tp, bias, rows=rows, dtype=dtype, device=device)
        self.partition, self.head_dim = partition, head_dim
        self.q_size, self.kv_size = p.num_heads * d, p.num_kv_heads * d


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a vector split across the TP group (OLMoE's whole-projection q/k norm):
    the sum of squares is all-reduced (one ``[T, 1]`` tensor). ``replicas`` ranks hold each
    element (replicated KV heads), so the reduced sum is divided by it. Invariant: equals
    ``RMSNorm(full_dim)`` of the concatenated vector, restricted to this rank's ``cols``."""

    def __init__(self, full_dim: int, eps: float, tp: GroupHandle, cols: Sequence[Range], replicas: int = 1, *,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.tp, self.full_dim, self.eps, self.replicas = tp, full_dim, eps, replicas
        self.cols = tuple(cols)
        self.weight = _empty(sum(b - a for a, b in self.cols), dtype=dtype, device=device)

    def tensor_shards(self) -> dict[str, TensorShard]:
        return {"weight": TensorShard.along((self.full_dim,), dim0=self.cols)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        square_sum = self.tp.all_reduce(xf.square().sum(-1, keepdim=True))
        inv_rms = torch.rsqrt(square_sum / (self.replicas * self.full_dim) + self.eps)
        return (xf * inv_rms * self.weight.float()).to(x.dtype)


class ParallelSwiGLUMLP(nn.Module):
    """SwiGLU MLP split column- then row-wise: this rank holds ``[gate_r; up_r]`` and the
    matching ``down`` columns; ``reduce`` as in ``RowParallelLinear``. Invariant: the sum
    over the TP group of the unreduced outputs equals ``SwiGLUMLP``."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp: GroupHandle, *, reduce: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.gate_up_proj = ColumnParallelLinear(hidden_size, [intermediate_size, intermediate_size], tp, **kw)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, tp, reduce=reduce, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class ParallelRelu2MLP(nn.Module):
    """Nemotron-H's non-gated ``down(relu(up(x))^2)`` split like ``ParallelSwiGLUMLP``: this
    rank's ``up`` rows and the matching ``down`` columns (relu^2 is elementwise per
    intermediate unit); ``reduce`` as in ``RowParallelLinear``. Invariant: the sum over the
    TP group of the unreduced outputs equals ``Relu2MLP``."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp: GroupHandle, *, reduce: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.up_proj = ColumnParallelLinear(hidden_size, [intermediate_size], tp, **kw)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, tp, reduce=reduce, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(x)).square())


class VocabParallelEmbedding(nn.Module):
    """Embedding rows ``[start, stop)`` of the vocabulary padded to ``padded_vocab_size``;
    ids outside the range contribute zeros and one all-reduce sums the ranks' lookups (exactly
    one rank is non-zero per id, so the sum equals the unsharded lookup bit for bit).
    Invariant: ``weight.shape == (stop - start, embedding_dim)``; padding rows are zero."""

    def __init__(self, vocab_size: int, embedding_dim: int, tp: GroupHandle, *, padding_multiple: int = 1,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.tp, self.vocab_size, self.embedding_dim = tp, vocab_size, embedding_dim
        self.padded_vocab_size = padded_vocab_size(vocab_size, tp.size, padding_multiple)
        self.start, self.stop = split_range(self.padded_vocab_size, tp.size, tp.rank)
        self.weight = _empty(self.stop - self.start, embedding_dim, dtype=dtype, device=device)

    def tensor_shards(self) -> dict[str, TensorShard]:
        return {"weight": TensorShard.along((self.vocab_size, self.embedding_dim), dim0=[(self.start, self.stop)])}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        inside = (ids >= self.start) & (ids < self.stop)
        local = torch.where(inside, ids - self.start, torch.zeros_like(ids))
        out = F.embedding(local, self.weight).masked_fill(~inside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)


class ParallelLMHead(nn.Module):
    """Vocabulary-parallel logits: this rank's rows of the head (the embedding's own weight
    when ``tied_to`` is given), then an all-gather so every TP rank holds the same full
    ``[T, vocab]`` fp32 logits and samples identically. Invariant: shards match
    ``VocabParallelEmbedding``'s (same padded vocabulary, same ranges)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: GroupHandle, *, padding_multiple: int = 1,
                 tied_to: VocabParallelEmbedding | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.tp, self.vocab_size, self.hidden_size = tp, vocab_size, hidden_size
        self.padded_vocab_size = padded_vocab_size(vocab_size, tp.size, padding_multiple)
        self.start, self.stop = split_range(self.padded_vocab_size, tp.size, tp.rank)
        if tied_to is not None:
            if (tied_to.start, tied_to.stop, tied_to.vocab_size) != (self.start, self.stop, vocab_size):
                raise ValueError("a tied head must shard the vocabulary like its embedding")
            self.weight = tied_to.weight
        else:
            self.weight = _empty(self.stop - self.start, hidden_size, dtype=dtype, device=device)

    def tensor_shards(self) -> dict[str, TensorShard]:
        return {"weight": TensorShard.along((self.vocab_size, self.hidden_size), dim0=[(self.start, self.stop)])}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = F.linear(hidden, self.weight).float()
        return self.tp.all_gather(local, dim=-1)[..., :self.vocab_size]
