"""Small-batch fused MoE path (``fused_moe_small.py``) vs the per-expert loop reference.

On CPU the kernels run through Triton's interpreter in a subprocess (harness.py): 1-3
tokens, top-k 1..8, sizes that are not multiples of the tiles, tokens sharing experts,
no tokens, the per-pair rounding the aligned path also does, and the dispatch between the
two paths by the token threshold (tuned, default or the caller's, the engine's included).
On CUDA: the OLMoE and Qwen3 expert shapes at 1 and 2 tokens, no host sync, CUDA-graph
capture and replay of the path the threshold chose.
"""

from __future__ import annotations

import json

import pytest
import torch

from inference.kernels import fused_moe as fm
from inference.kernels import fused_moe_small as fms
from inference.kernels.fused_moe_configs import (
    DEFAULT_SMALL_BATCH_MAX_TOKENS,
    FusedMoEConfig,
    GemmTiles,
    GemvTiles,
    SmallMoEConfig,
    default_small_config,
    load_small_batch,
    parse_small_batch,
    select_plan,
    small_batch_data,
    small_batch_max_tokens,
)
from inference.config import EngineConfig
from inference.kernels import moe_grouped
from inference.kernels.moe_grouped import moe_experts_fn, moe_experts_grouped, moe_experts_reference
from tests.inference.kernels.harness import (
    assert_interpreter_checks_pass,
    forbid_host_sync,
    needs_cuda,
    needs_triton,
    run_interpreter_checks,
)
from tests.inference.kernels.moe_cases import TOLERANCE, assert_close_relative, make_moe



def small(n1, k1, n2, k2):
    return SmallMoEConfig(GemvTiles(n1, k1), GemvTiles(n2, k2))


INTERPRETER_CASES = [  # (num_tokens, topk, num_experts, hidden, intermediate, skew, dtype, config)
    (1, 1, 4, 16, 16, False, torch.float32, small(16, 16, 16, 16)),
    (1, 8, 16, 40, 24, False, torch.float32, small(16, 16, 8, 16)),      # H, I not multiples of block_k
    (2, 3, 7, 33, 17, False, torch.float32, small(8, 32, 4, 16)),        # odd everything, topk not a power of 2
    (3, 6, 9, 64, 48, True, torch.float32, small(32, 64, 16, 32)),       # every token on the same experts
    (2, 2, 3, 24, 40, True, torch.float32, small(2, 16, 4, 64)),         # block_k wider than I
    (3, 5, 64, 32, 20, False, torch.float32, None),                      # heuristic tiles
    (1, 8, 10, 48, 32, False, torch.bfloat16, small(16, 16, 8, 32)),
    (2, 4, 6, 40, 24, True, torch.bfloat16, small(8, 16, 8, 16)),
    (3, 2, 5, 24, 40, False, torch.float16, small(16, 32, 4, 16)),
]


def run_case(num_tokens, topk, num_experts, hidden, intermediate, skew, dtype, config, seed=0, device="cpu"):
    args = make_moe(num_tokens, topk, num_experts, hidden, intermediate, seed=seed + 31 * num_tokens + topk,
                    dtype=dtype, device=device, skew=skew)
    if config is None:
        config = default_small_config(topk, hidden, intermediate, dtype)
    out = fm.fused_moe_experts(*args, config=config)
    assert out.shape == args[0].shape and out.dtype == dtype
    return out, moe_experts_reference(*args), args


def check_random_cases() -> int:
    for case in INTERPRETER_CASES:
        out, ref, args = run_case(*case)
        assert_close_relative(out, ref, TOLERANCE[case[6]])
        if case[6] != torch.float32:   # same roundings as the aligned path: bf16 / fp16 agree closely
            aligned = fm.fused_moe_experts(*args, config=FusedMoEConfig(16, GemmTiles(16, 16), GemmTiles(16, 16)))
            assert_close_relative(out, aligned, TOLERANCE[case[6]] / 2)
    return len(INTERPRETER_CASES)


def check_shared_experts_and_strided_x() -> int:
    # Tokens 0 and 2 pick the same experts in another order; token 1 overlaps them in one.
    x, _, weights, w13, w2 = make_moe(3, 3, 8, 24, 16, seed=4)
    ids = torch.tensor([[2, 5, 1], [5, 7, 0], [1, 2, 5]])
    wide = torch.zeros(3, 40)
    wide[:, 8:32] = x
    out = fm.fused_moe_experts(wide[:, 8:32], ids, weights, w13, w2, config=small(8, 16, 8, 16))
    assert_close_relative(out, moe_experts_reference(x, ids, weights, w13, w2), 1e-5)
    return 1


