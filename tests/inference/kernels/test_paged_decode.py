"""Paged decode attention: reference vs dense attention, Triton kernel vs reference.

The Triton kernel also runs on CPU, through Triton's interpreter in a subprocess (harness.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from inference.kernels import (
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_decode_attention_triton,
)
from tests.inference.kernels.harness import (
    HAS_TRITON,
    assert_interpreter_checks_pass,
    forbid_host_sync,
    needs_cuda,
    needs_triton,
    run_interpreter_checks,
)

SCALE = 0.2


def make_paged_kv(seq_lens, kv_heads, head_dim, block_size, gen, dtype=torch.float32, device="cpu"):
    """Random dense per-row K/V scattered into shuffled blocks of a cache full of garbage.

    Returns (k_cache, v_cache, block_tables, dense_k, dense_v); table entries past a row's
    blocks hold the dummy block id, like the engine's padding.
    """
    counts = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(counts) + 3
    max_blocks = max(counts, default=0) + 1
    shape = (num_blocks + 1, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    block_tables = torch.full((len(seq_lens), max_blocks), num_blocks, dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=gen)
    dense_k, dense_v, used = [], [], 0
    for row, (seq_len, count) in enumerate(zip(seq_lens, counts)):
        ids = perm[used:used + count]
        used += count
        block_tables[row, :count] = ids.int()
        slots = (ids[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:seq_len]
        k = torch.randn(seq_len, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(seq_len, kv_heads, head_dim, generator=gen).to(dtype)
        k_cache.view(-1, kv_heads, head_dim)[slots] = k
        v_cache.view(-1, kv_heads, head_dim)[slots] = v
        dense_k.append(k)
        dense_v.append(v)
    to = dict(device=device)
    return k_cache.to(**to), v_cache.to(**to), block_tables.to(**to), dense_k, dense_v


def dense_decode(q, dense_k, dense_v, scale, window=0, sinks=None):
    """Naive attention of each row's single query over its unpaged context (the last
    ``window`` positions of it if given); ``sinks`` join the softmax as extra logits."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    for row, (k, v) in enumerate(zip(dense_k, dense_v)):
        if k.shape[0] == 0:
            continue
        if window:
            k, v = k[-window:], v[-window:]
        group = q.shape[1] // k.shape[1]
        k = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
        v = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
        if sinks is None:
            out[row] = F.scaled_dot_product_attention(q[row].float()[:, None, :], k, v, scale=scale)[:, 0, :]
            continue
        logits = torch.einsum("hd,htd->ht", q[row].float(), k) * scale
        probs = torch.softmax(torch.cat([logits, sinks.float()[:, None]], dim=-1), dim=-1)[:, :-1]
        out[row] = torch.einsum("ht,htd->hd", probs, v)
    return out


def random_case(seq_lens, kv_heads, group, head_dim, block_size, seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, tables, dense_k, dense_v = make_paged_kv(
        seq_lens, kv_heads, head_dim, block_size, gen, dtype, device)
    q = torch.randn(len(seq_lens), kv_heads * group, head_dim, generator=gen).to(dtype).to(device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, tables, lens, dense_k, dense_v


SHAPES = [  # (seq_lens, kv_heads, group, head_dim, block_size)
    ([1, 16, 37, 0], 2, 1, 32, 8),
    ([8, 64, 5], 1, 4, 64, 16),
    ([33, 0, 0, 2], 4, 2, 32, 16),
    ([100], 2, 4, 64, 8),
]


@pytest.mark.parametrize("seq_lens,kv_heads,group,head_dim,block_size", SHAPES)
def test_reference_matches_dense_attention(seq_lens, kv_heads, group, head_dim, block_size):
    q, k_cache, v_cache, tables, lens, dense_k, dense_v = random_case(
        seq_lens, kv_heads, group, head_dim, block_size, seed=len(seq_lens) + head_dim)
    out = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, SCALE)
    torch.testing.assert_close(out, dense_decode(q, dense_k, dense_v, SCALE), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,with_sinks", [(5, False), (1, True), (0, True), (16, True)])
def test_reference_window_and_sinks_match_dense_attention(window, with_sinks):
    q, k_cache, v_cache, tables, lens, dense_k, dense_v = random_case([1, 16, 37, 0, 9], 2, 2, 32, 8, seed=21)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(2)) * 2 if with_sinks else None
    out = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, SCALE, window, sinks)
    torch.testing.assert_close(out, dense_decode(q, dense_k, dense_v, SCALE, window, sinks), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[3], torch.zeros_like(out[3]))


