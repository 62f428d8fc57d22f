"""Fused Triton MoE experts vs the per-expert loop reference (``moe_experts_reference``).

On CPU the kernels run through Triton's interpreter in a subprocess (harness.py): random
odd shapes, E not a multiple of anything, fewer tokens than BLOCK_M, experts with no
tokens, top-k 1..8, several tile configs and all three dtypes. On CUDA: model shapes,
every heuristic tile bucket, no host sync, CUDA-graph replay, run-to-run determinism.
"""

from __future__ import annotations

import pytest
import torch

from inference.kernels import choose_moe_backend, fused_moe_experts, moe_experts_grouped, moe_experts_reference
from inference.kernels.fused_moe_configs import FusedMoEConfig, GemmTiles, default_config, shared_memory_bytes
from tests.inference.kernels.harness import (
    assert_interpreter_checks_pass,
    forbid_host_sync,
    needs_cuda,
    needs_triton,
    run_interpreter_checks,
)
from tests.inference.kernels.moe_cases import TOLERANCE, assert_close_relative, make_moe



def tiles(block_m, n1, k1, n2, k2, group_m=1):
    return FusedMoEConfig(block_m, GemmTiles(n1, k1, group_m), GemmTiles(n2, k2, group_m))


INTERPRETER_CASES = [  # (num_tokens, topk, num_experts, hidden, intermediate, skew, dtype, config)
    (1, 1, 4, 16, 16, False, torch.float32, tiles(16, 16, 16, 16, 16)),
    (5, 8, 8, 24, 40, False, torch.float32, tiles(16, 32, 16, 16, 32)),
    (13, 3, 7, 40, 24, False, torch.float32, tiles(16, 16, 32, 32, 16)),
    (3, 2, 13, 33, 17, False, torch.float32, tiles(16, 16, 16, 16, 16)),
    (40, 4, 5, 64, 48, True, torch.float32, tiles(16, 32, 32, 32, 32, group_m=4)),
    (70, 6, 11, 20, 36, False, torch.float32, tiles(32, 16, 16, 16, 16, group_m=2)),
    (9, 5, 64, 32, 16, False, torch.float32, tiles(16, 16, 16, 16, 16)),
    (33, 7, 16, 48, 32, True, torch.float32, tiles(64, 32, 16, 16, 32, group_m=3)),
    (21, 2, 3, 56, 40, False, torch.float32, None),  # the shape heuristic's tiles
    (12, 4, 9, 40, 24, False, torch.float16, tiles(16, 16, 16, 16, 16)),
    (12, 4, 9, 40, 24, True, torch.bfloat16, tiles(32, 16, 32, 32, 16, group_m=2)),
    (2, 8, 10, 16, 48, False, torch.bfloat16, tiles(16, 32, 16, 16, 16)),
]


def run_case(num_tokens, topk, num_experts, hidden, intermediate, skew, dtype, config, seed=0, device="cpu"):
    args = make_moe(num_tokens, topk, num_experts, hidden, intermediate, seed=seed + num_tokens,
                    dtype=dtype, device=device, skew=skew)
    out = fused_moe_experts(*args, config=config)
    assert out.shape == args[0].shape and out.dtype == dtype
    return out, moe_experts_reference(*args), args


def check_interpreter_cases() -> int:
    checked = 0
    for case in INTERPRETER_CASES:
        out, ref, _ = run_case(*case)
        assert_close_relative(out, ref, TOLERANCE[case[6]])
        checked += 1
    # x as a strided view (the engine passes slices of larger buffers) and a dropped pair.
    x, ids, weights, w13, w2 = make_moe(7, 3, 6, 24, 16, seed=9)
    wide = torch.zeros(7, 40)
    wide[:, 8:32] = x
    weights[:, 1] = 0.0
    out = fused_moe_experts(wide[:, 8:32], ids, weights, w13, w2, config=tiles(16, 16, 16, 16, 16))
    assert_close_relative(out, moe_experts_reference(x, ids[:, [0, 2]], weights[:, [0, 2]], w13, w2), 1e-5)
    return checked + 1


@needs_triton
def test_fused_kernels_match_reference_in_interpreter():
    assert_interpreter_checks_pass(__file__, len(INTERPRETER_CASES) + 1)


