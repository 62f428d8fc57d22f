"""Routed experts other than plain SwiGLU: GPT-OSS's biased, clamped SwiGLU (transformers'
``GptOssExperts``) and Nemotron-H's non-gated relu^2 (``NemotronHExperts``).

GPT-OSS weights, as for every SwiGLU MoE layer here: ``w13 [E, 2I, H]`` (gate rows, then up
rows; the checkpoint's interleaved columns are split when loaded), ``w2 [E, H, I]``, plus
biases ``b13 [E, 2I]`` and ``b2 [E, H]``. Expert e maps x to ``act(x @ w13[e].T + b13[e]) @
w2[e].T + b2[e]`` with ``act(gate, up) = (clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)``,
``g = min(gate, l)``. Nemotron-H: ``w13 [E, I, H]`` holds the up projection only, no
biases, ``act(h) = relu(h)^2``.

``oai_experts`` / ``relu2_experts`` pick a path from device, dtype and shapes only, never
from routing values, so they are free of host syncs (decode graphs capture them); the
``*_reference`` functions are the plain fp32 loop over experts (CPU path and reference).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from inference.kernels.moe_grouped import grouped_mm_supported

Activation = Callable[[torch.Tensor], torch.Tensor]


def swiglu_oai(h13: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    gate, up = h13.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * gate * torch.sigmoid(gate * alpha)


def relu2(h: torch.Tensor) -> torch.Tensor:
    return torch.relu(h).square()


def _add(h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return h if bias is None else h + bias


def _reference(x, topk_ids, topk_weights, w13, w2, b13, b2, act: Activation) -> torch.Tensor:
    """Loop over experts on the routed tokens only, in fp32 (syncs: CPU and tests). Each
    (token, k) pair's output lands in its own slot and the weighted sum over k follows, so
    no accumulating scatter is needed (CPU ``index_add_`` can be very slow when threads
    are oversubscribed)."""
    per_pair = torch.zeros(*topk_ids.shape, x.shape[1], dtype=torch.float32, device=x.device)
    xf = x.float()
    for e in range(w13.shape[0]):
        token_idx, k_idx = torch.nonzero(topk_ids == e, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        h = _add(xf[token_idx] @ w13[e].float().t(), None if b13 is None else b13[e].float())
        per_pair[token_idx, k_idx] = _add(act(h) @ w2[e].float().t(), None if b2 is None else b2[e].float())
    return (per_pair * topk_weights.float().unsqueeze(-1)).sum(dim=1).to(x.dtype)


def _sync_free(x, topk_ids, topk_weights, w13, w2, b13, b2, act: Activation) -> torch.Tensor:
    if not x.is_cuda:
        return _reference(x, topk_ids, topk_weights, w13, w2, b13, b2, act)
    if grouped_mm_supported(x, w13, w2):
        return _grouped_mm(x, topk_ids, topk_weights, w13, w2, b13, b2, act)
    return _gathered(x, topk_ids, topk_weights, w13, w2, b13, b2, act)


def oai_experts_reference(x, topk_ids, topk_weights, w13, w2, b13, b2, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS experts, fp32 loop over experts."""
    return _reference(x, topk_ids, topk_weights, w13, w2, b13, b2, partial(swiglu_oai, alpha=alpha, limit=limit))


def oai_experts(x, topk_ids, topk_weights, w13, w2, b13, b2, alpha: float, limit: float) -> torch.Tensor:
    """Weighted sum of each token's top-k experts ``[T, H] -> [T, H]``; no host sync on CUDA."""
    return _sync_free(x, topk_ids, topk_weights, w13, w2, b13, b2, partial(swiglu_oai, alpha=alpha, limit=limit))


def relu2_experts_reference(x, topk_ids, topk_weights, w1, w2) -> torch.Tensor:
    """Nemotron-H experts (``w1 [E, I, H]`` up, ``w2 [E, H, I]`` down), fp32 loop over experts."""
    return _reference(x, topk_ids, topk_weights, w1, w2, None, None, relu2)


def relu2_experts(x, topk_ids, topk_weights, w1, w2) -> torch.Tensor:
    """Nemotron-H experts; no host sync on CUDA."""
    return _sync_free(x, topk_ids, topk_weights, w1, w2, None, None, relu2)


def _combine(y: torch.Tensor, topk_weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    num_tokens, topk = topk_weights.shape
    y = y.view(num_tokens, topk, x.shape[1]).float() * topk_weights.float().unsqueeze(-1)
    return y.sum(dim=1).to(x.dtype)


def _gathered(x, topk_ids, topk_weights, w13, w2, b13, b2, act: Activation) -> torch.Tensor:
    """Each (token, k) pair's expert weights gathered and applied with ``bmm``."""
    flat = topk_ids.reshape(-1)
    pairs = x.repeat_interleave(topk_ids.shape[1], dim=0).unsqueeze(-1)             # [P, H, 1]
    h = torch.bmm(w13.index_select(0, flat), pairs).squeeze(-1)
    h = _add(h, None if b13 is None else b13.index_select(0, flat))
    y = torch.bmm(w2.index_select(0, flat), act(h).unsqueeze(-1)).squeeze(-1)
    y = _add(y, None if b2 is None else b2.index_select(0, flat))
    return _combine(y, topk_weights, x)


def _grouped_mm(x, topk_ids, topk_weights, w13, w2, b13, b2, act: Activation) -> torch.Tensor:
    """Pairs sorted by expert through ``torch._grouped_mm`` (counts via ``scatter_add_``)."""
    topk = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    sorted_ids = flat.index_select(0, order)
    counts = torch.zeros(w13.shape[0], dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    h = torch._grouped_mm(x.index_select(0, order // topk), w13.transpose(-2, -1), offs=offsets)
    h = _add(h, None if b13 is None else b13.index_select(0, sorted_ids))
    y_sorted = torch._grouped_mm(act(h), w2.transpose(-2, -1), offs=offsets)
    y_sorted = _add(y_sorted, None if b2 is None else b2.index_select(0, sorted_ids))
    y = torch.empty_like(y_sorted)
    y.index_copy_(0, order, y_sorted)
    return _combine(y, topk_weights, x)
