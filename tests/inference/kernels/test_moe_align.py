"""Expert-aligned pair layout: the torch and Triton versions against the layout's invariants
(checked pair by pair from the routing, independently of either implementation).

The Triton kernels run on CPU through Triton's interpreter in a subprocess (harness.py).
"""

from __future__ import annotations

import pytest
import torch

from inference.kernels.moe_align import (
    moe_align_block_size_reference,
    moe_align_block_size_triton,
    padded_pair_capacity,
)
from tests.inference.kernels.harness import (
    assert_interpreter_checks_pass,
    forbid_host_sync,
    needs_cuda,
    needs_triton,
    run_interpreter_checks,
)


def random_routing(num_tokens, topk, num_experts, seed, skew=False, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    if skew:  # a few popular experts, most experts get nothing
        scores[:, : max(1, topk)] += 2.0
    return scores.topk(topk, dim=-1).indices.to(device)


def assert_valid_layout(topk_ids, num_experts, block_m, sorted_ids, block_expert, num_padded):
    """Every pair exactly once, in a segment of its own expert's blocks, experts ascending,
    each segment the expert's count rounded up to block_m with sentinel padding at its end."""
    flat = topk_ids.reshape(-1).cpu().tolist()
    num_pairs = len(flat)
    sorted_ids, block_expert = sorted_ids.cpu().tolist(), block_expert.cpu().tolist()
    used = int(num_padded.cpu()[0])
    num_blocks, capacity = padded_pair_capacity(num_pairs, num_experts, block_m)
    assert len(sorted_ids) == capacity and len(block_expert) == num_blocks
    assert used % block_m == 0 and used <= capacity
    assert all(p == num_pairs for p in sorted_ids[used:])
    counts = [flat.count(e) for e in range(num_experts)]
    assert used == sum(-(-c // block_m) * block_m for c in counts)
    assert sorted(p for p in sorted_ids[:used] if p != num_pairs) == list(range(num_pairs))
    position = 0
    for expert, count in enumerate(counts):
        blocks = -(-count // block_m)
        segment = sorted_ids[position:position + blocks * block_m]
        assert all(flat[p] == expert for p in segment[:count]), f"expert {expert}: foreign pair in its segment"
        assert all(p == num_pairs for p in segment[count:]), f"expert {expert}: padding not at the end"
        b0 = position // block_m
        assert block_expert[b0:b0 + blocks] == [expert] * blocks
        position += blocks * block_m
    assert all(0 <= e < num_experts for e in block_expert)


CASES = [  # (num_tokens, topk, num_experts, block_m, skew)
    (1, 1, 4, 16, False),
    (1, 8, 64, 16, False),
    (5, 3, 7, 16, False),
    (37, 4, 13, 16, True),
    (64, 8, 64, 32, False),
    (300, 2, 5, 64, False),
    (200, 6, 11, 128, True),
    (0, 2, 8, 16, False),
]


@pytest.mark.parametrize("num_tokens,topk,num_experts,block_m,skew", CASES)
def test_reference_layout_is_valid(num_tokens, topk, num_experts, block_m, skew):
    ids = random_routing(num_tokens, topk, num_experts, seed=num_tokens + block_m, skew=skew)
    assert_valid_layout(ids, num_experts, block_m, *moe_align_block_size_reference(ids, num_experts, block_m))


def test_capacity_bounds_the_worst_case():
    """Each of min(E, P) experts with one pair pads to a full block: the bound is reached."""
    num_experts, block_m = 6, 16
    ids = torch.arange(num_experts).view(num_experts, 1)
    sorted_ids, block_expert, num_padded = moe_align_block_size_reference(ids, num_experts, block_m)
    assert int(num_padded[0]) == padded_pair_capacity(num_experts, num_experts, block_m)[1] == num_experts * block_m
    assert block_expert.tolist() == list(range(num_experts))


def check_interpreter_cases() -> int:
    checked = 0
    for num_tokens, topk, num_experts, block_m, skew in CASES:
        ids = random_routing(num_tokens, topk, num_experts, seed=num_tokens + block_m, skew=skew)
        out = moe_align_block_size_triton(ids, num_experts, block_m)
        assert_valid_layout(ids, num_experts, block_m, *out)
        ref = moe_align_block_size_reference(ids, num_experts, block_m)
        assert torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2])
        checked += 1
    return checked


@needs_triton
def test_triton_layout_is_valid_in_interpreter():
    assert_interpreter_checks_pass(__file__, len(CASES))


@needs_cuda
@needs_triton
@pytest.mark.parametrize("num_tokens,topk,num_experts,block_m,skew",
                         CASES + [(4096, 8, 128, 64, False), (8192, 8, 64, 128, True), (256, 8, 256, 16, False)])
def test_triton_layout_is_valid_on_gpu_without_host_sync(num_tokens, topk, num_experts, block_m, skew):
    ids = random_routing(num_tokens, topk, num_experts, seed=num_tokens, skew=skew, device="cuda")
    moe_align_block_size_triton(ids, num_experts, block_m)  # compile outside the guard
    with forbid_host_sync():
        out = moe_align_block_size_triton(ids, num_experts, block_m)
    assert_valid_layout(ids, num_experts, block_m, *out)


if __name__ == "__main__":
    run_interpreter_checks(check_interpreter_cases)
