"""``qk_norm_rotary_write_kv``: q/k norm + rotary with this step's K/V written into the paged
caches by the same launch.

Each case checks the fused write two ways: against the unfused path (``qk_norm_rotary``
then ``write_kv``: the same kernel math and the same roundings, so q and every cache
element are bitwise equal, fp32 and bf16 alike) and against an independent torch
computation (``F.rms_norm`` + rotary in torch, the rows placed by a Python loop over
``divmod(slot, block_size)``): v and every slot the step does not own bitwise, k within
fp32 tolerance (one bf16 ulp in bf16: the interpreter rounds by truncation). Shapes:
per-head, whole-projection and no norm, full / partial / no rotary, GQA groups 1-8,
block sizes 1-16, padding rows pointing at the dummy block, a slot mapping shorter than
the rows, caches with padded head strides. On CPU the kernel runs under Triton's
interpreter in a subprocess (harness.py); on CUDA, Qwen3-30B-A3B and OLMoE head shapes in
bf16 inside a CUDA-graph capture replayed with new inputs and slots, without host syncs.
"""

from __future__ import annotations

import pytest
import torch

from inference.kernels.norm_rotary import kv_write_supported, qk_norm_rotary, qk_norm_rotary_write_kv
from inference.model.rotary import RotaryEmbedding
from inference.paged_attention import write_kv
from tests.inference.kernels.harness import (
    assert_interpreter_checks_pass,
    forbid_host_sync,
    needs_cuda,
    needs_triton,
    run_interpreter_checks,
)
from tests.inference.kernels.test_norm_rotary import make_qk_case, torch_qk

# (T, heads, kv heads, head_dim, rope_dim or None, norm, dtype, block_size, padding rows)
CASES = [
    (1, 4, 2, 16, 16, "per_head", torch.float32, 4, 0),
    (5, 4, 2, 16, 8, "per_head", torch.float32, 2, 2),        # partial rotary, padding rows
    (3, 4, 4, 8, 8, "full", torch.float32, 16, 1),            # OLMoE-style whole-projection norm
    (6, 8, 1, 32, 32, "none", torch.float32, 1, 0),           # group of 8, one-slot blocks
    (7, 2, 2, 16, None, "per_head", torch.float32, 4, 3),     # no rotary
    (4, 6, 3, 24, 12, "full", torch.float32, 3, 1),           # head_dim, heads, block size not powers of two
    (5, 4, 2, 16, 8, "per_head", torch.bfloat16, 4, 2),
    (6, 8, 2, 16, 16, "full", torch.bfloat16, 8, 1),
]


def make_caches(num_blocks, block_size, kv_heads, d, dtype, device="cpu", head_pad=0, seed=0):
    """Random (not zero) k/v caches with the dummy block last; ``head_pad`` > 0 gives each
    head a padded stride (rows still contiguous in their last dim)."""
    g = torch.Generator().manual_seed(seed)
    caches = []
    for _ in range(2):
        full = torch.randn(num_blocks + 1, block_size, kv_heads, d + head_pad, generator=g).to(device, dtype)
        caches.append(full[..., :d])
    return caches


def make_slots(t, pad, num_blocks, block_size, n_slots=None, seed=0, device="cpu"):
    """Distinct slots in the real blocks for the first t - pad rows, the dummy block for
    the padding rows (all on its slot 0, as the engine pads, except one on its last slot)."""
    g = torch.Generator().manual_seed(seed + 7)
    real = torch.randperm(num_blocks * block_size, generator=g)[: t - pad]
    dummy = torch.full((pad,), num_blocks * block_size, dtype=torch.int64)
    if pad > 1:
        dummy[-1] = num_blocks * block_size + block_size - 1
    slots = torch.cat([real, dummy])
    return slots[: t if n_slots is None else n_slots].to(device)


def torch_cache_rows(k_cache, v_cache, slots, k, v, block_size):
    """The expected caches: a row-by-row copy, no index kernels."""
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    for i, slot in enumerate(slots.tolist()):
        block, offset = divmod(slot, block_size)
        k_exp[block, offset], v_exp[block, offset] = k[i], v[i]
    return k_exp, v_exp


def check_case(t, heads, kv_heads, d, rope_dim, norm, dtype, block_size, pad, device="cpu", n_slots=None,
               head_pad=0):
    qkv, rope, qw, kw = make_qk_case(t, heads, kv_heads, d, rope_dim, norm, dtype, seed=2, device=device)
    cos, sin = rope if rope is not None else (None, None)
    num_blocks = -(-t // block_size) + 2
    k_cache, v_cache = make_caches(num_blocks, block_size, kv_heads, d, dtype, device, head_pad)
    slots = make_slots(t, pad, num_blocks, block_size, n_slots, device=device)
    assert kv_write_supported(k_cache, v_cache, slots, kv_heads, d, dtype, t)
    v = qkv[:, (heads + kv_heads) * d:].reshape(t, kv_heads, d)

    k_unf, v_unf = k_cache.clone(), v_cache.clone()
    q_unf, k_rows = qk_norm_rotary(qkv, heads, kv_heads, d, cos, sin, norm, qw, kw, 1e-6)
    write_kv(k_unf, v_unf, slots, k_rows, v)
    k_exp, v_exp = torch_cache_rows(k_cache, v_cache, slots, *torch_qk(qkv, heads, kv_heads, d, rope, norm, qw, kw,
                                                                      1e-6)[1:], v, block_size)
    before = k_cache.clone()
    q = qk_norm_rotary_write_kv(qkv, heads, kv_heads, d, cos, sin, norm, qw, kw, 1e-6, k_cache, v_cache, slots)

    real = slice(0, num_blocks)       # padding rows may share a dummy slot: whichever row wins is fine
    assert torch.equal(q, q_unf) and q.shape == (t, heads, d) and q.dtype == dtype
    assert torch.equal(k_cache[real], k_unf[real]) and torch.equal(v_cache[real], v_unf[real])
    assert torch.equal(v_cache[real], v_exp[real])
    owned = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=device)
    owned[slots[: t - pad]] = True
    owned = owned.view(num_blocks, block_size)
    assert owned.sum() == min(t - pad, len(slots)) > 0
    k_got, k_want, k_before = k_cache[real], k_exp[real], before[real]
    assert torch.equal(k_got[~owned], k_before[~owned])          # padding rows went to the dummy block only
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(k_got[owned], k_want[owned], **tol)


