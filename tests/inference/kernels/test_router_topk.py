"""Fused router kernel (scores + top-k + combine weights) vs the torch routing ``route``.

On CPU the kernel runs through Triton's interpreter in a subprocess (harness.py): E up to
512 with top-10, E=64 top-8, sigmoid with expert bias, a router projection bias, k == E,
T=1 and odd T, strided logits; exact ties (lowest id first, checked against a stable
sort) and NaN rows (still k distinct ids in range). On CUDA: the same at model shapes,
no host sync, CUDA-graph replay, and the router module's fused path against its torch path.
"""

from __future__ import annotations

import pytest
import torch

from inference.config import RouterConfig
from inference.kernels.router_topk import router_topk, router_topk_supported
from inference.model.router import TopKRouter, route
from tests.inference.kernels.harness import (
    assert_interpreter_checks_pass,
    forbid_host_sync,
    needs_cuda,
    needs_triton,
    run_interpreter_checks,
)

SOFTMAX = RouterConfig()
SIGMOID_BIAS = RouterConfig(score_function="sigmoid", use_expert_bias=True, scaling_factor=2.5)

INTERPRETER_CASES = [  # (T, E, k, config, expert bias, logit bias)
    (5, 512, 10, SOFTMAX, False, False),
    (1, 64, 8, RouterConfig(norm_topk_prob=False), False, False),
    (7, 256, 8, SIGMOID_BIAS, True, False),
    (3, 128, 8, RouterConfig(score_function="sigmoid", norm_topk_prob=False), False, False),
    (9, 60, 6, RouterConfig(bias=True), False, True),
    (1, 8, 8, SOFTMAX, False, False),
    (33, 16, 2, RouterConfig(score_function="sigmoid", use_expert_bias=True, scaling_factor=16.0), True, False),
]


def make_case(t, e, k, config, expert_bias, logit_bias, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed * 1000 + t * 7 + e)
    logits = (torch.randn(t, e, generator=g) * 3).to(device)
    eb = (torch.randn(e, generator=g) * 0.5).to(device) if expert_bias else None
    lb = torch.randn(e, generator=g).to(device) if logit_bias else None
    return logits, eb, lb


def check_against_route(t, e, k, config, expert_bias, logit_bias, seed=0, device="cpu", strided=False):
    logits, eb, lb = make_case(t, e, k, config, expert_bias, logit_bias, seed, device)
    if strided:     # a column slice of a wider buffer: row stride != E
        wide = torch.zeros(t, e + 5, device=device)
        wide[:, 3:3 + e] = logits
        logits_in = wide[:, 3:3 + e]
    else:
        logits_in = logits
    # The recorder's staging rows: [T, layers, k] in the routing dtype; this is layer 1.
    staging = torch.full((t, 3, k), 7, dtype=torch.uint8 if e <= 256 else torch.int16, device=device)
    ids, weights = router_topk(logits_in, k, config, eb, lb, routing_out=staging[:, 1])
    ref_ids, ref_weights = route(logits if lb is None else logits + lb, k, config, eb)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32 and ids.shape == (t, k)
    assert torch.equal(ids, ref_ids), (ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=2e-6, atol=1e-7)
    assert torch.equal(staging[:, 1].long(), ref_ids), "routing_out must hold the chosen ids"
    assert (staging[:, 0] == 7).all() and (staging[:, 2] == 7).all(), "other layers' columns untouched"


def check_ties_and_nans() -> int:
    # All equal: the first k ids in order. Partial ties: the stable order (lowest id first).
    ids, w = router_topk(torch.zeros(2, 12), 5, SOFTMAX)
    assert ids.tolist() == [[0, 1, 2, 3, 4]] * 2
    torch.testing.assert_close(w, torch.full((2, 5), 0.2))
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 3.0, 0.0, 2.0], [5.0, 5.0, 1.0, 5.0, 1.0, 1.0, 1.0, 0.0]])
    ids, _ = router_topk(logits, 5, RouterConfig(score_function="sigmoid"))
    stable = torch.sort(torch.sigmoid(logits), dim=-1, descending=True, stable=True).indices[:, :5]
    assert torch.equal(ids, stable), (ids, stable)
    assert ids[0].tolist() == [1, 3, 5, 2, 4]
    # NaN in a row: still k distinct experts in range.
    bad = torch.randn(3, 32)
    bad[0, 4] = float("nan")
    bad[1] = float("nan")
    ids, _ = router_topk(bad, 8, SOFTMAX)
    for row in ids.tolist():
        assert len(set(row)) == 8 and all(0 <= i < 32 for i in row)
    return 3


