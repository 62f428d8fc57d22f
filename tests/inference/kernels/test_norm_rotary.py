"""Fused q/k norm + rotary and residual add + RMSNorm kernels vs the torch modules.

On CPU the kernels run through Triton's interpreter in a subprocess (harness.py): per-head
and whole-projection norms, no norm, full and partial rotary, no rotary, GQA, T=1 and odd
T, a strided qkv, and ``GQAttention``'s fused projection against its torch projection.
The interpreter rounds fp32 -> bf16 by truncation (the GPU rounds to nearest even), so
bf16 cases there allow one bf16 ulp; fp32 cases are tight. On CUDA: model shapes in bf16
within one ulp, no host sync, CUDA-graph replay.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inference.config import ModelConfig
from inference.kernels.norm_rotary import add_rms_norm, qk_norm_rotary
from inference.model.attention import GQAttention
from inference.model.rotary import RotaryEmbedding, apply_rotary
from tests.inference.kernels.harness import (
    assert_interpreter_checks_pass,
    forbid_host_sync,
    needs_cuda,
    needs_triton,
    run_interpreter_checks,
)

QK_CASES = [  # (T, heads, kv heads, head_dim, rope_dim or None, norm, dtype)
    (1, 4, 2, 16, 16, "per_head", torch.float32),
    (5, 4, 2, 16, 8, "per_head", torch.float32),       # partial rotary
    (3, 4, 4, 8, 8, "full", torch.float32),            # OLMoE-style whole-projection norm
    (2, 8, 1, 32, 32, "none", torch.float32),
    (7, 2, 2, 16, None, "per_head", torch.float32),    # no rotary
    (3, 6, 3, 24, 12, "full", torch.float32),          # head_dim and heads not powers of two
    (5, 4, 2, 16, 8, "per_head", torch.bfloat16),
]
ADD_NORM_CASES = [(1, 64, torch.float32), (7, 40, torch.float32), (3, 96, torch.bfloat16)]


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)


def torch_qk(qkv, heads, kv_heads, d, rope, norm, qw, kw, eps):
    """The torch path: GQAttention.project's ops on the split projection."""
    t = qkv.shape[0]
    q, k, _ = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    if norm == "full":
        q, k = F.rms_norm(q, (heads * d,), qw, eps), F.rms_norm(k, (kv_heads * d,), kw, eps)
    q, k = q.reshape(t, heads, d), k.reshape(t, kv_heads, d)
    if norm == "per_head":
        q, k = F.rms_norm(q, (d,), qw, eps), F.rms_norm(k, (d,), kw, eps)
    if rope is not None:
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    return q, k


def make_qk_case(t, heads, kv_heads, d, rope_dim, norm, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed + 31 * t + d)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=g).to(device, dtype)
    rope = None
    if rope_dim is not None:
        positions = torch.randint(0, 4000, (t,), generator=g).to(device)
        rope = RotaryEmbedding(rope_dim, 4096, 10000.0).to(device).tables(positions)
    sizes = {"per_head": (d, d), "full": (heads * d, kv_heads * d)}.get(norm)
    qw, kw = ((1 + 0.3 * torch.randn(n, generator=g)).to(device, dtype) for n in sizes) if sizes else (None, None)
    return qkv, rope, qw, kw


def check_qk_case(t, heads, kv_heads, d, rope_dim, norm, dtype, seed=0, device="cpu", strided=False):
    qkv, rope, qw, kw = make_qk_case(t, heads, kv_heads, d, rope_dim, norm, dtype, seed, device)
    if strided:
        wide = torch.zeros(t, qkv.shape[1] + 8, dtype=dtype, device=device)
        wide[:, 8:] = qkv
        qkv = wide[:, 8:]
    cos, sin = rope if rope is not None else (None, None)
    q, k = qk_norm_rotary(qkv, heads, kv_heads, d, cos, sin, norm, qw, kw, 1e-6)
    ref_q, ref_k = torch_qk(qkv, heads, kv_heads, d, rope, norm, qw, kw, 1e-6)
    assert q.shape == ref_q.shape and k.shape == ref_k.shape and q.dtype == dtype and q.is_contiguous()
    torch.testing.assert_close(q, ref_q, **tol(dtype))
    torch.testing.assert_close(k, ref_k, **tol(dtype))