def check_no_tokens() -> int:
    x, ids, weights, w13, w2 = make_moe(0, 2, 4, 16, 16, seed=0)
    for config in (None, small(16, 16, 16, 16)):
        out = fm.fused_moe_experts(x, ids, weights, w13, w2, config=config)
        assert out.shape == (0, 16)
    assert fms.small_moe_experts(x, ids, weights, w13, w2, small(16, 16, 16, 16)).shape == (0, 16)
    return 1


# A product 1 + 2^-(m+1) is a tie between 1 and the next value: it rounds to even (1.0).
HALF_ULP_AT_ONE = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def check_pair_rows_round_like_the_aligned_path(dtype=torch.float16, device="cpu") -> int:
    """Three pairs whose fp32 products are each 1 + half an ulp (rounds to 1.0): with
    per-pair rounding the token's sum is exactly 3.0, as the aligned path's stored pair rows
    give; summing unrounded gives 3 + 3/2 ulp(1), which rounds up. fp16 on the interpreter:
    it truncates fp32 -> bf16 instead of rounding to nearest (the GPU test covers bf16)."""
    hidden, inter, topk = 8, 16, 3
    ids = torch.tensor([[0, 1, 2]], device=device)
    weights = torch.ones(1, topk, device=device)
    h = torch.zeros(topk, inter, dtype=dtype, device=device)
    h[:, 0], h[:, 1] = 1.0, HALF_ULP_AT_ONE[dtype]
    w2 = torch.zeros(3, hidden, inter, dtype=dtype, device=device)
    w2[:, :, :2] = 1.0
    out = fms.small_down(h, ids, weights, w2, small(16, 16, 8, 16))
    assert torch.equal(out, torch.full((1, hidden), 3.0, dtype=dtype, device=device)), out
    assert (3 + 3 * HALF_ULP_AT_ONE[dtype]) != 3.0 and torch.tensor(3 + 3 * HALF_ULP_AT_ONE[dtype]).to(dtype) != 3.0
    layout = fm.align_pairs(ids, 3, 16)
    h_sorted = torch.cat([h, torch.zeros(1, inter, dtype=dtype, device=device)])[layout.sorted_ids.long()]
    aligned = fm.down_weighted(h_sorted, w2, weights, layout, GemmTiles(16, 16)).view(1, topk, hidden).sum(1)
    assert torch.equal(out, aligned), (out, aligned)
    return 1