def poisoned_window_case(window: int = 6):
    """A case whose cache holds NaN at every position before each row's window."""
    q, k_cache, v_cache, tables, lens, dense_k, dense_v = random_case([20, 9, 40], 1, 2, 16, 4, seed=4)
    for row, seq_len in enumerate(lens.tolist()):
        for pos in range(seq_len - window):
            block, off = int(tables[row, pos // 4]), pos % 4
            k_cache[block, off] = float("nan")
            v_cache[block, off] = float("nan")
    return (q, k_cache, v_cache, tables, lens), dense_decode(q, dense_k, dense_v, SCALE, window), window


def test_window_reads_nothing_before_it():
    args, expected, window = poisoned_window_case()
    torch.testing.assert_close(paged_decode_attention(*args, SCALE, window=window), expected, atol=1e-5, rtol=1e-5)


def test_padding_rows_are_zero_and_filler_table_entries_are_ignored():
    q, k_cache, v_cache, tables, lens, _, _ = random_case([5, 0, 9], 2, 2, 32, 8, seed=3)
    out = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, SCALE)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].abs().sum() > 0
    # Entries past each row's used blocks are filler: -1 or stale ids must not matter.
    scrambled = tables.clone()
    scrambled[0, 1:] = -1
    scrambled[1, :] = 0
    scrambled[2, 2:] = 1
    again = paged_decode_attention_reference(q, k_cache, v_cache, scrambled, lens, SCALE)
    torch.testing.assert_close(again, out)


def test_public_entry_point_on_cpu_matches_dense_attention():
    q, k_cache, v_cache, tables, lens, dense_k, dense_v = random_case([3, 24], 2, 2, 32, 8, seed=5)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, SCALE)
    torch.testing.assert_close(out, dense_decode(q, dense_k, dense_v, SCALE), atol=1e-5, rtol=1e-5)


def test_fewer_metadata_rows_than_query_rows_are_refused():
    """Padded query rows need their own (seq_len 0) metadata rows; a kernel would read the
    missing ones out of bounds (an illegal address on the GPU, not an error)."""
    q, k_cache, v_cache, tables, lens, _, _ = random_case([5, 0, 9], 2, 2, 32, 8, seed=3)
    padded_q = torch.cat([q, torch.zeros_like(q[:2])])
    with pytest.raises(ValueError, match="one block-table row and one seq_len per query row"):
        paged_decode_attention(padded_q, k_cache, v_cache, tables, lens, SCALE)
    with pytest.raises(ValueError, match="3 block-table rows, 2 seq_lens"):
        paged_decode_attention(q, k_cache, v_cache, tables, lens[:2], SCALE)


def interpreter_cases():
    """Many small shapes: block 8/16, head_dim 32/64, groups 1/2/4, 1 or 3 context splits;
    then windows (smaller and larger than contexts) with and without sinks; then head_dim 8
    with query groups (padded for tl.dot)."""
    for i, (block_size, head_dim, group) in enumerate(itertools.product([8, 16], [32, 64], [1, 2, 4])):
        # single token, exact blocks, padding, ragged, several BLOCK_N tiles
        seq_lens = [1, 2 * block_size, 0, 7 + 5 * i, 70 + 9 * i]
        yield dict(seq_lens=seq_lens, kv_heads=2, group=group, head_dim=head_dim,
                   block_size=block_size, seed=i), 1 + 2 * (i % 2), 0, False
    for j, (window, sinks, splits, group) in enumerate([(5, True, 1, 2), (5, True, 3, 1), (40, False, 2, 4),
                                                        (0, True, 3, 2), (1, True, 1, 1), (200, True, 2, 2)]):
        yield dict(seq_lens=[1, 16, 0, 45, 130], kv_heads=2, group=group, head_dim=32, block_size=8,
                   seed=100 + j), splits, window, sinks
    # head_dim below tl.dot's minimum K of 16 with query groups: the head dimension is padded
    for j, (group, splits) in enumerate([(2, 1), (4, 2)]):
        yield dict(seq_lens=[3, 40, 0, 17], kv_heads=2, group=group, head_dim=8, block_size=4,
                   seed=200 + j), splits, 6 if j else 0, j == 0


