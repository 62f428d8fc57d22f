"""Recorded routing -> per-layer replay targets in a training forward's token order.

A recorded sequence has ``rows = num_tokens - 1`` routing rows ``[rows, num_moe_layers,
topk]`` (the last generated token never went through the inference model). A training
forward sees every token, in a padded batch ``[batch, seq]`` or packed (THD, sequences
concatenated at ``cu_seqlens``). The functions here build ``[num_moe_layers, num_tokens,
topk]`` int64 targets in the order the router flattens its input:

- ``order="sb"``: megatron-core flattens ``[seq, batch]``: token (s, b) is row ``s*batch+b``.
- ``order="bs"``: Hugging Face flattens ``[batch, seq]``: token (b, s) is row ``b*seq+s``.

Rows with no recorded routing get placeholders, each a row of ``topk`` distinct experts, so
dispatch stays valid:
- the missing last row of a sequence copies the row before it: that token's output feeds no
  later position (causal attention) and predicts nothing, so its routing cannot change the
  loss;
- padding rows hold experts ``0..topk-1``: padding is masked out of the loss anyway.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor
ORDERS = ("sb", "bs")


def _as_numpy(routing: ArrayLike) -> np.ndarray:
    if isinstance(routing, torch.Tensor):
        routing = routing.detach().cpu().numpy()
    routing = np.asarray(routing)
    if routing.ndim != 3:
        raise ValueError(f"routing must be [rows, layers, topk], got shape {routing.shape}")
    return routing


def moe_layer_columns(routing: ArrayLike, moe_layer_indices: Sequence[int] | None = None) -> np.ndarray:
    """``[rows, num_moe_layers, topk]`` int64 from either layout.

    Without ``moe_layer_indices`` the array must be MoE-only (ours: column j is MoE layer j);
    MoE layers are never guessed from the content, so an array holding negative ids (an
    all-layer array with dense layers filled with -1) is refused. A 0-filled all-layer array
    (vLLM, SGLang) looks like a MoE-only one with too many layers: the replay hooks refuse it
    by its layer count. With ``moe_layer_indices`` (global decoder-layer index of each MoE
    layer) an all-layer array keeps only those columns; its dense layers must hold one fill
    value, 0 (vLLM/SGLang) or -1 (``expand_to_all_layers`` default), so indices that do not
    match the array are caught.
    """
    r = _as_numpy(routing).astype(np.int64)
    if moe_layer_indices is not None:
        r = _select_moe_columns(r, [int(i) for i in moe_layer_indices])
    elif r.size and r.min() < 0:
        raise ValueError("routing holds negative ids: an all-layer array whose dense layers hold -1? pass "
                         "moe_layer_indices (MoE layers are never guessed from the content)")
    if r.size and r.min() < 0:
        raise ValueError("routing of a MoE layer holds negative expert ids")
    return r


def _select_moe_columns(r: np.ndarray, indices: list[int]) -> np.ndarray:
    if not indices or any(a >= b for a, b in zip(indices, indices[1:])) or indices[0] < 0:
        raise ValueError(f"moe_layer_indices must be non-empty, sorted, unique and >= 0, got {indices}")
    if r.shape[1] == len(indices):
        return r
    if r.shape[1] <= indices[-1]:
        raise ValueError(f"routing has {r.shape[1]} layers; expected {len(indices)} MoE layers "
                         f"or an all-layer layout covering layer {indices[-1]}")
    dense = np.delete(r, indices, axis=1)
    fills = np.unique(dense)
    if fills.size > 1 or (fills.size == 1 and fills[0] not in (0, -1)):
        raise ValueError(f"all-layer routing: dense layers must all hold one fill value, 0 or -1, found "
                         f"{fills[:8].tolist()} (do moe_layer_indices {indices} match the array?)")
    return r[:, indices]


def complete_rows(routing: np.ndarray, num_tokens: int) -> np.ndarray:
    """Exactly ``num_tokens`` rows: extra rows are dropped (a truncated training sequence);
    missing final rows copy the last recorded row (see the module docstring). More than one
    missing row means routing is absent for tokens that matter, an error."""
    rows = routing.shape[0]
    if rows >= num_tokens:
        return routing[:num_tokens]
    if rows < num_tokens - 1 or rows == 0:
        raise ValueError(f"routing has {rows} rows for a {num_tokens}-token sequence "
                         f"(need at least {max(num_tokens - 1, 1)})")
    return np.concatenate([routing, routing[-1:]], axis=0)


def _sequences(routings: Sequence[ArrayLike], num_tokens: Sequence[int] | None,
               moe_layer_indices: Sequence[int] | None) -> list[np.ndarray]:
    if len(routings) == 0:
        raise ValueError("need at least one sequence's routing")
    arrays = [moe_layer_columns(r, moe_layer_indices) for r in routings]
    if num_tokens is None:
        num_tokens = [a.shape[0] + 1 for a in arrays]
    if len(num_tokens) != len(arrays):
        raise ValueError(f"num_tokens has {len(num_tokens)} entries for {len(arrays)} sequences")
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"sequences disagree on [layers, topk]: {sorted(shapes)}")
    return [complete_rows(a, int(n)) for a, n in zip(arrays, num_tokens)]


def _placeholder(num_layers: int, num_rows: int, topk: int) -> np.ndarray:
    return np.broadcast_to(np.arange(topk, dtype=np.int64), (num_rows, num_layers, topk)).copy()


def padded_targets(routings: Sequence[ArrayLike], seq_len: int, *, num_tokens: Sequence[int] | None = None,
                   left_padding: bool = False, order: str = "sb",
                   moe_layer_indices: Sequence[int] | None = None) -> np.ndarray:
    """Targets ``[num_moe_layers, batch * seq_len, topk]`` for a padded batch: sequence b
    holds its ``num_tokens[b]`` tokens (default: recorded rows + 1) at the start of row b
    (or at the end with ``left_padding``)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    seqs = _sequences(routings, num_tokens, moe_layer_indices)
    layers, topk = seqs[0].shape[1:]
    grid = _placeholder(layers, len(seqs) * seq_len, topk).reshape(len(seqs), seq_len, layers, topk)
    for b, seq in enumerate(seqs):
        n = seq.shape[0]
        if n > seq_len:
            raise ValueError(f"sequence {b} has {n} tokens, more than seq_len={seq_len}")
        start = seq_len - n if left_padding else 0
        grid[b, start:start + n] = seq
    if order == "sb":
        grid = grid.transpose(1, 0, 2, 3)
    return np.ascontiguousarray(grid.reshape(-1, layers, topk).transpose(1, 0, 2))