class PathSpy:
    """Records which fused path each call runs ("small" or "aligned") while installed."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._real = fm.small_moe_experts, fm.align_pairs

    def __enter__(self) -> "PathSpy":
        real_small, real_align = self._real
        fm.small_moe_experts = lambda *a, **kw: (self.calls.append("small"), real_small(*a, **kw))[1]
        fm.align_pairs = lambda *a, **kw: (self.calls.append("aligned"), real_align(*a, **kw))[1]
        return self

    def __exit__(self, *exc) -> None:
        fm.small_moe_experts, fm.align_pairs = self._real


THRESHOLD_CASES = ((None, 1, "small"), (None, DEFAULT_SMALL_BATCH_MAX_TOKENS, "small"),
                   (None, DEFAULT_SMALL_BATCH_MAX_TOKENS + 1, "aligned"), (0, 1, "aligned"), (4, 4, "small"),
                   (4, 5, "aligned"))   # (small_batch_max_tokens, num_tokens, path)


def check_dispatch_by_threshold() -> int:
    """``config=None`` runs the small path up to the threshold and the aligned path above it."""
    with PathSpy() as spy:
        for max_tokens, num_tokens, expected in THRESHOLD_CASES:
            spy.calls.clear()
            args = make_moe(num_tokens, 2, 5, 16, 16, seed=num_tokens)
            out = fm.fused_moe_experts(*args, small_batch_max_tokens=max_tokens)
            assert spy.calls == [expected], (max_tokens, num_tokens, spy.calls)
            assert_close_relative(out, moe_experts_reference(*args), 1e-5)
    return len(THRESHOLD_CASES)


def check_engine_experts_fn_honours_the_threshold() -> int:
    """The function the engine installs (``routed_experts_fn``) passes
    ``EngineConfig.fused_moe_small_batch_max_tokens`` down to the fused kernels. The CPU
    dispatcher never picks the fused path, so its choice is replaced by "fused_triton"
    (recording the backend it was asked for); everything below it is the real code."""
    from inference.engine import routed_experts_fn
    real_choose, asked = moe_grouped.choose_moe_backend, []
    moe_grouped.choose_moe_backend = lambda *a: (asked.append(a[-1]), "fused_triton")[1]
    try:
        with PathSpy() as spy:
            for max_tokens, num_tokens, expected in THRESHOLD_CASES:
                spy.calls.clear()
                config = EngineConfig(moe_backend="fused_triton", fused_moe_small_batch_max_tokens=max_tokens)
                args = make_moe(num_tokens, 2, 5, 16, 16, seed=num_tokens + 50)
                out = routed_experts_fn(config)(*args)
                assert spy.calls == [expected], (max_tokens, num_tokens, spy.calls)
                assert_close_relative(out, moe_experts_reference(*args), 1e-5)
    finally:
        moe_grouped.choose_moe_backend = real_choose
    assert asked == ["fused_triton"] * len(THRESHOLD_CASES), asked
    return len(THRESHOLD_CASES)


def check_interpreter_cases() -> int:
    return (check_random_cases() + check_shared_experts_and_strided_x() + check_no_tokens()
            + check_pair_rows_round_like_the_aligned_path() + check_dispatch_by_threshold()
            + check_engine_experts_fn_honours_the_threshold())


@needs_triton
def test_small_path_matches_reference_in_interpreter():
    assert_interpreter_checks_pass(__file__, len(INTERPRETER_CASES) + 3 + 2 * len(THRESHOLD_CASES))


def test_plan_follows_the_threshold_and_the_callers_override():
    cpu = torch.device("cpu")
    plan = lambda t, m=None: select_plan(t, 8, 64, 2048, 1024, torch.bfloat16, cpu, max_tokens=m)  # noqa: E731
    assert isinstance(plan(1), SmallMoEConfig) and isinstance(plan(DEFAULT_SMALL_BATCH_MAX_TOKENS), SmallMoEConfig)
    assert isinstance(plan(DEFAULT_SMALL_BATCH_MAX_TOKENS + 1), FusedMoEConfig)
    assert isinstance(plan(1, 0), FusedMoEConfig)
    assert isinstance(plan(8, 8), SmallMoEConfig) and isinstance(plan(9, 8), FusedMoEConfig)
    # The threshold picks the path, never the tiles.
    assert plan(2, 8) == plan(2) and plan(3, 0) == plan(3)


@pytest.mark.parametrize("bad", [-1, "2", 1.5, True])
def test_bad_thresholds_are_rejected(bad):
    with pytest.raises(ValueError, match="small_batch_max_tokens must be None .* or an int >= 0"):
        select_plan(1, 8, 64, 2048, 1024, torch.bfloat16, torch.device("cpu"), max_tokens=bad)
    with pytest.raises(ValueError, match="small_batch_max_tokens must be"):
        moe_experts_fn("auto", small_batch_max_tokens=bad)


def test_experts_fn_keeps_the_experts_contract_with_a_threshold():
    assert moe_experts_fn("auto") is moe_experts_grouped    # unchanged when nothing is overridden
    x, ids, weights, w13, w2 = make_moe(3, 2, 8, 16, 8, seed=0)
    ref = moe_experts_reference(x, ids, weights, w13, w2)
    for backend, max_tokens in (("auto", 0), ("auto", 4), ("torch", 0)):
        assert_close_relative(moe_experts_fn(backend, small_batch_max_tokens=max_tokens)(x, ids, weights, w13, w2),
                              ref, 1e-5)


SMALL_ENTRY = {"gate_up": {"block_n": 16, "block_k": 256, "num_warps": 4, "num_stages": 2},
               "down": {"block_n": 8, "block_k": 128, "num_warps": 8, "num_stages": 3}, "small_ms": 0.02}
ALIGNED_ENTRY = {"block_m": 16, "gate_up": {"block_n": 64, "block_k": 128}, "down": {"block_n": 64, "block_k": 128}}


def test_tuned_small_batch_field_is_read_and_optional(tmp_path):
    name = "E=64,H=2048,I=1024,dtype=bfloat16,device=Fake_GPU.json"
    (tmp_path / name).write_text(json.dumps({"configs": {"1": ALIGNED_ENTRY}, "small_batch": {
        "max_tokens": 4, "configs": {"1": SMALL_ENTRY, "4": {**SMALL_ENTRY, "down": {"block_n": 32, "block_k": 64}}}}}))
    load_small_batch.cache_clear()
    data = small_batch_data(64, 2048, 1024, torch.bfloat16, "Fake_GPU", tmp_path)
    assert data.max_tokens == 4 and small_batch_max_tokens(data) == 4
    assert small_batch_max_tokens(data, 0) == 0 and small_batch_max_tokens(data, 7) == 7   # the caller's wins
    assert data.config_for(1).down == GemvTiles(8, 128, 8, 3)
    assert data.config_for(3).down == GemvTiles(32, 64)          # nearest token count
    assert small_batch_data(128, 2048, 768, torch.bfloat16, "Fake_GPU", tmp_path) is None
    assert small_batch_max_tokens(None) == DEFAULT_SMALL_BATCH_MAX_TOKENS
    assert parse_small_batch(json.dumps({"configs": {"1": ALIGNED_ENTRY}})) is None
    assert parse_small_batch(json.dumps({"small_batch": {"max_tokens": 0}})).max_tokens == 0


@pytest.mark.parametrize("bad", [{"max_tokens": -1}, {"max_tokens": "2"}, {"configs": {}},
                                 {"max_tokens": 2, "configs": {"x": SMALL_ENTRY}},
                                 {"max_tokens": 2, "configs": {"1": {**SMALL_ENTRY, "down": {"block_n": 3,
                                                                                            "block_k": 64}}}},
                                 {"max_tokens": 2, "configs": {"1": {"gate_up": SMALL_ENTRY["gate_up"]}}}])
def test_bad_small_batch_fields_are_rejected(bad):
    with pytest.raises(ValueError):
        parse_small_batch(json.dumps({"configs": {"1": ALIGNED_ENTRY}, "small_batch": bad}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_heuristic_small_tiles_are_valid_and_never_wider_than_needed(dtype):
    for topk, hidden, inter in ((8, 2048, 768), (8, 2048, 1024), (6, 2048, 1408), (1, 16, 16), (2, 33, 17)):
        cfg = default_small_config(topk, hidden, inter, dtype)
        assert cfg.gate_up.block_k <= max(16, 2 * hidden) and cfg.down.block_k <= max(16, 2 * inter)
        assert cfg.gate_up.block_k * torch.empty((), dtype=dtype).element_size() <= 512


MODEL_SHAPES = [(8, 64, 2048, 1024), (8, 128, 2048, 768)]   # topk, E, H, I: OLMoE-1B-7B, Qwen3-30B-A3B


@needs_cuda
@needs_triton
@pytest.mark.parametrize("num_tokens", [1, 2])
@pytest.mark.parametrize("shape", MODEL_SHAPES)
def test_gpu_model_shapes_match_reference_without_host_sync(shape, num_tokens):
    topk, num_experts, hidden, inter = shape
    args = make_moe(num_tokens, topk, num_experts, hidden, inter, seed=11, dtype=torch.bfloat16, device="cuda")
    plan = select_plan(num_tokens, topk, num_experts, hidden, inter, torch.bfloat16, args[0].device)
    config = plan if isinstance(plan, SmallMoEConfig) else default_small_config(topk, hidden, inter, torch.bfloat16)
    fm.fused_moe_experts(*args, config=config)  # compile outside the guard
    with forbid_host_sync():
        out = fm.fused_moe_experts(*args, config=config)
    ref = moe_experts_reference(*args)
    assert_close_relative(out, ref, TOLERANCE[torch.bfloat16])
    aligned = fm.fused_moe_experts(*args, config=select_plan(64, topk, num_experts, hidden, inter, torch.bfloat16,
                                                             args[0].device))
    assert_close_relative(out, aligned, TOLERANCE[torch.bfloat16] / 2)


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_pair_rows_round_like_the_aligned_path(dtype):
    check_pair_rows_round_like_the_aligned_path(dtype, "cuda")


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_other_dtypes(dtype):
    args = make_moe(2, 6, 60, 520, 136, seed=12, dtype=dtype, device="cuda", skew=True)
    out = fm.fused_moe_experts(*args, config=default_small_config(6, 520, 136, dtype))
    assert_close_relative(out, moe_experts_reference(*args), TOLERANCE[dtype])


@needs_cuda
@needs_triton
@pytest.mark.parametrize("max_tokens,path", [(2, "small"), (0, "aligned")])
@pytest.mark.parametrize("num_tokens", [1, 2])
def test_gpu_cuda_graph_replay_follows_new_routing(num_tokens, max_tokens, path):
    """The graph keeps the path its threshold argument chose (whatever the tuned file says)."""
    topk, num_experts, hidden, inter = MODEL_SHAPES[1]
    static = make_moe(num_tokens, topk, num_experts, hidden, inter, seed=13, dtype=torch.bfloat16, device="cuda")
    with PathSpy() as spy:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fm.fused_moe_experts(*static, small_batch_max_tokens=max_tokens)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fm.fused_moe_experts(*static, small_batch_max_tokens=max_tokens)
    assert spy.calls == [path, path]
    # New inputs, every token on the same experts (pairs of different tokens share them).
    fresh = make_moe(num_tokens, topk, num_experts, hidden, inter, seed=14, dtype=torch.bfloat16, device="cuda",
                     skew=True)
    for s, f in zip(static[:3], fresh[:3]):
        s.copy_(f)
    graph.replay()
    assert_close_relative(out, moe_experts_reference(*static), TOLERANCE[torch.bfloat16])


if __name__ == "__main__":
    run_interpreter_checks(check_interpreter_cases)
