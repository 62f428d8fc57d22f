"""Fused router: scores, top-k selection and combine weights in one Triton kernel.

``router_topk`` computes, from fp32 logits [T, E], what ``inference.model.router.route``
computes for the configurations it accepts (``router_topk_supported``): softmax or sigmoid
scores, the optional expert-score bias (selection = score + bias, combine weights from the
unbiased scores), ``norm_topk_prob`` and ``scaling_factor``, plus the router projection's
own bias (GPT-OSS) added to the logits first. One program per token row holds the row's
E (<= ``MAX_EXPERTS``) scores in registers and picks the k (<= ``MAX_TOPK``) best by k
masked arg-max passes, so the ids come out in descending selection order.

Ties: among equal selection values the lowest expert id is taken first. ``torch.topk``
(the torch path) leaves the order of ties unspecified; making it match would need a stable
sort, which costs more than the top-k itself, so the two paths may order exact ties
differently (never otherwise). Scores come from the kernel's own exp / sigmoid and
reductions, so they can differ from torch's in the last bits: near-ties (selection values
within an ulp) may resolve differently from the torch path, exact routing elsewhere.

Group-limited selection (DeepSeek-V3's ``num_groups`` / ``topk_groups``) is not fused:
``router_topk_supported`` says no and the router keeps the torch path.

No host sync; the grid and every allocation depend on shapes only, so the call is safe to
capture in a CUDA graph. Whatever the logits hold (even NaN), the ids are k distinct
experts in range.
"""

from __future__ import annotations

import os

import torch

from inference.config import RouterConfig

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the router keeps the torch path there
    triton = None
    tl = None

MAX_EXPERTS = 1024
MAX_TOPK = 16


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def router_topk_supported(num_experts: int, topk: int, config: RouterConfig) -> bool:
    """Whether ``router_topk`` computes this router's routing (on any device it can run on)."""
    return (triton is not None and config.num_groups == 1 and 1 <= topk <= min(MAX_TOPK, num_experts)
            and num_experts <= MAX_EXPERTS)


def router_topk(logits: torch.Tensor, topk: int, config: RouterConfig, expert_bias: torch.Tensor | None = None,
                logit_bias: torch.Tensor | None = None,
                routing_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_ids int64 [T, k], combine weights fp32 [T, k]) from fp32 ``logits`` [T, E]
    (``logit_bias`` [E], the projection's bias, is added to them first in fp32; ``expert_bias``
    [E] shifts the selection only; either may be any floating dtype, it is read as fp32).
    ``routing_out`` (an integer [T, k] view with unit column stride, e.g. one layer's
    columns of the routing recorder's staging rows) receives the same ids from the same
    kernel, so capturing routing costs no launch of its own.
    Runs on CUDA tensors, or anywhere under TRITON_INTERPRET=1."""
    t, e = _check(logits, topk, config, expert_bias, logit_bias)
    if routing_out is not None and (routing_out.shape != (t, topk) or routing_out.stride(1) != 1
                                    or routing_out.is_floating_point() or routing_out.device != logits.device):
        raise ValueError(f"router_topk: routing_out must be an integer [{t}, {topk}] view with unit column "
                         f"stride on {logits.device}, got {routing_out.dtype} {tuple(routing_out.shape)} "
                         f"strides {routing_out.stride()}")
    ids = torch.empty(t, topk, dtype=torch.int64, device=logits.device)
    weights = torch.empty(t, topk, dtype=torch.float32, device=logits.device)
    if t == 0:
        return ids, weights
    block_e = triton.next_power_of_2(e)
    _router_topk_kernel[(t,)](
        logits, logit_bias if logit_bias is not None else logits, expert_bias if expert_bias is not None else logits,
        ids, weights, routing_out if routing_out is not None else ids,
        routing_out.stride(0) if routing_out is not None else 0, logits.stride(0), e, float(config.scaling_factor),
        1e-20 if config.score_function == "sigmoid" else 0.0,
        TOPK=topk, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(topk),
        SIGMOID=config.score_function == "sigmoid", HAS_LOGIT_BIAS=logit_bias is not None,
        HAS_EXPERT_BIAS=expert_bias is not None, NORMALIZE=config.norm_topk_prob, HAS_ROUTING_OUT=routing_out is not None,
        num_warps=4 if block_e <= 256 else 8)
    return ids, weights


def half_logits_gemm_available(device: torch.device | str) -> bool:
    """Whether this torch computes ``torch.mm(a, b, out_dtype=torch.float32)`` from bf16
    operands on ``device`` (a CUDA-only overload of recent torch releases). Call it outside
    any graph capture: it launches a tiny GEMM."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
    try:
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _check(logits, topk, config, expert_bias, logit_bias) -> tuple[int, int]:
    if triton is None:
        raise RuntimeError("router_topk needs Triton")
    if not (logits.is_cuda or _interpreting()):
        raise ValueError("router_topk runs on CUDA tensors (or under TRITON_INTERPRET=1)")
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"router_topk takes fp32 logits [T, E] with unit column stride, got "
                         f"{logits.dtype} {tuple(logits.shape)} strides {logits.stride()}")
    t, e = logits.shape
    if not router_topk_supported(e, topk, config):
        raise ValueError(f"router_topk does not apply: E={e}, topk={topk}, num_groups={config.num_groups} "
                         f"(needs E <= {MAX_EXPERTS}, 1 <= topk <= min({MAX_TOPK}, E), no group-limited routing)")
    for name, bias in (("expert_bias", expert_bias), ("logit_bias", logit_bias)):
        if bias is not None and (bias.shape != (e,) or not bias.is_floating_point() or not bias.is_contiguous()
                                 or bias.device != logits.device):
            raise ValueError(f"router_topk: {name} must be a contiguous floating [{e}] tensor on {logits.device}, "
                             f"got {bias.dtype} {tuple(bias.shape)} on {bias.device}")
    return t, e