def test_bad_inputs_are_rejected_with_a_clear_error():
    x, ids, weights, w13, w2 = make_moe(4, 2, 8, 16, 8, seed=0)
    with pytest.raises(ValueError, match="tokens but topk_ids"):
        fused_moe_experts(x[:3], ids, weights, w13, w2)
    with pytest.raises(ValueError, match="topk_weights"):
        fused_moe_experts(x, ids, weights[:, :1], w13, w2)
    with pytest.raises(ValueError, match="does not apply"):
        fused_moe_experts(x, ids, weights, w13.to(torch.float64), w2)


GPU_CASES = [  # (num_tokens, topk, num_experts, hidden, intermediate, skew)
    (1, 8, 64, 2048, 1024, False),
    (64, 8, 128, 2048, 768, False),
    (256, 8, 64, 2048, 1024, True),
    (3, 1, 7, 200, 72, False),
    (777, 6, 60, 520, 136, False),
]


# bf16 on every case; fp16 / fp32 on two (each dtype compiles its own kernels).
GPU_DTYPE_CASES = ([(torch.bfloat16, c) for c in GPU_CASES]
                   + [(dt, c) for dt in (torch.float16, torch.float32) for c in (GPU_CASES[1], GPU_CASES[3])])


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype,case", GPU_DTYPE_CASES)
def test_gpu_matches_reference_without_host_sync(dtype, case):
    num_tokens, topk, num_experts, hidden, intermediate, skew = case
    args = make_moe(num_tokens, topk, num_experts, hidden, intermediate, seed=1, dtype=dtype, device="cuda", skew=skew)
    fused_moe_experts(*args)  # compile outside the guard
    with forbid_host_sync():
        out = fused_moe_experts(*args)
    assert_close_relative(out, moe_experts_reference(*args), TOLERANCE[dtype])


@needs_cuda
@needs_triton
@pytest.mark.parametrize("num_tokens", [1, 200, 1000, 8192, 16384])
def test_every_heuristic_bucket_compiles_and_matches(num_tokens):
    """The heuristic's tiles (what GPUs without a tuned file run) in each block_m branch,
    passed explicitly so tuned files on this machine do not replace them."""
    args = make_moe(num_tokens, 8, 128, 2048, 768, seed=2, dtype=torch.bfloat16, device="cuda")
    smem = shared_memory_bytes(torch.cuda.current_device())
    config = default_config(num_tokens, 8, 128, torch.bfloat16, smem)
    out = fused_moe_experts(*args, config=config)
    assert_close_relative(out, moe_experts_reference(*args), TOLERANCE[torch.bfloat16])


@needs_cuda
@needs_triton
def test_results_do_not_depend_on_the_atomic_slot_order():
    args = make_moe(512, 8, 64, 512, 256, seed=3, dtype=torch.bfloat16, device="cuda")
    first = fused_moe_experts(*args)
    for _ in range(5):
        assert torch.equal(fused_moe_experts(*args), first)


@needs_cuda
@needs_triton
@pytest.mark.parametrize("num_tokens", [4, 64])
def test_cuda_graph_replay_follows_new_routing(num_tokens):
    static = make_moe(num_tokens, 8, 64, 256, 128, seed=5, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused_moe_experts(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe_experts(*static)
    fresh = make_moe(num_tokens, 8, 64, 256, 128, seed=6, dtype=torch.bfloat16, device="cuda", skew=True)
    for s, f in zip(static[:3], fresh[:3]):
        s.copy_(f)
    graph.replay()
    assert_close_relative(out, moe_experts_reference(*static), TOLERANCE[torch.bfloat16])


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dispatcher_runs_the_fused_kernel_on_cuda(dtype):
    args = make_moe(32, 4, 16, 128, 64, seed=7, dtype=dtype, device="cuda")
    # No tuned file for this shape: "auto" keeps the proven path; the pinned backend runs the kernel.
    untuned = "grouped_mm" if dtype == torch.bfloat16 else "dense"
    assert choose_moe_backend(args[0], args[1], args[3], args[4]) == untuned
    assert choose_moe_backend(args[0], args[1], args[3], args[4], "fused_triton") == "fused_triton"
    assert_close_relative(moe_experts_grouped(*args, backend="fused_triton"), moe_experts_reference(*args),
                          TOLERANCE[dtype])


if __name__ == "__main__":
    run_interpreter_checks(check_interpreter_cases)