def check_interpreter_cases() -> int:
    """The Triton kernel vs the reference on every interpreter case; returns how many ran."""
    checked = 0
    for case, num_splits, window, with_sinks in interpreter_cases():
        q, k_cache, v_cache, tables, lens, _, _ = random_case(**case)
        sinks = torch.linspace(-2, 3, q.shape[1]) if with_sinks else None
        out = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, SCALE, num_splits=num_splits,
                                            window=window, sinks=sinks)
        ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, SCALE, window, sinks)
        err = (out - ref).abs().max().item()
        assert err < 1e-4, f"{case} splits={num_splits} window={window} sinks={with_sinks}: max abs err {err}"
        checked += 1
    # A decode graph's block table is as wide as the longest context allowed: splits sized
    # per row must cover short rows exactly and never read the dummy block (poisoned here).
    q, k_cache, v_cache, tables, lens, _, _ = random_case(seq_lens=[1, 9, 0, 70, 33], kv_heads=2, group=2,
                                                          head_dim=32, block_size=8, seed=300)
    dummy = k_cache.shape[0] - 1
    wide = torch.cat([tables, torch.full((tables.shape[0], 40), dummy, dtype=tables.dtype)], dim=1)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, SCALE)
    k_cache[dummy], v_cache[dummy] = float("nan"), float("nan")
    for num_splits in (4, 7):
        out = paged_decode_attention_triton(q, k_cache, v_cache, wide, lens, SCALE, num_splits=num_splits)
        assert (out - ref).abs().max().item() < 1e-4, f"wide table, splits={num_splits}"
        checked += 1
    args, expected, window = poisoned_window_case()
    for num_splits in (1, 2):
        out = paged_decode_attention_triton(*args, SCALE, num_splits=num_splits, window=window)
        assert (out - expected).abs().max().item() < 1e-4, f"NaN before the window leaked (splits={num_splits})"
        checked += 1
    # Tuning knobs (tools/tune_paged_decode.py): other tile lengths, with and without query groups.
    for block_n, group, num_splits in ((16, 1, 3), (128, 1, 2), (16, 4, 1), (128, 2, 3)):
        q, k_cache, v_cache, tables, lens, _, _ = random_case(seq_lens=[1, 9, 0, 150, 33], kv_heads=2, group=group,
                                                              head_dim=32, block_size=8, seed=400 + block_n)
        out = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, SCALE, num_splits=num_splits,
                                            block_n=block_n, num_warps=2, num_stages=2)
        ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, SCALE)
        assert (out - ref).abs().max().item() < 1e-4, f"block_n={block_n} group={group} splits={num_splits}"
        checked += 1
    # MHA through the tl.dot path (its one query row padded to 16), with a window and sinks too.
    for block_n, num_splits, window, with_sinks in ((32, 3, 0, False), (16, 1, 6, True), (64, 2, 0, True)):
        q, k_cache, v_cache, tables, lens, _, _ = random_case(seq_lens=[1, 9, 0, 150, 33], kv_heads=3, group=1,
                                                              head_dim=32, block_size=8, seed=500 + block_n)
        sinks = torch.linspace(-1, 2, q.shape[1]) if with_sinks else None
        out = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, SCALE, num_splits=num_splits,
                                            window=window, sinks=sinks, block_n=block_n, use_dot=True)
        ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, SCALE, window, sinks)
        assert (out - ref).abs().max().item() < 1e-4, f"MHA dot block_n={block_n} splits={num_splits} window={window}"
        checked += 1
    # MHA's dot path padding the head dimension too (head_dim 8 < tl.dot's K of 16), and in
    # fp16 (p is cast to V's dtype for the second dot). The interpreter's bf16 tl.dot is
    # wrong for any kernel (numpy has no bf16), so bf16 is left to the GPU tests.
    for head_dim, dtype, window, tol in ((8, torch.float32, 6, 1e-4), (24, torch.float16, 0, 5e-3)):
        q, k_cache, v_cache, tables, lens, _, _ = random_case(seq_lens=[1, 9, 0, 70, 33], kv_heads=2, group=1,
                                                              head_dim=head_dim, block_size=4, seed=700 + head_dim,
                                                              dtype=dtype)
        sinks = torch.linspace(-1, 2, q.shape[1])
        out = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, SCALE, num_splits=3, window=window,
                                            sinks=sinks, use_dot=True)
        ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, SCALE, window, sinks)
        assert (out.float() - ref.float()).abs().max().item() < tol, f"MHA dot head_dim={head_dim} {dtype}"
        assert torch.equal(out[2], torch.zeros_like(out[2]))
        checked += 1
    # And the other way round: query groups through the element-wise path (use_dot=False)
    # compute every head of each group, not only its first.
    for group, num_splits, window, with_sinks in ((2, 1, 0, False), (4, 3, 6, True), (3, 2, 0, True)):
        q, k_cache, v_cache, tables, lens, _, _ = random_case(seq_lens=[1, 9, 0, 70, 33], kv_heads=2, group=group,
                                                              head_dim=24, block_size=8, seed=600 + group)
        sinks = torch.linspace(-1, 2, q.shape[1]) if with_sinks else None
        out = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, SCALE, num_splits=num_splits,
                                            window=window, sinks=sinks, use_dot=False)
        ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, SCALE, window, sinks)
        assert (out - ref).abs().max().item() < 1e-4, f"element-wise group={group} splits={num_splits}"
        checked += 1
    return checked


@needs_triton
def test_triton_kernel_matches_reference_in_interpreter():
    assert_interpreter_checks_pass(__file__, len(list(interpreter_cases())) + 16)