def check_interpreter_cases() -> int:
    checked = 0
    for case in INTERPRETER_CASES:
        check_against_route(*case)
        checked += 1
    check_against_route(6, 40, 4, SIGMOID_BIAS, True, False, strided=True)
    return checked + 1 + check_ties_and_nans()


@needs_triton
def test_router_kernel_matches_route_in_interpreter():
    assert_interpreter_checks_pass(__file__, len(INTERPRETER_CASES) + 4)


@needs_triton
def test_supported_configurations():
    assert router_topk_supported(512, 10, SOFTMAX) and router_topk_supported(8, 8, SIGMOID_BIAS)
    assert not router_topk_supported(256, 8, RouterConfig(score_function="sigmoid", num_groups=8, topk_groups=4))
    assert not router_topk_supported(4, 8, SOFTMAX)           # k > E
    assert not router_topk_supported(4096, 8, SOFTMAX)


@needs_triton
def test_bad_inputs_are_rejected_with_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")     # validation runs before any launch
    with pytest.raises(ValueError, match="fp32 logits"):
        router_topk(torch.zeros(2, 8, dtype=torch.bfloat16), 2, SOFTMAX)
    with pytest.raises(ValueError, match="does not apply"):
        router_topk(torch.zeros(2, 8), 9, SOFTMAX)
    with pytest.raises(ValueError, match="expert_bias"):
        router_topk(torch.zeros(2, 8), 2, SOFTMAX, expert_bias=torch.zeros(7))


GPU_CASES = [  # (T, E, k, config, expert bias, logit bias)
    (1, 128, 8, SOFTMAX, False, False),
    (64, 128, 8, SOFTMAX, False, False),
    (256, 64, 8, RouterConfig(norm_topk_prob=False), False, False),
    (256, 512, 10, SOFTMAX, False, False),
    (17, 256, 8, SIGMOID_BIAS, True, False),
    (8192, 128, 8, SOFTMAX, False, False),
    (33, 32, 4, RouterConfig(bias=True), False, True),
]


@needs_cuda
@needs_triton
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"T{c[0]}-E{c[1]}-k{c[2]}" for c in GPU_CASES])
def test_gpu_matches_route_without_host_sync(case):
    logits, eb, lb = make_case(*case, seed=1, device="cuda")
    t, e, k, config = case[:4]
    router_topk(logits, k, config, eb, lb)     # compile outside the guard
    staging = torch.zeros(t, 2, k, dtype=torch.uint8 if e <= 256 else torch.int16, device="cuda")
    with forbid_host_sync():
        ids, weights = router_topk(logits, k, config, eb, lb, routing_out=staging[:, 1])
    ref_ids, ref_weights = route(logits if lb is None else logits + lb, k, config, eb)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(staging[:, 1].long(), ref_ids) and (staging[:, 0] == 0).all()
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)


@needs_cuda
@needs_triton
def test_gpu_graph_replay_follows_new_logits():
    logits = torch.randn(64, 128, device="cuda")
    router_topk(logits, 8, SOFTMAX)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids, weights = router_topk(logits, 8, SOFTMAX)
    for seed in range(3):
        logits.copy_(torch.randn(64, 128, generator=torch.Generator().manual_seed(seed)).cuda())
        graph.replay()
        ref_ids, ref_weights = route(logits, 8, SOFTMAX)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(weights, ref_weights)


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_router_module_fused_path_matches_its_torch_path(dtype):
    """The module's fused path (kernel, and for bf16 the bf16-operand fp32-output logits
    GEMM) against its plain path: equal ids away from near-ties, close weights."""
    torch.manual_seed(0)
    router = TopKRouter(256, 64, 8, SOFTMAX).to("cuda", dtype)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(128, 256, device="cuda", dtype=dtype)
    ref_ids, ref_weights = router(x)
    router.fused, router.half_logits = True, dtype == torch.bfloat16
    ids, weights = router(x)
    assert torch.equal(router(x, reference=True)[0], ref_ids)          # reference keeps the torch path
    logits = router.logits(x, reference=True)
    top = logits.topk(9, dim=-1).values
    clear = (top[:, :-1] - top[:, 1:]).min(-1).values > 1e-3             # rows without near-ties
    assert clear.sum() > 64
    assert torch.equal(ids[clear], ref_ids[clear])
    torch.testing.assert_close(weights[clear], ref_weights[clear], rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    run_interpreter_checks(check_interpreter_cases)
