"""GPT-OSS experts (biases, clamped SwiGLU) and Nemotron-H's relu^2 experts: the reference
loops against a per-token computation of the formula, and the sync-free GPU paths against
the reference."""

from __future__ import annotations

import pytest
import torch

from inference.model.experts import oai_experts, oai_experts_reference, relu2_experts, relu2_experts_reference
from tests.inference.kernels.harness import forbid_host_sync, needs_cuda

ALPHA, LIMIT = 1.702, 1.5


def make_case(tokens, experts, topk, hidden, width, seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, topk, generator=gen), -1)
    w13 = torch.randn(experts, 2 * width, hidden, generator=gen) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, width, generator=gen) / width ** 0.5
    b13, b2 = torch.randn(experts, 2 * width, generator=gen), torch.randn(experts, hidden, generator=gen)
    out = [x, ids, weights, w13, w2, b13, b2]
    return [t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in out]


def per_token(x, ids, weights, w13, w2, b13, b2):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate, up = (w13[e] @ x[t] + b13[e]).chunk(2)
            gate, up = gate.clamp(max=LIMIT), up.clamp(-LIMIT, LIMIT)
            out[t] += weights[t, k] * (w2[e] @ ((up + 1) * gate * torch.sigmoid(ALPHA * gate)) + b2[e])
    return out


def test_reference_is_the_formula():
    case = make_case(7, 6, 3, 16, 8, seed=0)
    torch.testing.assert_close(oai_experts_reference(*case, ALPHA, LIMIT), per_token(*case), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(oai_experts(*case, ALPHA, LIMIT), per_token(*case), atol=1e-5, rtol=1e-5)


@needs_cuda
@pytest.mark.parametrize("dtype,tokens", [(torch.float32, 5), (torch.bfloat16, 5), (torch.bfloat16, 300)])
def test_gpu_paths_match_reference(dtype, tokens):
    """GPT-OSS-20B-like widths: 32 experts, top-4 (bf16 on sm90 takes torch._grouped_mm)."""
    case = make_case(tokens, 32, 4, 256, 128, seed=1, dtype=dtype, device="cuda")
    ref = oai_experts_reference(*case, ALPHA, LIMIT).float()
    oai_experts(*case, ALPHA, LIMIT)
    with forbid_host_sync():
        out = oai_experts(*case, ALPHA, LIMIT)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


def relu2_case(tokens, experts, topk, hidden, width, seed, dtype=torch.float32, device="cpu"):
    x, ids, weights, w13, w2, _, _ = make_case(tokens, experts, topk, hidden, width, seed, dtype, device)
    return [x, ids, weights, w13[:, :width].contiguous(), w2]


def relu2_per_token(x, ids, weights, w1, w2):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            out[t] += weights[t, k] * (w2[e] @ torch.clamp(w1[e] @ x[t], min=0) ** 2)
    return out


def test_relu2_reference_is_the_formula():
    case = relu2_case(7, 6, 3, 16, 8, seed=2)
    torch.testing.assert_close(relu2_experts_reference(*case), relu2_per_token(*case), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(relu2_experts(*case), relu2_per_token(*case), atol=1e-5, rtol=1e-5)


@needs_cuda
@pytest.mark.parametrize("dtype,tokens", [(torch.float32, 5), (torch.bfloat16, 5), (torch.bfloat16, 300)])
def test_relu2_gpu_paths_match_reference(dtype, tokens):
    """Nemotron-3-Nano-like routing (128 experts, top-6) at small widths."""
    case = relu2_case(tokens, 128, 6, 256, 128, seed=3, dtype=dtype, device="cuda")
    ref = relu2_experts_reference(*case).float()
    relu2_experts(*case)
    with forbid_host_sync():
        out = relu2_experts(*case)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
