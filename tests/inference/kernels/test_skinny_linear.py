"""The skinny GEMM (``inference/kernels/skinny_linear.py``) vs ``torch.nn.functional.linear``
in fp32 on the upcast operands (an independent computation).

On CPU the kernel runs through Triton's interpreter in a subprocess (harness.py): fp32 and
fp16 (the interpreter's bf16 ``tl.dot`` is unreliable), 1, 3, 8, 16 and 20 rows (two row
blocks), N and K that are not multiples of the tiles, with and without bias, both
multiply paths whatever the row count, strided inputs and empty shapes. Without the
interpreter: the knobs' and operands' validation, the defaults, and the ``F.linear``
fallback (bitwise nn.Linear). On CUDA: the OLMoE and Qwen3 projection shapes in bf16 at
1-16 rows, no host sync, CUDA-graph capture and replay with new inputs, run-to-run
determinism.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inference.kernels import skinny_linear as sk
from tests.inference.kernels.harness import (
    assert_interpreter_checks_pass,
    forbid_host_sync,
    needs_cuda,
    needs_triton,
    run_interpreter_checks,
)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

INTERPRETER_CASES = [  # (m, n, k, dtype, bias, knobs)
    (1, 40, 48, torch.float32, False, {}),
    (1, 33, 70, torch.float32, True, dict(block_n=8, block_k=32)),       # N, K not multiples of the tiles
    (3, 100, 200, torch.float32, True, dict(block_n=16, block_k=64)),
    (3, 24, 40, torch.float32, False, dict(use_dot=True, block_k=16)),   # tl.dot at 3 rows
    (8, 72, 96, torch.float32, True, {}),
    (8, 50, 130, torch.float32, False, dict(use_dot=False, block_n=4, block_k=32)),   # broadcast at 8 rows
    (16, 48, 64, torch.float32, True, dict(block_n=32, block_k=32)),
    (16, 37, 257, torch.float32, False, dict(block_k=128)),
    (20, 40, 48, torch.float32, True, dict(block_n=16, block_k=16)),     # two row blocks
    (1, 64, 256, torch.float16, True, {}),
    (3, 33, 70, torch.float16, False, dict(block_n=2, block_k=16)),
    (8, 96, 136, torch.float16, True, {}),
    (16, 40, 300, torch.float16, True, dict(block_n=16, block_k=64, num_warps=2, num_stages=2)),
    (4, 9, 16, torch.float16, False, dict(block_n=16)),                  # N smaller than the tile
]


def make_case(m, n, k, dtype, bias, seed, device="cpu"):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, generator=gen, device=device).to(dtype)
    weight = (torch.randn(n, k, generator=gen, device=device) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=gen, device=device).to(dtype) if bias else None
    return x, weight, b


def reference(x, weight, bias):
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def assert_matches(out, ref, dtype, what=""):
    err = (out.float() - ref).abs().max().item() if out.numel() else 0.0
    assert err <= TOLERANCE[dtype] * max(ref.abs().max().item(), 1.0), f"{what}: max abs err {err}"


def check_random_cases() -> int:
    for i, (m, n, k, dtype, bias, knobs) in enumerate(INTERPRETER_CASES):
        x, weight, b = make_case(m, n, k, dtype, bias, seed=i)
        out = sk.skinny_linear_triton(x, weight, b, **knobs)
        assert out.shape == (m, n) and out.dtype == dtype
        assert_matches(out, reference(x, weight, b), dtype, f"case {i}")
    return len(INTERPRETER_CASES)


def check_strided_and_empty() -> int:
    x, weight, b = make_case(3, 24, 40, torch.float32, True, seed=7)
    wide = torch.zeros(3, 64)
    wide[:, 8:48] = x                                    # row stride 64, not K
    assert_matches(sk.skinny_linear_triton(wide[:, 8:48], weight, b), reference(x, weight, b), torch.float32, "rows")
    columns = x.t().contiguous().t()                     # column-major x: unit row stride
    assert_matches(sk.skinny_linear_triton(columns, weight, b), reference(x, weight, b), torch.float32, "cols")
    out = sk.skinny_linear(x, weight, b)               # the dispatcher takes the kernel here
    assert_matches(out, reference(x, weight, b), torch.float32, "dispatch")
    assert sk.skinny_linear_triton(x[:0], weight, b).shape == (0, 24)
    assert sk.skinny_linear_triton(x, weight[:0], b[:0]).shape == (3, 0)
    return 1


def check_interpreter_cases() -> int:
    return check_random_cases() + check_strided_and_empty()


@needs_triton
def test_kernel_matches_f_linear_in_interpreter():
    assert_interpreter_checks_pass(__file__, len(INTERPRETER_CASES) + 1)


@pytest.mark.parametrize("m,bias", [(1, True), (3, False), (16, True), (0, True)])
def test_cpu_fallback_is_bitwise_nn_linear(m, bias):
    layer = torch.nn.Linear(48, 40, bias=bias)
    x = torch.randn(m, 48)
    assert torch.equal(sk.skinny_linear(x, layer.weight, layer.bias), layer(x))


@pytest.mark.parametrize("knobs,match", [
    (dict(block_n=3), "block_n must be a power of two"), (dict(block_n=0), "block_n"),
    (dict(block_n=512), "block_n"), (dict(block_n=True), "block_n"),
    (dict(block_n=8, use_dot=True), "block_n must be >= 16 on the tl.dot path"),
    (dict(block_k=8), "block_k must be a power of two in \\[16"), (dict(block_k=48), "block_k"),
    (dict(block_k=2048), "block_k"), (dict(num_warps=3), "num_warps"), (dict(num_warps=4.0), "num_warps"),
    (dict(num_stages=0), "num_stages"), (dict(num_stages=9), "num_stages"), (dict(use_dot="yes"), "use_dot"),
])
def test_bad_knobs_are_rejected(knobs, match):
    x, weight, _ = make_case(2, 16, 32, torch.float32, False, seed=0)
    with pytest.raises(ValueError, match=match):
        sk.skinny_linear(x, weight, **knobs)


def test_bad_operands_are_rejected():
    x, weight, b = make_case(2, 16, 32, torch.float32, True, seed=0)
    cases = [((x[0], weight, None), "needs x \\[M, K\\]"), ((x, weight[:, :16], None), "K=32 columns"),
             ((x.half(), weight, None), "share one of"), ((x.double(), weight.double(), None), "share one of"),
             ((x, weight.t().contiguous().t(), None), "row-major"), ((x, weight, b[:8]), "bias must be"),
             ((x, weight, b.half()), "bias must be")]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            sk.skinny_linear(*args)
        assert not sk.skinny_linear_applies(args[0], args[1]) or args[2] is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_defaults_are_valid_and_bound_the_broadcast_tile(dtype):
    for m in range(1, 33):
        for n, k in ((2048, 2048), (5120, 2048), (2048, 4096), (6144, 2048), (9, 16), (33, 70)):
            launch = sk.default_launch(m, n, k, dtype)
            sk.check_launch(launch.block_n, launch.block_k, launch.num_warps, launch.num_stages, launch.use_dot)
            assert launch.use_dot == (m > sk.BROADCAST_MAX_ROWS)
            row_bytes = launch.block_k * torch.empty((), dtype=dtype).element_size()
            assert launch.block_k <= max(16, 2 * k) and row_bytes <= (512 if launch.use_dot else 2048)
            if not launch.use_dot:
                assert min(sk._pow2(m), 16) * launch.block_n * launch.block_k <= sk.BROADCAST_TILE_ELEMENTS
    assert sk.resolve_launch(1, 64, 64, dtype, use_dot=True).block_n >= sk.DOT_BLOCK_M  # a forced path's own tiles


MODEL_SHAPES = [(2048, 6144), (2048, 2048), (2048, 5120), (4096, 2048)]   # (K, N): OLMoE qkv / o, Qwen3 qkv / o


@needs_cuda
@needs_triton
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("k,n", MODEL_SHAPES)
def test_gpu_model_shapes_bf16_without_host_sync(k, n, m):
    x, weight, b = make_case(m, n, k, torch.bfloat16, bias=m % 2 == 0, seed=m + n, device="cuda")
    sk.skinny_linear(x, weight, b)        # compile outside the guard
    with forbid_host_sync():
        out = sk.skinny_linear(x, weight, b)
    assert out.dtype == torch.bfloat16
    assert_matches(out, reference(x, weight, b), torch.bfloat16, f"m={m}")
    assert torch.equal(out, sk.skinny_linear(x, weight, b))      # deterministic: no atomics, no split-K
    other = sk.skinny_linear(x, weight, b, use_dot=m <= sk.BROADCAST_MAX_ROWS, block_n=16)   # the other path
    assert_matches(other, reference(x, weight, b), torch.bfloat16, f"m={m} other path")


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_gpu_other_dtypes_and_ragged_shapes(dtype, m):
    x, weight, b = make_case(m, 1000, 2056, dtype, bias=True, seed=m, device="cuda")
    assert_matches(sk.skinny_linear(x, weight, b), reference(x, weight, b), dtype, f"m={m}")


@needs_cuda
@needs_triton
@pytest.mark.parametrize("m", [1, 8])
def test_gpu_cuda_graph_replay_follows_new_inputs(m):
    k, n = MODEL_SHAPES[2]
    x, weight, b = make_case(m, n, k, torch.bfloat16, bias=True, seed=3, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sk.skinny_linear(x, weight, b)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sk.skinny_linear(x, weight, b)
    fresh = make_case(m, n, k, torch.bfloat16, bias=True, seed=4, device="cuda")
    for static, new in zip((x, weight, b), fresh):
        static.copy_(new)
    graph.replay()
    assert_matches(out, reference(x, weight, b), torch.bfloat16, "replay")


if __name__ == "__main__":
    run_interpreter_checks(check_interpreter_cases)
