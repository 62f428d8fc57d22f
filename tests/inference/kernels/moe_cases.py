"""Random MoE inputs and a relative-error check shared by the routed-expert kernel tests."""

from __future__ import annotations

import torch


# Relative error allowed against the fp32 reference, per dtype of the expert kernels.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def make_moe(num_tokens, topk, num_experts, hidden, intermediate, seed, dtype=torch.float32,
             device="cpu", skew=False):
    """Random routing (distinct experts per token) and weights scaled for O(1) outputs.

    ``skew`` routes every token to the same few experts so most experts get no tokens.
    """
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    if skew:
        scores[:, :topk] += 2.0
    topk_ids = scores.topk(topk, dim=-1).indices
    topk_weights = torch.rand(num_tokens, topk, generator=gen)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * intermediate, hidden, generator=gen) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, intermediate, generator=gen) / intermediate ** 0.5
    return [t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
            for t in (x, topk_ids, topk_weights, w13, w2)]


def assert_close_relative(out, ref, tol):
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= tol * ref.float().abs().max().item() + 1e-4, f"max abs err {err}"