def check_add_norm_case(t, h, dtype, device="cpu"):
    g = torch.Generator().manual_seed(t * h)
    x, r = (torch.randn(t, h, generator=g).to(device, dtype) for _ in range(2))
    w = (1 + 0.3 * torch.randn(h, generator=g)).to(device, dtype)
    total, normed = add_rms_norm(x, r, w, 1e-5)
    ref_total = x + r
    torch.testing.assert_close(total, ref_total, **tol(dtype))
    torch.testing.assert_close(normed, F.rms_norm(ref_total, (h,), w, 1e-5), **tol(dtype))


def check_attention_projection() -> None:
    """GQAttention's fused projection (the wiring: weights, eps, v) against its torch one."""
    config = ModelConfig(name="t", vocab_size=32, hidden_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                         head_dim=16, intermediate_size=32, moe_intermediate_size=16, num_experts=4, topk=2,
                         qk_norm="per_head", rotary_dim=8)
    torch.manual_seed(0)
    attn = GQAttention(config, 0)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    rope = RotaryEmbedding(config.rope_dim, 64, config.rope_theta).tables(torch.tensor([0, 3, 17]))
    x = torch.randn(3, 48)
    with torch.no_grad():
        ref = attn.project(x, rope)
        out = attn._project_fused(x, rope)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def check_interpreter_cases() -> int:
    for case in QK_CASES:
        check_qk_case(*case)
    check_qk_case(3, 4, 2, 16, 8, "per_head", torch.float32, strided=True)
    for case in ADD_NORM_CASES:
        check_add_norm_case(*case)
    check_attention_projection()
    return len(QK_CASES) + 1 + len(ADD_NORM_CASES) + 1


@needs_triton
def test_kernels_match_torch_in_interpreter():
    assert_interpreter_checks_pass(__file__, len(QK_CASES) + len(ADD_NORM_CASES) + 2)


@needs_triton
def test_bad_inputs_are_rejected_with_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")     # validation runs before any launch
    qkv = torch.zeros(2, 64)
    with pytest.raises(ValueError, match="qkv must be"):
        qk_norm_rotary(qkv, 2, 2, 16, None, None)
    with pytest.raises(ValueError, match="norm needs"):
        qk_norm_rotary(qkv, 2, 1, 16, None, None, "per_head", torch.ones(8), torch.ones(16))
    with pytest.raises(ValueError, match="rotary tables"):
        qk_norm_rotary(qkv, 2, 1, 16, torch.zeros(2, 9), torch.zeros(2, 9))
    with pytest.raises(ValueError, match="x and residual"):
        add_rms_norm(torch.zeros(2, 8), torch.zeros(2, 8, dtype=torch.float64), torch.ones(8), 1e-6)


GPU_QK_CASES = [  # Qwen3-30B-A3B (32/4/128, per-head), OLMoE (16/16/128, full), GLM-like partial rotary
    (64, 32, 4, 128, 128, "per_head"), (1, 32, 4, 128, 128, "per_head"), (256, 16, 16, 128, 128, "full"),
    (33, 12, 2, 128, 64, "per_head"), (8192, 32, 4, 128, 128, "per_head"), (5, 64, 8, 64, 64, "none"),
]


def no_worse_than_torch(a, ref, truth):
    """bf16 ``a`` is as close to the fp32 ``truth`` (the same ops on the bf16 inputs, in
    fp32) as torch's bf16 path ``ref`` is: fp32 reductions, FMAs and where the rounding to
    bf16 happens differ, so single elements may differ by an ulp or two (more in absolute
    terms where rotary cancels), but a wrong kernel is off by O(1)."""
    err, ref_err = (a.float() - truth).abs(), (ref.float() - truth).abs()
    assert err.max() <= 2 * ref_err.max() + 1e-6, (err.max(), ref_err.max())
    assert err.mean() <= 1.5 * ref_err.mean() + 1e-7, (err.mean(), ref_err.mean())