def packed_targets(routings: Sequence[ArrayLike], *, num_tokens: Sequence[int] | None = None,
                   cu_seqlens: Sequence[int] | None = None,
                   moe_layer_indices: Sequence[int] | None = None) -> np.ndarray:
    """Targets ``[num_moe_layers, total, topk]`` for packed sequences (THD): sequence i's
    tokens start at ``cu_seqlens[i]``; a slot longer than the sequence (megatron's
    ``cu_seqlens_padded``) is padding. Default ``cu_seqlens``: the sequences back to back."""
    seqs = _sequences(routings, num_tokens, moe_layer_indices)
    lengths = [s.shape[0] for s in seqs]
    cu = list(np.cumsum([0] + lengths)) if cu_seqlens is None else [int(c) for c in cu_seqlens]
    if len(cu) != len(seqs) + 1 or cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0 and have {len(seqs) + 1} entries, got {cu}")
    for i, n in enumerate(lengths):
        if cu[i + 1] - cu[i] < n:
            raise ValueError(f"cu_seqlens slot {i} holds {cu[i + 1] - cu[i]} tokens; sequence {i} has {n}")
    layers, topk = seqs[0].shape[1:]
    flat = _placeholder(layers, cu[-1], topk)
    for i, seq in enumerate(seqs):
        flat[cu[i]:cu[i] + seq.shape[0]] = seq
    return np.ascontiguousarray(flat.transpose(1, 0, 2))


def sequence_parallel_slice(targets: ArrayLike, rank: int, world_size: int) -> ArrayLike:
    """The slice rank ``rank`` routes under sequence parallelism: megatron splits the
    ``[seq, batch]`` activations along seq, so with ``order="sb"`` each rank holds one
    contiguous block of rows (THD: one contiguous block of the packed tokens)."""
    total = targets.shape[1]
    if not 0 <= rank < world_size or total % world_size:
        raise ValueError(f"cannot split {total} tokens over {world_size} ranks (rank {rank})")
    chunk = total // world_size
    return targets[:, rank * chunk:(rank + 1) * chunk]


def check_targets(targets: ArrayLike, num_experts: int, topk: int | None = None) -> None:
    """Raise ValueError unless every row holds ``topk`` distinct ids in [0, num_experts)."""
    t = _as_numpy(targets)
    if topk is not None and t.shape[2] != topk:
        raise ValueError(f"targets have top-{t.shape[2]} rows, the model routes top-{topk}")
    if t.size and (t.min() < 0 or t.max() >= num_experts):
        raise ValueError(f"target expert ids must be in [0, {num_experts}), got [{t.min()}, {t.max()}]")
    ordered = np.sort(t, axis=-1)
    if (ordered[..., 1:] == ordered[..., :-1]).any():
        raise ValueError("a target row repeats an expert; each row needs topk distinct experts")


def per_layer(targets: ArrayLike, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """One contiguous int64 ``[num_tokens, topk]`` tensor per MoE layer (what a router's
    replay slot takes)."""
    t = torch.as_tensor(np.asarray(targets) if not isinstance(targets, torch.Tensor) else targets)
    return [t[j].to(device=device, dtype=torch.int64).contiguous() for j in range(t.shape[0])]


def layer_count_mismatch(num_target_layers: int, num_moe_layers: int) -> str:
    """The message of a replay hook whose targets do not have one layer per MoE layer."""
    hint = (" (targets built from an all-layer array, e.g. vLLM's or SGLang's? pass moe_layer_indices to "
            "the target builder)" if num_target_layers > num_moe_layers else "")
    return f"{num_target_layers} target layers for {num_moe_layers} MoE layers{hint}"
