"""Prefill attention over a cached prefix: reference vs dense causal attention, Triton vs reference.

The Triton kernel also runs on CPU, through Triton's interpreter in a subprocess (harness.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from inference.kernels import (
    paged_decode_attention_reference,
    prefill_attention,
    prefill_attention_reference,
    prefill_attention_triton,
)
from inference.kernels.prefill_attention import default_prefill_launch
from tests.inference.kernels.harness import (
    assert_interpreter_checks_pass,
    forbid_host_sync,
    needs_cuda,
    needs_triton,
    run_interpreter_checks,
)

SCALE = 0.2
PAD_ROWS = 3


def make_batch(q_lens, seq_lens, kv_heads, group, head_dim, block_size, seed,
               dtype=torch.float32, device="cpu"):
    """A prefill batch: dense per-request K/V written into shuffled blocks of a garbage cache.

    Returns (args for prefill_attention as a dict, dense_k, dense_v); q has PAD_ROWS padding
    rows after the last request.
    """
    gen = torch.Generator().manual_seed(seed)
    counts = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(counts) + 2
    shape = (num_blocks + 1, block_size, kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    tables = torch.full((len(seq_lens), max(counts, default=0) + 1), num_blocks, dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=gen)
    dense_k, dense_v, used = [], [], 0
    for r, (seq_len, count) in enumerate(zip(seq_lens, counts)):
        ids = perm[used:used + count]
        used += count
        tables[r, :count] = ids.int()
        slots = (ids[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:seq_len]
        for cache, dense in ((k_cache, dense_k), (v_cache, dense_v)):
            values = torch.randn(seq_len, kv_heads, head_dim, generator=gen).to(dtype)
            cache.view(-1, kv_heads, head_dim)[slots] = values.float()
            dense.append(values)
    starts = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32)
    q = torch.randn(int(starts[-1]) + PAD_ROWS, kv_heads * group, head_dim, generator=gen).to(dtype)
    args = dict(q=q, k_cache=k_cache.to(dtype), v_cache=v_cache.to(dtype), block_tables=tables,
                query_start_loc=starts, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                scale=SCALE, max_query_len=max(q_lens, default=0), max_seq_len=max(seq_lens, default=0))
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    return args, dense_k, dense_v


def dense_prefill(args, dense_k, dense_v, window=0, sinks=None):
    """Naive causal attention per request: its queries are the last q_len context positions;
    with a window each sees its last ``window`` positions; sinks join each softmax."""
    q, starts = args["q"].float(), args["query_start_loc"].tolist()
    out = torch.zeros(q.shape)
    for r, (k, v) in enumerate(zip(dense_k, dense_v)):
        a, b = starts[r], starts[r + 1]
        if a == b:
            continue
        group = q.shape[1] // k.shape[1]
        k = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
        v = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
        q_pos = torch.arange(k.shape[1] - (b - a), k.shape[1])
        key_pos = torch.arange(k.shape[1])[None, :]
        mask = key_pos <= q_pos[:, None]
        if window:
            mask &= key_pos > q_pos[:, None] - window
        scores = (q[a:b].transpose(0, 1) @ k.transpose(1, 2) * SCALE).masked_fill(~mask, float("-inf"))
        if sinks is not None:
            sink = sinks.float()[:, None, None].expand(-1, b - a, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out[a:b] = (probs @ v).transpose(0, 1)
    return out


SHAPES = [  # (q_lens, seq_lens, kv_heads, group, head_dim, block_size)
    ([5, 1, 0, 40], [5, 30, 0, 70], 2, 2, 32, 8),     # full prompt, decode row, empty, chunk
    ([16, 33], [16, 100], 1, 4, 64, 16),               # exact block multiple, cached prefix
    ([64, 3, 8], [64, 48, 8], 4, 1, 32, 16),
]


@pytest.mark.parametrize("q_lens,seq_lens,kv_heads,group,head_dim,block_size", SHAPES)
def test_reference_matches_dense_causal_attention(q_lens, seq_lens, kv_heads, group, head_dim, block_size):
    args, dense_k, dense_v = make_batch(q_lens, seq_lens, kv_heads, group, head_dim, block_size, seed=7)
    out = prefill_attention_reference(**args)
    torch.testing.assert_close(out, dense_prefill(args, dense_k, dense_v), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[-PAD_ROWS:], torch.zeros_like(out[-PAD_ROWS:]))


@pytest.mark.parametrize("window,with_sinks", [(3, False), (1, True), (0, True), (20, True)])
def test_reference_window_and_sinks_match_dense_attention(window, with_sinks):
    args, dense_k, dense_v = make_batch([5, 1, 0, 40], [5, 30, 0, 70], 2, 2, 32, 8, seed=17)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(1)) * 2 if with_sinks else None
    out = prefill_attention_reference(**args, window=window, sinks=sinks)
    torch.testing.assert_close(out, dense_prefill(args, dense_k, dense_v, window, sinks), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[-PAD_ROWS:], torch.zeros_like(out[-PAD_ROWS:]))


def test_public_entry_point_on_cpu_matches_dense_attention():
    args, dense_k, dense_v = make_batch([7, 2], [20, 2], 2, 2, 32, 8, seed=9)
    torch.testing.assert_close(prefill_attention(**args), dense_prefill(args, dense_k, dense_v),
                               atol=1e-5, rtol=1e-5)


def test_single_token_chunks_agree_with_decode_attention():
    seq_lens = [1, 9, 24, 50]
    args, _, _ = make_batch([1] * 4, seq_lens, 2, 4, 32, 8, seed=4)
    prefill = prefill_attention_reference(**args)
    decode = paged_decode_attention_reference(args["q"][:4], args["k_cache"], args["v_cache"],
                                              args["block_tables"], args["seq_lens"], SCALE)
    torch.testing.assert_close(prefill[:4], decode, atol=1e-5, rtol=1e-5)


def interpreter_cases():
    """Block 8/16, head_dim 32/64, groups 1/2/4; chunks with and without a cached prefix;
    then windows shorter than a query tile and than the context, with and without sinks;
    then a head_dim of 8; then 16-row / 16-key tiles over long cached prefixes (several
    unmasked interior tiles and several query tiles per chunk, with and without a window)."""
    for i, (block_size, head_dim, group) in enumerate(itertools.product([8, 16], [32, 64], [1, 2, 4])):
        q_lens = [1, 2 * block_size, 0, 5 + 3 * i]
        seq_lens = [1 + 4 * i, 2 * block_size, 0, 5 + 3 * i + block_size * (i % 3)]
        yield dict(q_lens=q_lens, seq_lens=seq_lens, kv_heads=2, group=group, head_dim=head_dim,
                   block_size=block_size, seed=i), 0, False, {}
    for j, (window, sinks) in enumerate([(4, True), (4, False), (37, True), (0, True), (1, True)]):
        yield dict(q_lens=[70, 1, 0, 9], seq_lens=[70, 33, 0, 90], kv_heads=2, group=2, head_dim=32,
                   block_size=8, seed=50 + j), window, sinks, {}
    # head_dim below tl.dot's minimum K of 16: the head dimension is padded (tiny test models)
    yield dict(q_lens=[9, 3], seq_lens=[20, 3], kv_heads=2, group=2, head_dim=8, block_size=4, seed=60), 4, True, {}
    for k, window in enumerate([0, 0, 21]):
        yield dict(q_lens=[45, 3, 16], seq_lens=[130, 67, 16], kv_heads=2, group=2 * k + 1, head_dim=32, block_size=8,
                   seed=70 + k), window, k == 1, dict(block_m=16, block_n=16, num_warps=2)


def packed_interpreter_cases():
    """The grouped-query (packed) kernel in fp16 (the interpreter's bf16 dot is wrong):
    groups 2/4/8 at the default launch (128 packed rows: 64/32/16 tokens per program, so
    the 40-token chunk spans several query tiles), with and without a cached prefix; then
    16-token tiles over long cached prefixes (unmasked interior tiles), a window shorter
    than a query tile with sinks, a longer one, sinks alone; a head_dim of 8; one token per
    program (group 16, block_m 16); a group of 3 (rows past 5 tokens x 3 heads idle); the
    packed kernel forced in fp32; fp16 MHA, which takes the per-head kernel; decode-like
    rows (the short-chunk default)."""
    fp16 = torch.float16
    for i, group in enumerate([2, 4, 8]):
        for prefix in (0, 19):
            yield dict(q_lens=[40, 1, 0, 7], seq_lens=[40 + prefix, 1 + prefix, 0, 7 + 2 * prefix], kv_heads=2,
                       group=group, head_dim=32, block_size=8, seed=100 + 2 * i + (prefix > 0), dtype=fp16), 0, False, {}
    long = dict(q_lens=[45, 3, 16], seq_lens=[123, 67, 16], kv_heads=2, head_dim=32, block_size=8, dtype=fp16)
    tiles = dict(block_m=32, block_n=16, num_warps=2)
    for j, (group, window, sinks) in enumerate([(2, 0, False), (4, 21, True), (4, 0, True)]):
        yield dict(long, group=group, seed=110 + j), window, sinks, dict(tiles, block_m=16 * group)
    yield dict(q_lens=[33, 2], seq_lens=[50, 9], kv_heads=2, group=8, head_dim=32, block_size=8, seed=115,
               dtype=fp16), 4, True, {}  # window 4 < a tile's 16 tokens
    yield dict(q_lens=[9, 3], seq_lens=[20, 3], kv_heads=2, group=4, head_dim=8, block_size=4, seed=116,
               dtype=fp16), 3, True, {}
    yield dict(q_lens=[6, 1], seq_lens=[22, 4], kv_heads=1, group=16, head_dim=16, block_size=8, seed=117,
               dtype=fp16), 0, True, dict(block_m=16, block_n=16)
    yield dict(q_lens=[12, 4], seq_lens=[40, 4], kv_heads=2, group=3, head_dim=32, block_size=8, seed=118,
               dtype=fp16), 7, False, dict(block_m=16, block_n=16)
    yield dict(q_lens=[20, 5], seq_lens=[37, 5], kv_heads=2, group=4, head_dim=32, block_size=8, seed=119), \
        0, True, dict(block_m=16, block_n=16, packed=True)
    yield dict(q_lens=[20, 5], seq_lens=[37, 5], kv_heads=4, group=1, head_dim=32, block_size=8, seed=120,
               dtype=fp16), 0, False, {}
    yield dict(q_lens=[1, 3, 1], seq_lens=[30, 3, 57], kv_heads=2, group=8, head_dim=32, block_size=8, seed=121,
               dtype=fp16), 0, True, {}  # decode-like rows: 32-row tiles of 4 tokens


INTERPRETER_TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3}


def check_interpreter_cases() -> int:
    """The Triton kernels vs the reference on every interpreter case; returns how many ran."""
    checked = 0
    for case, window, with_sinks, launch in itertools.chain(interpreter_cases(), packed_interpreter_cases()):
        args, _, _ = make_batch(**case)
        sinks = torch.linspace(-1, 2, args["q"].shape[1]) if with_sinks else None
        out = prefill_attention_triton(**args, window=window, sinks=sinks, **launch)
        ref = prefill_attention_reference(**args, window=window, sinks=sinks)
        err = (out.float() - ref.float()).abs().max().item()
        tol = INTERPRETER_TOLERANCE[args["q"].dtype]
        assert err < tol, f"{case} window={window} sinks={with_sinks} {launch}: max abs err {err}"
        assert torch.equal(out[-PAD_ROWS:], torch.zeros_like(out[-PAD_ROWS:]))
        checked += 1
    return checked


@needs_triton
def test_triton_kernel_matches_reference_in_interpreter():
    assert_interpreter_checks_pass(__file__, len(list(interpreter_cases())) + len(list(packed_interpreter_cases())))


@needs_triton
@pytest.mark.parametrize("knob", ["block_m", "block_n"])
def test_tile_sizes_must_be_powers_of_two_of_at_least_16(knob):
    args, _, _ = make_batch([5], [9], 2, 2, 32, 8, seed=3)
    for bad in (8, 48):
        with pytest.raises(ValueError, match=f"{knob} must be a power of two >= 16"):
            prefill_attention_triton(**args, **{knob: bad})


@needs_triton
@pytest.mark.parametrize("knobs,message", [
    (dict(packed=True, block_m=16), r"packed block_m \(16\) must be >= the query group \(32\)"),
    (dict(num_warps=3), "num_warps must be a power of two"),
    (dict(num_stages=0), "num_stages must be >= 1"),
    (dict(packed=True, block_n=8), "block_n must be a power of two >= 16"),
])
def test_bad_launch_knobs_raise(knobs, message):
    args, _, _ = make_batch([5], [9], 1, 32, 16, 8, seed=3, dtype=torch.float16)
    with pytest.raises(ValueError, match=message):
        prefill_attention_triton(**args, **knobs)


@needs_triton
def test_query_heads_must_be_a_multiple_of_kv_heads():
    args, _, _ = make_batch([5], [9], 2, 2, 16, 8, seed=3)
    with pytest.raises(ValueError, match="3 q heads are not a multiple of 2 kv heads"):
        prefill_attention_triton(**dict(args, q=args["q"][:, :3]))


@needs_triton
@pytest.mark.parametrize("dtype,packed,expect_packed", [
    (torch.float16, None, True), (torch.bfloat16, None, True), (torch.float16, False, False),
    (torch.float32, None, False), (torch.float32, True, True),
])
def test_grouped_16_bit_queries_take_the_packed_kernel_by_default(dtype, packed, expect_packed):
    """Seen through validation: 16 rows cannot hold a group of 32 heads in the packed
    kernel only. An empty batch returns before any launch, so this runs on any machine."""
    args, _, _ = make_batch([0], [0], 1, 32, 16, 8, seed=3, dtype=dtype)
    call = lambda: prefill_attention_triton(**args, block_m=16, packed=packed)  # noqa: E731
    if expect_packed:
        with pytest.raises(ValueError, match="packed block_m"):
            call()
    else:
        assert torch.equal(call(), torch.zeros_like(args["q"]))


def test_default_packed_launch_fits_the_group_and_short_chunks():
    assert default_prefill_launch(128, 2, 2048, packed=True, group=8) == {
        "block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 2}
    assert default_prefill_launch(64, 2, 2048, packed=True, group=8)["block_n"] == 64
    for max_query_len, group in [(1, 8), (3, 8), (5, 3), (1, 2), (30, 2)]:  # short chunks: the fewest rows
        block_m = default_prefill_launch(128, 2, max_query_len, packed=True, group=group)["block_m"]
        assert 16 <= block_m <= 64 and block_m // group >= max_query_len
        assert block_m == 16 or block_m // 2 // group < max_query_len
    for element_size, head_dim in [(2, 128), (2, 256), (4, 128)]:  # the group always fits
        assert default_prefill_launch(head_dim, element_size, 2048, packed=True, group=256)["block_m"] == 256


TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
GPU_SHAPES = [  # (q_lens, seq_lens, kv_heads, group, head_dim, block_size)
    ([300, 1, 0, 77], [300, 1000, 0, 600], 4, 8, 128, 16),
    ([1024], [1024], 16, 1, 128, 16),
    ([65, 200], [65, 333], 2, 4, 64, 8),
    ([129], [900], 2, 2, 80, 16),
]


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype,packed", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, False),
                                          (torch.float16, True)])
def test_triton_window_and_sinks_match_reference_on_gpu(dtype, packed):
    """GPT-OSS-20B attention shape (64 q heads, 8 kv heads, head_dim 64), window 128; None
    takes the default kernel (packed for 16-bit dtypes)."""
    args, _, _ = make_batch([300, 1, 0, 77], [300, 1000, 0, 600], 8, 8, 64, 16, seed=2, dtype=dtype, device="cuda")
    sinks = torch.randn(64, device="cuda")
    out = prefill_attention_triton(**args, window=128, sinks=sinks, packed=packed)
    ref = prefill_attention_reference(**args, window=128, sinks=sinks)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_lens,seq_lens,kv_heads,group,head_dim,block_size", GPU_SHAPES)
def test_triton_matches_reference_on_gpu(dtype, q_lens, seq_lens, kv_heads, group, head_dim, block_size):
    args, _, _ = make_batch(q_lens, seq_lens, kv_heads, group, head_dim, block_size, seed=1,
                            dtype=dtype, device="cuda")
    prefill_attention(**args)  # compile outside the no-sync region
    with forbid_host_sync():
        out = prefill_attention(**args)
        ref = prefill_attention_reference(**args)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert torch.equal(out[-PAD_ROWS:], torch.zeros_like(out[-PAD_ROWS:]))


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype,packed,launch", [
    (torch.bfloat16, True, {}), (torch.float16, True, {}), (torch.bfloat16, False, {}),
    (torch.bfloat16, True, dict(block_m=16, block_n=32, num_warps=4)),  # 16 // group tokens per program
])
@pytest.mark.parametrize("q_lens,seq_lens,kv_heads,group,head_dim,block_size", [s for s in GPU_SHAPES if s[3] > 1])
def test_packed_and_per_head_kernels_match_reference_on_gpu(dtype, packed, launch, q_lens, seq_lens, kv_heads, group,
                                                            head_dim, block_size):
    args, _, _ = make_batch(q_lens, seq_lens, kv_heads, group, head_dim, block_size, seed=5, dtype=dtype, device="cuda")
    prefill_attention_triton(**args, packed=packed, **launch)  # compile outside the no-sync region
    with forbid_host_sync():
        out = prefill_attention_triton(**args, packed=packed, **launch)
        ref = prefill_attention_reference(**args)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert torch.equal(out[-PAD_ROWS:], torch.zeros_like(out[-PAD_ROWS:]))


if __name__ == "__main__":
    run_interpreter_checks(check_interpreter_cases)