def _fp32(*tensors):
    return [None if t is None else t.float() for t in tensors]


@needs_cuda
@needs_triton
@pytest.mark.parametrize("case", GPU_QK_CASES, ids=[f"T{c[0]}-{c[1]}x{c[3]}-{c[5]}" for c in GPU_QK_CASES])
def test_gpu_qk_norm_rotary_matches_torch_without_host_sync(case):
    t, heads, kv_heads, d, rope_dim, norm = case
    qkv, rope, qw, kw = make_qk_case(t, heads, kv_heads, d, rope_dim, norm, torch.bfloat16, seed=1, device="cuda")
    cos, sin = rope
    qk_norm_rotary(qkv, heads, kv_heads, d, cos, sin, norm, qw, kw, 1e-6)
    with forbid_host_sync():
        q, k = qk_norm_rotary(qkv, heads, kv_heads, d, cos, sin, norm, qw, kw, 1e-6)
    ref_q, ref_k = torch_qk(qkv, heads, kv_heads, d, rope, norm, qw, kw, 1e-6)
    true_q, true_k = torch_qk(qkv.float(), heads, kv_heads, d, rope, norm, *_fp32(qw, kw), 1e-6)
    no_worse_than_torch(q, ref_q, true_q)
    no_worse_than_torch(k, ref_k, true_k)
    fp32 = make_qk_case(t, heads, kv_heads, d, rope_dim, norm, torch.float32, seed=1, device="cuda")
    q32, k32 = qk_norm_rotary(fp32[0], heads, kv_heads, d, *fp32[1], norm, fp32[2], fp32[3], 1e-6)
    ref32 = torch_qk(fp32[0], heads, kv_heads, d, fp32[1], norm, fp32[2], fp32[3], 1e-6)
    torch.testing.assert_close(q32, ref32[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k32, ref32[1], rtol=1e-5, atol=1e-5)


@needs_cuda
@needs_triton
@pytest.mark.parametrize("t,h", [(1, 2048), (64, 2048), (257, 4096), (8192, 2048), (3, 7168)])
def test_gpu_add_rms_norm_matches_torch_without_host_sync(t, h):
    x, r = torch.randn(t, h, device="cuda", dtype=torch.bfloat16), torch.randn(t, h, device="cuda",
                                                                                dtype=torch.bfloat16)
    w = (1 + 0.3 * torch.randn(h, device="cuda")).bfloat16()
    add_rms_norm(x, r, w, 1e-6)
    with forbid_host_sync():
        total, normed = add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(total, x + r)                       # one fp32 add rounded once, as torch does
    no_worse_than_torch(normed, F.rms_norm(x + r, (h,), w, 1e-6), F.rms_norm((x + r).float(), (h,), w.float(), 1e-6))


@needs_cuda
@needs_triton
def test_gpu_graph_replay_follows_new_inputs():
    qkv = torch.randn(64, 40 * 128, device="cuda", dtype=torch.bfloat16)
    positions = torch.arange(64, device="cuda")
    rotary = RotaryEmbedding(128, 1024, 1e6).to("cuda")
    qw, kw = torch.ones(128, device="cuda", dtype=torch.bfloat16), torch.ones(128, device="cuda", dtype=torch.bfloat16)

    def run():
        cos, sin = rotary.tables(positions)
        return qk_norm_rotary(qkv, 32, 4, 128, cos, sin, "per_head", qw, kw, 1e-6)

    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, k = run()
    for step in range(1, 4):
        qkv.copy_(torch.randn_like(qkv))
        positions.add_(step * 100)
        graph.replay()
        ref_q, ref_k = torch_qk(qkv, 32, 4, 128, rotary.tables(positions), "per_head", qw, kw, 1e-6)
        true_q, true_k = torch_qk(qkv.float(), 32, 4, 128, rotary.tables(positions), "per_head", *_fp32(qw, kw), 1e-6)
        no_worse_than_torch(q, ref_q, true_q)
        no_worse_than_torch(k, ref_k, true_k)


if __name__ == "__main__":
    run_interpreter_checks(check_interpreter_cases)
