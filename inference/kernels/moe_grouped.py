"""Routed-expert computation for MoE layers, free of host syncs so decode graphs capture it.

Weights: ``w13 [E, 2 * I, H]`` (gate rows, then up rows) and ``w2 [E, H, I]``. Expert ``e``
maps ``x`` to ``(silu(x @ gate.T) * (x @ up.T)) @ w2[e].T``; the layer output of token
``t`` is ``sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x_t)``.

Paths, chosen from dtypes, shapes, device and tuned data files only (never from routing
values), by ``choose_moe_backend``:

- fused_triton: ``fused_moe.py``, Triton GEMMs over expert-aligned pair blocks with SwiGLU
  and the routing weights fused (CUDA, bf16 / fp16 / fp32). "auto" picks it where a tuned
  file for this shape and device (``fused_moe_configs.py``) measured it at least as fast
  as ``torch._grouped_mm`` at the nearest token count: a shape nobody tuned (or measured)
  on this device keeps the paths below, which are proven on it. At 1-2 tokens (a tuned
  threshold, or the caller's ``small_batch_max_tokens``) it runs the two-launch small-batch
  kernels of ``fused_moe_small.py``.
- grouped: ``torch._grouped_mm`` over (token, k) pairs sorted by expert (CUDA bf16, sm90).
- gathered: each pair's expert weights are gathered and applied with ``bmm``; it reads
  ``T * K`` weight matrices, so it is chosen when that is no more than all ``E`` of them.
- dense: every expert runs on every token and the routing weight (zero for unrouted
  pairs) selects; ``E / K`` times the useful FLOPs, but memory stays ``O(T * I)``.

gathered and dense ("torch") are the CPU paths and the CUDA fallback for other dtypes.
``moe_experts_fn(backend, small_batch_max_tokens)`` binds a backend ("auto" or one pinned
path: "fused_triton", "grouped_mm", "torch") and the fused path's small-batch threshold for
the engine (``EngineConfig.moe_backend``, ``EngineConfig.fused_moe_small_batch_max_tokens``)
and benchmarks; a pinned path that does not apply raises instead of silently falling back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from inference.kernels.fused_moe import fused_moe_experts, fused_moe_supported
from inference.kernels.fused_moe_configs import check_small_batch_max_tokens, device_name, tuned_entry

# torch._grouped_mm needs 16-byte aligned row strides: 8 bf16 elements.
GROUPED_MM_ALIGNMENT = 8
MOE_BACKENDS = ("auto", "fused_triton", "grouped_mm", "torch")


def moe_experts_grouped(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                        w13: torch.Tensor, w2: torch.Tensor, backend: str = "auto",
                        small_batch_max_tokens: int | None = None) -> torch.Tensor:
    """Weighted sum of each token's top-k experts: ``[T, H] -> [T, H]``, no host sync.
    ``small_batch_max_tokens`` is the fused path's small-batch threshold (None: the tuned
    one; 0: never); the other paths have no small-batch variant and ignore it."""
    path = choose_moe_backend(x, topk_ids, w13, w2, backend)
    if path == "fused_triton":
        return fused_moe_experts(x, topk_ids, topk_weights, w13, w2, small_batch_max_tokens=small_batch_max_tokens)
    if path == "grouped_mm":
        return moe_experts_grouped_mm(x, topk_ids, topk_weights, w13, w2)
    if path == "gathered":
        return moe_experts_gathered(x, topk_ids, topk_weights, w13, w2)
    return moe_experts_dense(x, topk_ids, topk_weights, w13, w2)


def moe_experts_fn(backend: str = "auto", small_batch_max_tokens: int | None = None) -> Callable[..., torch.Tensor]:
    """The experts function of ``backend`` (one of ``MOE_BACKENDS``) with the fused path's
    small-batch threshold bound (``moe_experts_grouped``), for ``set_experts_fn``: it takes
    ``(x, topk_ids, topk_weights, w13, w2)``. Both are fixed here, so a captured CUDA graph
    runs the path its arguments chose."""
    if backend not in MOE_BACKENDS:
        raise ValueError(f"moe backend must be one of {MOE_BACKENDS}, got {backend!r}")
    check_small_batch_max_tokens(small_batch_max_tokens)
    if backend == "auto" and small_batch_max_tokens is None:
        return moe_experts_grouped
    return functools.partial(moe_experts_grouped, backend=backend, small_batch_max_tokens=small_batch_max_tokens)


def choose_moe_backend(x: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                       backend: str = "auto") -> str:
    """The path ``moe_experts_grouped`` runs: "fused_triton", "grouped_mm", "gathered" or
    "dense" (rules in the module docstring). Depends on shapes, dtypes and files only."""
    if backend not in MOE_BACKENDS:
        raise ValueError(f"moe backend must be one of {MOE_BACKENDS}, got {backend!r}")
    fused_ok = x.is_cuda and fused_moe_supported(x, w13, w2)
    grouped_ok = grouped_mm_supported(x, w13, w2)
    if backend == "fused_triton" and not fused_ok:
        raise ValueError(f"moe backend 'fused_triton' does not apply to {x.dtype} on {x.device} (needs CUDA + triton)")
    if backend == "grouped_mm" and not grouped_ok:
        raise ValueError(f"moe backend 'grouped_mm' does not apply to {x.dtype} on {x.device} (needs sm90, bf16)")
    if backend in ("fused_triton", "grouped_mm"):
        return backend
    if backend == "auto" and fused_ok and _tuned_prefers_fused(x, w13, w2):
        return "fused_triton"
    if backend == "auto" and grouped_ok:
        return "grouped_mm"
    return "gathered" if topk_ids.numel() <= w13.shape[0] else "dense"


def _tuned_prefers_fused(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """A tuned file for this shape and device measured the fused kernel (and not grouped_mm
    faster) at the nearest token count."""
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    entry = tuned_entry(x.shape[0], w13.shape[0], w2.shape[1], w2.shape[2], x.dtype, device_name(index))
    return entry is not None and entry.fused_ms is not None and not entry.prefers_grouped_mm


def grouped_mm_supported(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether the fused, sync-free ``torch._grouped_mm`` path applies to these tensors.

    Only sm90 runs it without a device-to-host copy of the offsets; other architectures
    fall back to a per-group loop that reads them on the host.
    """
    if not (x.is_cuda and hasattr(torch, "_grouped_mm")):
        return False
    if not (x.dtype == w13.dtype == w2.dtype == torch.bfloat16):
        return False
    hidden, intermediate = w2.shape[1], w2.shape[2]
    if hidden % GROUPED_MM_ALIGNMENT or intermediate % GROUPED_MM_ALIGNMENT:
        return False
    return torch.cuda.get_device_capability(x.device)[0] == 9


