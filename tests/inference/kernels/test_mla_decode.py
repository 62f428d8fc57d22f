"""MLA decode over a paged latent cache: the absorbed-weight reference vs attention with keys
and values expanded per head (what transformers computes), Triton kernel vs reference.

The Triton kernel also runs on CPU, through Triton's interpreter in a subprocess (harness.py).
"""

from __future__ import annotations

import pytest
import torch

from inference.kernels import mla_decode_attention, mla_decode_attention_reference, mla_decode_attention_triton
from tests.inference.kernels.harness import (
    assert_interpreter_checks_pass,
    forbid_host_sync,
    needs_cuda,
    needs_triton,
    run_interpreter_checks,
)

SCALE = 0.15


def make_case(seq_lens, heads, latent, rope, block_size, seed, nope=8, v_dim=8, dtype=torch.float32, device="cpu"):
    """Random per-row latent rows scattered into shuffled blocks of a garbage cache, plus
    random per-head up-projections; returns the kernel args and what expansion needs."""
    gen = torch.Generator().manual_seed(seed)
    counts = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(counts) + 3
    cache = torch.randn(num_blocks + 1, block_size, 1, latent + rope, generator=gen)
    tables = torch.full((len(seq_lens), max(counts, default=0) + 1), num_blocks, dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=gen)
    rows, used = [], 0
    for r, (seq_len, count) in enumerate(zip(seq_lens, counts)):
        ids = perm[used:used + count]
        used += count
        tables[r, :count] = ids.int()
        slots = (ids[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:seq_len]
        values = torch.randn(seq_len, 1, latent + rope, generator=gen)
        cache.view(-1, 1, latent + rope)[slots] = values
        rows.append(values[:, 0])
    w_uk = torch.randn(heads, nope, latent, generator=gen) / latent ** 0.5
    w_uv = torch.randn(heads, v_dim, latent, generator=gen) / latent ** 0.5
    q_nope = torch.randn(len(seq_lens), heads, nope, generator=gen)
    q_rope = torch.randn(len(seq_lens), heads, rope, generator=gen)
    q_latent = torch.einsum("bhn,hnl->bhl", q_nope, w_uk)
    to = dict(device=device)
    args = (q_latent.to(dtype).to(**to), q_rope.to(dtype).to(**to), cache.to(dtype).to(**to), tables.to(**to),
            torch.tensor(seq_lens, dtype=torch.int32, device=device))
    return args, dict(rows=rows, q_nope=q_nope, q_rope=q_rope, w_uk=w_uk, w_uv=w_uv, latent=latent)


def expanded_attention(e) -> torch.Tensor:
    """Per row: expand the latent into per-head keys and values and attend ([B, H, v])."""
    out = []
    for b, rows in enumerate(e["rows"]):
        heads = e["w_uk"].shape[0]
        if rows.shape[0] == 0:
            out.append(torch.zeros(heads, e["w_uv"].shape[1]))
            continue
        latent, k_rope = rows[:, :e["latent"]], rows[:, e["latent"]:]
        k = torch.cat([torch.einsum("tl,hnl->htn", latent, e["w_uk"]),
                       k_rope[None].expand(heads, -1, -1)], dim=-1)
        v = torch.einsum("tl,hvl->htv", latent, e["w_uv"])
        q = torch.cat([e["q_nope"][b], e["q_rope"][b]], dim=-1)
        probs = torch.softmax(torch.einsum("hd,htd->ht", q, k) * SCALE, dim=-1)
        out.append(torch.einsum("ht,htv->hv", probs, v))
    return torch.stack(out)


@pytest.mark.parametrize("seq_lens,heads,latent,rope,block_size", [
    ([1, 16, 37, 0], 4, 16, 8, 8), ([50, 3], 16, 32, 16, 16), ([9], 1, 64, 8, 4)])
def test_absorbed_reference_matches_expanded_attention(seq_lens, heads, latent, rope, block_size):
    args, expand = make_case(seq_lens, heads, latent, rope, block_size, seed=len(seq_lens) + latent)
    out = mla_decode_attention_reference(*args, SCALE)
    assert out.shape == (len(seq_lens), heads, latent)
    out_v = torch.einsum("bhl,hvl->bhv", out, expand["w_uv"])
    torch.testing.assert_close(out_v, expanded_attention(expand), atol=1e-5, rtol=1e-5)
    empty = torch.tensor(seq_lens) == 0
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))


