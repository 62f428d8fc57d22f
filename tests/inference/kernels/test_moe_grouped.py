"""Routed experts: every sync-free path vs the per-expert loop reference, and the reference
vs a naive per-(token, k) evaluation of the MoE formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inference.kernels import (
    grouped_mm_supported,
    moe_experts_dense,
    moe_experts_gathered,
    moe_experts_grouped,
    moe_experts_grouped_mm,
    moe_experts_reference,
)
from tests.inference.kernels.harness import forbid_host_sync, needs_cuda
from tests.inference.kernels.moe_cases import assert_close_relative, make_moe


def naive_moe(x, topk_ids, topk_weights, w13, w2):
    """The MoE formula token by token, pair by pair."""
    out = torch.zeros(x.shape)
    intermediate = w2.shape[2]
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            gate, up = w13[e, :intermediate].float(), w13[e, intermediate:].float()
            h = F.silu(gate @ x[t].float()) * (up @ x[t].float())
            out[t] += float(topk_weights[t, k]) * (w2[e].float() @ h)
    return out


SHAPES = [  # (num_tokens, topk, num_experts, hidden, intermediate, skew)
    (1, 2, 8, 16, 8, False),
    (3, 1, 4, 8, 12, False),
    (7, 4, 16, 32, 16, True),
    (40, 8, 64, 24, 16, False),
    (65, 2, 8, 16, 8, True),
]


@pytest.mark.parametrize("num_tokens,topk,num_experts,hidden,intermediate,skew", SHAPES[:3])
def test_reference_matches_naive_formula(num_tokens, topk, num_experts, hidden, intermediate, skew):
    args = make_moe(num_tokens, topk, num_experts, hidden, intermediate, seed=1, skew=skew)
    torch.testing.assert_close(moe_experts_reference(*args), naive_moe(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", [moe_experts_grouped, moe_experts_gathered, moe_experts_dense])
@pytest.mark.parametrize("num_tokens,topk,num_experts,hidden,intermediate,skew", SHAPES)
def test_sync_free_paths_match_reference(path, num_tokens, topk, num_experts, hidden, intermediate, skew):
    args = make_moe(num_tokens, topk, num_experts, hidden, intermediate, seed=num_tokens, skew=skew)
    out = path(*args)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    torch.testing.assert_close(out, moe_experts_reference(*args), atol=1e-5, rtol=1e-5)


def test_zero_weight_pairs_do_not_contribute():
    x, ids, weights, w13, w2 = make_moe(6, 2, 8, 16, 8, seed=5)
    dropped = weights.clone()
    dropped[:, 1] = 0.0
    single = moe_experts_grouped(x, ids[:, :1], weights[:, :1], w13, w2)
    torch.testing.assert_close(moe_experts_grouped(x, ids, dropped, w13, w2), single, atol=1e-6, rtol=1e-6)


def test_empty_batch_gives_empty_output():
    x, ids, weights, w13, w2 = make_moe(0, 2, 8, 16, 8, seed=0)
    assert moe_experts_grouped(x, ids, weights, w13, w2).shape == (0, 16)


def test_grouped_mm_path_on_cpu_when_torch_provides_it():
    """Exercises the sort / offsets / unpermute logic through torch's CPU _grouped_mm."""
    args = make_moe(33, 4, 16, 32, 16, seed=3, dtype=torch.bfloat16, skew=True)
    try:
        out = moe_experts_grouped_mm(*args)
    except (AttributeError, NotImplementedError, RuntimeError) as exc:
        pytest.skip(f"torch._grouped_mm unavailable on CPU in this torch: {exc}")
    ref = moe_experts_reference(*args).float()
    assert (out.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_grouped_mm_is_not_chosen_on_cpu_or_for_unaligned_shapes():
    x, _, _, w13, w2 = make_moe(4, 2, 8, 16, 8, seed=0, dtype=torch.bfloat16)
    assert not grouped_mm_supported(x, w13, w2)


GPU_SHAPES = [(1, 8, 64, 256, 128), (64, 8, 64, 512, 256), (300, 2, 8, 128, 64), (1024, 8, 128, 256, 96)]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("num_tokens,topk,num_experts,hidden,intermediate", GPU_SHAPES)
def test_gpu_paths_match_reference_without_host_sync(dtype, num_tokens, topk, num_experts, hidden, intermediate):
    args = make_moe(num_tokens, topk, num_experts, hidden, intermediate, seed=2, dtype=dtype, device="cuda",
                    skew=num_tokens == 300)
    ref = moe_experts_reference(*args)
    moe_experts_grouped(*args)  # warm-up (cuBLAS / CUTLASS workspace setup)
    with forbid_host_sync():
        out = moe_experts_grouped(*args)
    assert_close_relative(out, ref, 2e-2 if dtype == torch.bfloat16 else 5e-3)


@needs_cuda
def test_grouped_mm_is_used_for_bf16_on_hopper():
    args = make_moe(256, 8, 64, 256, 128, seed=4, dtype=torch.bfloat16, device="cuda")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("torch._grouped_mm runs sync-free only on sm90")
    assert grouped_mm_supported(args[0], args[3], args[4])
    moe_experts_grouped_mm(*args)
    with forbid_host_sync():
        out = moe_experts_grouped_mm(*args)
    assert_close_relative(out, moe_experts_reference(*args), 2e-2)


@needs_cuda
@pytest.mark.parametrize("dtype,num_tokens", [(torch.bfloat16, 64), (torch.float16, 64), (torch.float16, 4)])
def test_cuda_graph_replay_follows_new_routing(dtype, num_tokens):
    static = make_moe(num_tokens, 8, 64, 256, 128, seed=5, dtype=dtype, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        moe_experts_grouped(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_experts_grouped(*static)
    fresh = make_moe(num_tokens, 8, 64, 256, 128, seed=6, dtype=dtype, device="cuda", skew=True)
    for s, f in zip(static[:3], fresh[:3]):  # new tokens and routing, same experts
        s.copy_(f)
    graph.replay()
    assert_close_relative(out, moe_experts_reference(*static), 2e-2 if dtype == torch.bfloat16 else 5e-3)