if triton is not None:

    @triton.jit
    def _router_topk_kernel(logits_ptr, logit_bias_ptr, expert_bias_ptr, ids_ptr, weights_ptr,
                            routing_ptr, stride_rt, stride_t, num_experts, scaling_factor, norm_eps,
                            TOPK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                            SIGMOID: tl.constexpr, HAS_LOGIT_BIAS: tl.constexpr, HAS_EXPERT_BIAS: tl.constexpr,
                            NORMALIZE: tl.constexpr, HAS_ROUTING_OUT: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_E)
        valid = offs < num_experts
        x = tl.load(logits_ptr + row * stride_t + offs, mask=valid, other=0.0)
        if HAS_LOGIT_BIAS:
            x += tl.load(logit_bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        if SIGMOID:
            scores = tl.sigmoid(x)
        else:
            x = tl.where(valid, x, float("-inf"))
            z = tl.exp(x - tl.max(x, 0))
            scores = z / tl.sum(z, 0)
        scores = tl.where(valid, scores, 0.0)
        sel = scores
        if HAS_EXPERT_BIAS:
            sel += tl.load(expert_bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        koffs = tl.arange(0, BLOCK_K)
        ids = tl.zeros([BLOCK_K], dtype=tl.int64)
        w = tl.zeros([BLOCK_K], dtype=tl.float32)
        avail = valid
        for j in tl.static_range(TOPK):
            cand = tl.where(avail, sel, float("-inf"))
            best = tl.max(cand, 0)
            idx = tl.min(tl.where(avail & (cand == best), offs, BLOCK_E), 0)
            # No exact match (NaN in the row): the lowest expert still available.
            idx = tl.where(idx < BLOCK_E, idx, tl.min(tl.where(avail, offs, BLOCK_E), 0))
            wj = tl.sum(tl.where(offs == idx, scores, 0.0), 0)
            ids = tl.where(koffs == j, idx.to(tl.int64), ids)
            w = tl.where(koffs == j, wj, w)
            avail = avail & (offs != idx)
        if NORMALIZE:
            w = w / (tl.sum(w, 0) + norm_eps)
        w = w * scaling_factor
        kmask = koffs < TOPK
        tl.store(ids_ptr + row * TOPK + koffs, ids, mask=kmask)
        tl.store(weights_ptr + row * TOPK + koffs, w, mask=kmask)
        if HAS_ROUTING_OUT:
            tl.store(routing_ptr + row * stride_rt + koffs, ids.to(routing_ptr.dtype.element_ty), mask=kmask)