def test_public_entry_point_on_cpu_is_the_reference():
    args, _ = make_case([3, 24], 4, 16, 8, 8, seed=5)
    torch.testing.assert_close(mla_decode_attention(*args, SCALE), mla_decode_attention_reference(*args, SCALE))


def test_fewer_metadata_rows_than_query_rows_are_refused():
    (q_latent, q_rope, cache, tables, lens), _ = make_case([3, 24], 4, 16, 8, 8, seed=5)
    with pytest.raises(ValueError, match="2 query rows, 2 block-table rows, 1 seq_lens"):
        mla_decode_attention(q_latent, q_rope, cache, tables, lens[:1], SCALE)


def interpreter_cases():
    """Heads 1/4/20 (one or two head blocks), latent 16/48, rope 8/16, 1 or 3 splits."""
    shapes = [(4, 16, 8, 8, 1), (4, 16, 8, 8, 3), (20, 48, 16, 16, 1), (1, 32, 8, 4, 2), (20, 16, 8, 16, 3)]
    for i, (heads, latent, rope, block_size, splits) in enumerate(shapes):
        yield dict(seq_lens=[1, 2 * block_size, 0, 45 + 7 * i], heads=heads, latent=latent, rope=rope,
                   block_size=block_size, seed=i), splits


def check_interpreter_cases() -> int:
    checked = 0
    for case, num_splits in interpreter_cases():
        args, _ = make_case(**case)
        out = mla_decode_attention_triton(*args, SCALE, num_splits=num_splits)
        err = (out - mla_decode_attention_reference(*args, SCALE)).abs().max().item()
        assert err < 1e-4, f"{case} splits={num_splits}: max abs err {err}"
        checked += 1
    return checked


@needs_triton
def test_triton_kernel_matches_reference_in_interpreter():
    assert_interpreter_checks_pass(__file__, len(list(interpreter_cases())))


TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq_lens", [[1, 16, 300, 0, 1000], [4000, 7], [640] * 64])
def test_triton_matches_reference_on_gpu_moonlight_shape(dtype, seq_lens):
    """Moonlight-16B-A3B / DeepSeek-V3 latent shape: L 512, R 64; 16 heads."""
    args, _ = make_case(seq_lens, 16, 512, 64, 16, seed=3, nope=128, v_dim=128, dtype=dtype, device="cuda")
    ref = mla_decode_attention_reference(*args, SCALE)
    for num_splits in (None, 1, 4):
        mla_decode_attention_triton(*args, SCALE, num_splits=num_splits)
        with forbid_host_sync():
            out = mla_decode_attention_triton(*args, SCALE, num_splits=num_splits)
        torch.testing.assert_close(out.float(), ref.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@needs_cuda
@needs_triton
def test_cuda_graph_replay_follows_new_inputs():
    args, _ = make_case([40, 7, 0, 90], 16, 512, 64, 16, seed=11, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        mla_decode_attention(*args, SCALE)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_decode_attention(*args, SCALE)
    fresh, _ = make_case([90, 40, 7, 0], 16, 512, 64, 16, seed=12, dtype=torch.bfloat16, device="cuda")
    for static, new in zip(args, fresh):
        static.copy_(new)
    graph.replay()
    torch.testing.assert_close(out.float(), mla_decode_attention_reference(*args, SCALE).float(), atol=3e-2, rtol=3e-2)


if __name__ == "__main__":
    run_interpreter_checks(check_interpreter_cases)