def check_interpreter_cases() -> int:
    for case in CASES:
        check_case(*case)
    check_case(6, 4, 2, 16, 8, "per_head", torch.float32, 4, 0, n_slots=4)     # rows 4, 5 are not written
    check_case(5, 4, 2, 16, 16, "full", torch.float32, 2, 1, head_pad=8)       # padded head stride
    return len(CASES) + 2


@needs_triton
def test_fused_kv_write_matches_write_kv_and_torch_in_interpreter():
    assert_interpreter_checks_pass(__file__, len(CASES) + 2)


@needs_triton
def test_layouts_it_does_not_take_fall_back_or_are_rejected(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")     # validation runs before any launch
    qkv = torch.zeros(3, 4 * 16)
    k_cache, v_cache = make_caches(2, 4, 1, 16, torch.float32)
    slots = torch.tensor([0, 1, 8])
    assert kv_write_supported(k_cache, v_cache, slots, 1, 16, torch.float32, 3)
    unsupported = {
        "dtype": (k_cache.bfloat16(), v_cache, slots),                          # a cast is write_kv's job
        "last-dim stride": (torch.zeros(3, 4, 1, 32)[..., ::2], v_cache, slots),
        "head shape": (torch.zeros(3, 4, 2, 16), v_cache, slots),
        "int32 slots": (k_cache, v_cache, slots.int()),
        "too many slots": (k_cache, v_cache, torch.arange(4)),
        "strided slots": (k_cache, v_cache, torch.arange(6)[::2]),
    }
    for what, (kc, vc, sm) in unsupported.items():
        assert not kv_write_supported(kc, vc, sm, 1, 16, torch.float32, 3), what
        with pytest.raises(ValueError, match="qk_norm_rotary_write_kv"):
            qk_norm_rotary_write_kv(qkv, 2, 1, 16, None, None, "none", None, None, 1e-6, kc, vc, sm)


GPU_CASES = [  # (T, heads, kv heads, head_dim, rope_dim, norm, block_size, padding rows)
    (1, 32, 4, 128, 128, "per_head", 16, 0),     # Qwen3-30B-A3B, batch-1 decode
    (16, 32, 4, 128, 128, "per_head", 16, 5),
    (1, 16, 16, 128, 128, "full", 16, 0),        # OLMoE-1B-7B
    (64, 16, 16, 128, 128, "full", 16, 13),
    (33, 12, 2, 128, 64, "per_head", 32, 4),     # partial rotary
]


@needs_cuda
@needs_triton
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"T{c[0]}-{c[1]}x{c[3]}-{c[5]}-pad{c[7]}" for c in GPU_CASES])
def test_gpu_graph_replay_writes_what_write_kv_writes(case):
    """Captured once, replayed with new q/k/v, positions and slots: q and the caches equal
    the unfused path's bit for bit (bf16), and no host sync."""
    t, heads, kv_heads, d, rope_dim, norm, bs, pad = case
    num_blocks = 8 * (-(-t // bs)) + 4
    qkv, _, qw, kw = make_qk_case(t, heads, kv_heads, d, rope_dim, norm, torch.bfloat16, seed=3, device="cuda")
    rotary = RotaryEmbedding(rope_dim, 8192, 1e6).to("cuda")
    positions = torch.zeros(t, dtype=torch.int64, device="cuda")
    slots = make_slots(t, pad, num_blocks, bs, device="cuda")
    k_cache, v_cache = make_caches(num_blocks, bs, kv_heads, d, torch.bfloat16, "cuda")

    def fused():
        cos, sin = rotary.tables(positions)
        return qk_norm_rotary_write_kv(qkv, heads, kv_heads, d, cos, sin, norm, qw, kw, 1e-6, k_cache, v_cache, slots)

    fused()
    with forbid_host_sync():
        fused()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q = fused()
    for step in range(1, 4):
        qkv.copy_(torch.randn_like(qkv))
        positions.copy_(torch.randint(0, 8000, (t,), device="cuda"))
        slots.copy_(make_slots(t, pad, num_blocks, bs, seed=step, device="cuda"))
        k_unf, v_unf = k_cache.clone(), v_cache.clone()
        cos, sin = rotary.tables(positions)
        q_unf, k_rows = qk_norm_rotary(qkv, heads, kv_heads, d, cos, sin, norm, qw, kw, 1e-6)
        write_kv(k_unf, v_unf, slots, k_rows, qkv[:, (heads + kv_heads) * d:].reshape(t, kv_heads, d))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(q, q_unf)
        assert torch.equal(k_cache[:num_blocks], k_unf[:num_blocks])
        assert torch.equal(v_cache[:num_blocks], v_unf[:num_blocks])
        real = slots[: t - pad]           # this step's rows are where its slots say
        assert torch.equal(k_cache.view(-1, kv_heads, d)[real], k_rows[: t - pad])


if __name__ == "__main__":
    run_interpreter_checks(check_interpreter_cases)