@needs_triton
@pytest.mark.parametrize("block_n", [8, 48])
def test_tile_length_must_be_a_power_of_two_of_at_least_16(block_n):
    q, k_cache, v_cache, tables, lens, _, _ = random_case([5, 9], 2, 2, 32, 8, seed=3)
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16"):
        paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, SCALE, block_n=block_n)


def test_split_heuristic_gives_mha_more_and_shorter_splits(monkeypatch):
    """Host-only: an H200's 132 SMs stand in for the device. MHA (one head row per program)
    gets the many short splits the H200 tuning measured faster; grouped kernels keep the
    fill-the-GPU rule; every choice stays in [1, MAX_SPLITS] and CPU tensors never split."""
    from types import SimpleNamespace

    from inference.kernels import paged_decode_triton as pdt

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    blocks = 544 // 16   # a 544-token context in 16-token blocks
    mha = pdt.choose_num_splits(64, 16, blocks, 16, cuda, grouped=False)
    grouped = pdt.choose_num_splits(64, 16, blocks, 16, cuda, grouped=True)
    assert grouped == 1 and 8 <= mha <= 544 // pdt.MHA_MIN_TOKENS_PER_SPLIT
    assert pdt.choose_num_splits(1, 16, 4096 // 16, 16, cuda, grouped=False) == pdt.MAX_SPLITS
    assert pdt.choose_num_splits(256, 16, 1, 16, cuda, grouped=False) == 1   # one 16-token block: nothing to split
    assert pdt.choose_num_splits(64, 16, blocks, 16, torch.device("cpu"), grouped=False) == 1


TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
GPU_SHAPES = [  # (seq_lens, kv_heads, group, head_dim, block_size)
    ([1, 16, 300, 0, 1000], 4, 8, 128, 16),
    ([2048, 5], 4, 8, 128, 16),
    ([17, 0, 512], 16, 1, 128, 16),
    ([1, 64, 129], 2, 4, 64, 8),
    ([3000], 2, 2, 80, 16),
]


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq_lens,kv_heads,group,head_dim,block_size", GPU_SHAPES)
def test_triton_matches_reference_on_gpu(dtype, seq_lens, kv_heads, group, head_dim, block_size):
    q, k_cache, v_cache, tables, lens, _, _ = random_case(
        seq_lens, kv_heads, group, head_dim, block_size, seed=head_dim, dtype=dtype, device="cuda")
    ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, SCALE)
    # Both paths named explicitly (None would follow MHA_USE_DOT): element-wise, and tl.dot
    # (for MHA its query row padded to 16).
    for num_splits, use_dot in itertools.product((None, 1, 4), (False, True)):
        kwargs = dict(num_splits=num_splits, use_dot=use_dot)
        paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, SCALE, **kwargs)
        with forbid_host_sync():
            out = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, SCALE, **kwargs)
        torch.testing.assert_close(out.float(), ref.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
        assert torch.equal(out[lens == 0], torch.zeros_like(out[lens == 0]))


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 128])
def test_triton_window_and_sinks_match_reference_on_gpu(dtype, window):
    """GPT-OSS-20B attention shape: 64 q heads, 8 kv heads, head_dim 64, window 128."""
    q, k_cache, v_cache, tables, lens, _, _ = random_case(
        [1, 100, 129, 0, 700, 3000], 8, 8, 64, 16, seed=5, dtype=dtype, device="cuda")
    sinks = torch.randn(64, device="cuda")
    ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, SCALE, window, sinks)
    for num_splits in (None, 1, 4):
        paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, SCALE, num_splits, window, sinks)
        with forbid_host_sync():
            out = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, SCALE, num_splits, window, sinks)
        torch.testing.assert_close(out.float(), ref.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@needs_cuda
@pytest.mark.parametrize("use_triton", [True, False])
def test_cuda_graph_replay_follows_new_inputs(use_triton):
    if use_triton and not HAS_TRITON:
        pytest.skip("triton not installed")
    attend = paged_decode_attention if use_triton else paged_decode_attention_reference
    q, k_cache, v_cache, tables, lens, _, _ = random_case(
        [40, 7, 0, 90], 4, 4, 128, 16, seed=11, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        attend(q, k_cache, v_cache, tables, lens, SCALE)  # warm-up compiles outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attend(q, k_cache, v_cache, tables, lens, SCALE)
    new = random_case([90, 40, 7, 0], 4, 4, 128, 16, seed=12, dtype=torch.bfloat16, device="cuda")
    for static, fresh in zip((q, k_cache, v_cache, tables, lens), new[:5]):
        static.copy_(fresh)
    graph.replay()
    ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, SCALE)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)


if __name__ == "__main__":
    run_interpreter_checks(check_interpreter_cases)