def _swiglu(h13: torch.Tensor) -> torch.Tensor:
    gate, up = h13.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_experts_grouped_mm(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                           w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Sort (token, k) pairs by expert, run both projections as grouped GEMMs, unsort.

    Per-expert counts come from ``scatter_add_`` (``bincount`` would sync); the weighted
    combine unpermutes and sums over k in fp32 instead of atomically adding into the output,
    which keeps results deterministic.
    """
    num_tokens, topk = topk_ids.shape
    num_experts = w13.shape[0]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)

    x_sorted = x.index_select(0, order // topk)
    h = torch._grouped_mm(x_sorted, w13.transpose(-2, -1), offs=offsets)
    y_sorted = torch._grouped_mm(_swiglu(h), w2.transpose(-2, -1), offs=offsets)

    y = torch.empty(y_sorted.shape, dtype=y_sorted.dtype, device=y_sorted.device)
    y.index_copy_(0, order, y_sorted)
    y = y.view(num_tokens, topk, x.shape[1]).float() * topk_weights.float().unsqueeze(-1)
    return y.sum(dim=1).to(x.dtype)


def moe_experts_gathered(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                         w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Gather each pair's expert weights and ``bmm``: the cheapest path for a few tokens."""
    num_tokens, topk = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    x_pairs = x.repeat_interleave(topk, dim=0).unsqueeze(-1)             # [P, H, 1]
    h = torch.bmm(w13.index_select(0, flat_ids), x_pairs).squeeze(-1)    # [P, 2I]
    y = torch.bmm(w2.index_select(0, flat_ids), _swiglu(h).unsqueeze(-1)).squeeze(-1)
    y = y.view(num_tokens, topk, x.shape[1]).float() * topk_weights.float().unsqueeze(-1)
    return y.sum(dim=1).to(x.dtype)


def moe_experts_dense(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                      w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Run every expert on every token; unrouted pairs get weight zero."""
    num_experts = w13.shape[0]
    expert_ids = torch.arange(num_experts, device=x.device)
    # [T, E]: the routing weight of expert e for token t (0 when not in its top-k).
    per_expert = ((topk_ids.unsqueeze(-1) == expert_ids).float() * topk_weights.float().unsqueeze(-1)).sum(1)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(num_experts):
        y = _swiglu(x @ w13[e].t()) @ w2[e].t()
        out += y.float() * per_expert[:, e:e + 1]
    return out.to(x.dtype)


def moe_experts_reference(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                          w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Loop over experts on the routed tokens only, in fp32 (syncs: tests and debugging)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    xf = x.float()
    for e in range(w13.shape[0]):
        token_idx, k_idx = torch.nonzero(topk_ids == e, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        gate, up = w13[e].float().chunk(2, dim=0)
        xe = xf[token_idx]
        y = (F.silu(xe @ gate.t()) * (xe @ up.t())) @ w2[e].float().t()
        out.index_add_(0, token_idx, y * topk_weights[token_idx, k_idx].float().unsqueeze(-1))
    return out.to(x.dtype)
