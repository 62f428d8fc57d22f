"""Slot-indexed decode-step kernels of the recurrent layers vs their torch references.

The Triton kernels also run on CPU, through Triton's interpreter in a subprocess (harness.py).
"""

from __future__ import annotations

import pytest
import torch

from inference.kernels.recurrent_decode import gated_delta_rule_step_triton, ssd_step_triton
from inference.model.recurrent.delta_rule import gated_delta_rule_step
from inference.model.recurrent.ssd import discretize_dt, ssd_step
from tests.inference.kernels.harness import (
    assert_interpreter_checks_pass,
    forbid_host_sync,
    needs_cuda,
    needs_triton,
    run_interpreter_checks,
)

NUM_SLOTS = 7


def delta_case(rows, hk, hv, dk, dv, seed, dtype=torch.float32, state_dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    qkv = r(rows, 2 * hk * dk + hv * dv)       # a strided view like the layer's split of its conv output
    q = qkv[:, : hk * dk].reshape(rows, hk, dk)
    k = qkv[:, hk * dk: 2 * hk * dk].reshape(rows, hk, dk)
    v = qkv[:, 2 * hk * dk:].reshape(rows, hv, dv)
    g = -torch.rand(rows, hv, generator=gen)
    beta = torch.rand(rows, hv, generator=gen)
    states = r(NUM_SLOTS + 1, hv, dk, dv)
    slots = torch.randperm(NUM_SLOTS + 1, generator=gen)[:rows]
    init = torch.rand(rows, generator=gen) > 0.3
    to = dict(device=device)
    return ([t.to(dtype).to(**to) for t in (q, k, v)] + [g.to(**to), beta.to(dtype).to(**to)],
            states.to(state_dtype).to(**to), slots.to(**to), init.to(**to))


def ssd_case(rows, heads, head_dim, groups, state_size, seed, dtype=torch.float32,
             state_dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x = r(rows, heads, head_dim)
    dt = discretize_dt(r(rows, heads), torch.zeros(heads))
    a = -torch.rand(heads, generator=gen) * 4
    b, c = r(rows, groups, state_size), r(rows, groups, state_size)
    d = r(heads)
    states = r(NUM_SLOTS + 1, heads, head_dim, state_size)
    slots = torch.randperm(NUM_SLOTS + 1, generator=gen)[:rows]
    init = torch.rand(rows, generator=gen) > 0.3
    to = dict(device=device)
    return ([x.to(dtype).to(**to), dt.to(**to), a.to(**to), b.to(dtype).to(**to), c.to(dtype).to(**to),
             d.to(**to)], states.to(state_dtype).to(**to), slots.to(**to), init.to(**to))


def compare_delta(case, tol):
    tensors, states, slots, init = case
    ref_states = states.clone()
    ref = gated_delta_rule_step(*tensors, ref_states, slots, init)
    out = gated_delta_rule_step_triton(*tensors, states, slots, init)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(states.float(), ref_states.float(), atol=tol, rtol=tol)


def compare_ssd(case, tol):
    tensors, states, slots, init = case
    ref_states = states.clone()
    ref = ssd_step(*tensors, ref_states, slots, init)
    out = ssd_step_triton(*tensors, states, slots, init)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(states.float(), ref_states.float(), atol=tol, rtol=tol)


DELTA_SHAPES = [(1, 1, 1, 8, 8), (3, 2, 4, 16, 8), (5, 2, 2, 12, 20), (4, 1, 3, 32, 48)]
SSD_SHAPES = [(1, 2, 4, 1, 8), (3, 4, 8, 2, 16), (5, 6, 20, 3, 12)]


def check_interpreter_cases() -> int:
    checked = 0
    for i, shape in enumerate(DELTA_SHAPES):
        compare_delta(delta_case(*shape, seed=i), 1e-4)
        checked += 1
    for i, shape in enumerate(SSD_SHAPES):
        compare_ssd(ssd_case(*shape, seed=i), 1e-4)
        checked += 1
    return checked


@needs_triton
def test_triton_step_kernels_match_references_in_interpreter():
    assert_interpreter_checks_pass(__file__, len(DELTA_SHAPES) + len(SSD_SHAPES))


GPU_DTYPES = [(torch.float32, torch.float32, 1e-4), (torch.bfloat16, torch.float32, 2e-2),
              (torch.bfloat16, torch.bfloat16, 3e-2)]


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype,state_dtype,tol", GPU_DTYPES)
def test_triton_step_kernels_match_references_on_gpu_real_shapes(dtype, state_dtype, tol):
    """Qwen3.5 / Qwen3-Next heads (16 k, 32 v, 128 x 128) and Nemotron-3-Nano's Mamba2
    (64 heads x 64, 8 groups, state 128), with no host sync in the kernel calls."""
    compare_delta(delta_case(6, 16, 32, 128, 128, seed=1, dtype=dtype, state_dtype=state_dtype, device="cuda"), tol)
    compare_ssd(ssd_case(6, 64, 64, 8, 128, seed=2, dtype=dtype, state_dtype=state_dtype, device="cuda"), tol)
    tensors, states, slots, init = delta_case(4, 16, 32, 128, 128, seed=3, device="cuda")
    gated_delta_rule_step_triton(*tensors, states, slots, init)
    with forbid_host_sync():
        gated_delta_rule_step_triton(*tensors, states, slots, init)


@needs_cuda
@needs_triton
def test_cuda_graph_replay_follows_new_inputs_and_slots():
    tensors, states, slots, init = delta_case(4, 2, 4, 64, 64, seed=4, device="cuda")
    init.fill_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gated_delta_rule_step_triton(*tensors, states.clone(), slots, init)   # compile outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gated_delta_rule_step_triton(*tensors, states, slots, init)
    fresh, fresh_states, fresh_slots, _ = delta_case(4, 2, 4, 64, 64, seed=5, device="cuda")
    for static, new in zip(tensors + [states, slots], fresh + [fresh_states, fresh_slots]):
        static.copy_(new)
    ref_states = states.clone()
    ref = gated_delta_rule_step(*tensors, ref_states, slots, init)
    graph.replay()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(states, ref_states, atol=1e-4, rtol=1e-4)


if __name__ == "__main__":
    run_interpreter_checks(check_interpreter_cases)
