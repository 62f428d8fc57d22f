"""Check the inference kernels on a GPU: correctness against the torch references and a
micro-benchmark (median of CUDA-event timings) at realistic model shapes.

    python tools/gpu_check_kernels.py --output kernels.json [--reps 30] [--quick]

Shapes: Qwen3-30B-A3B-like attention (32 q heads, 4 kv heads, head_dim 128) and
OLMoE-1B-7B-like attention (16 heads, 16 kv heads, head_dim 128); MoE layers of OLMoE
(64 experts, top-8, hidden 2048, intermediate 1024) and Qwen3-30B-A3B (128 experts, top-8,
hidden 2048, intermediate 768). The table is printed last; ``--output`` gets the rows as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.kernels import (  # noqa: E402  (path set up above for `python tools/...`)
    moe_experts_dense,
    moe_experts_grouped,
    moe_experts_reference,
    paged_decode_attention_reference,
    paged_decode_attention_triton,
    prefill_attention_reference,
    prefill_attention_triton,
)
from tools.decode_profile import capture_graph, cuda_ms  # noqa: E402

ATTENTION_MODELS = {"qwen3-30b-a3b": (32, 4, 128), "olmoe-1b-7b": (16, 16, 128)}
MOE_MODELS = {"olmoe-1b-7b": (64, 8, 2048, 1024), "qwen3-30b-a3b": (128, 8, 2048, 768)}
BLOCK_SIZE = 16
DEVICE = "cuda"


@dataclasses.dataclass
class Row:
    """One checked configuration; timings are None when the check failed before them."""
    kernel: str
    model: str
    shape: str
    dtype: str
    max_abs_err: float | None = None
    rel_err: float | None = None
    kernel_ms: float | None = None
    graph_ms: float | None = None
    ref_ms: float | None = None
    gbps: float | None = None
    note: str = ""


def cuda_time_ms(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    """Median over ``reps`` of per-call CUDA-event time (each call bracketed by events)."""
    return statistics.median(cuda_ms(fn, reps, warmup))


def graph_time_ms(fn: Callable[[], object], reps: int) -> float:
    """Median replay time of ``fn`` captured in a CUDA graph: the engine's decode-step cost,
    free of Python launch overhead."""
    graph = capture_graph(fn)
    return cuda_time_ms(graph.replay, reps)


def record_graph_time(row: Row, fn: Callable[[], object], reps: int) -> None:
    """Fill ``row.graph_ms``; a failed capture is noted on the row, not raised."""
    try:
        row.graph_ms = graph_time_ms(fn, reps)
    except Exception as exc:  # noqa: BLE001  (a capture failure is a finding to report)
        row.note = f"graph capture failed: {type(exc).__name__}: {str(exc)[:100]}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    err = (out.float() - ref.float()).abs().max().item()
    return err, err / max(ref.float().abs().max().item(), 1e-12)


def paged_cache(seq_lens: torch.Tensor, kv_heads: int, head_dim: int, max_blocks: int,
                dtype: torch.dtype, gen: torch.Generator):
    """A cache with a random block permutation per row (the engine's blocks are scattered)."""
    batch = seq_lens.shape[0]
    num_blocks = batch * max_blocks
    shape = (num_blocks + 1, BLOCK_SIZE, kv_heads, head_dim)
    k_cache = torch.randn(shape, device=DEVICE, dtype=dtype, generator=gen)
    v_cache = torch.randn(shape, device=DEVICE, dtype=dtype, generator=gen)
    perm = torch.randperm(num_blocks, device=DEVICE, generator=gen)
    return k_cache, v_cache, perm.view(batch, max_blocks).int()


def check_decode(model: str, batch: int, context: int, dtype: torch.dtype, reps: int, bench: bool) -> Row:
    heads, kv_heads, head_dim = ATTENTION_MODELS[model]
    row = Row("paged_decode", model, f"B={batch} ctx<={context}", dtype_name(dtype))
    gen = torch.Generator(device=DEVICE).manual_seed(batch + context)
    # Ragged lengths in [context/2, context]: realistic decode batches are not uniform.
    seq_lens = torch.randint(context // 2, context + 1, (batch,), device=DEVICE, generator=gen).int()
    k_cache, v_cache, tables = paged_cache(seq_lens, kv_heads, head_dim, context // BLOCK_SIZE, dtype, gen)
    q = torch.randn(batch, heads, head_dim, device=DEVICE, dtype=dtype, generator=gen)
    scale = head_dim ** -0.5
    args = (q, k_cache, v_cache, tables, seq_lens, scale)
    row.max_abs_err, row.rel_err = errors(paged_decode_attention_triton(*args), paged_decode_attention_reference(*args))
    if bench:
        row.kernel_ms = cuda_time_ms(lambda: paged_decode_attention_triton(*args), reps)
        record_graph_time(row, lambda: paged_decode_attention_triton(*args), reps)
        row.ref_ms = cuda_time_ms(lambda: paged_decode_attention_reference(*args), max(3, reps // 5))
        kv_bytes = 2 * seq_lens.sum().item() * kv_heads * head_dim * k_cache.element_size()
        row.gbps = kv_bytes / (row.graph_ms or row.kernel_ms) / 1e6
    return row


PREFILL_CASES = {  # name: (q_lens, seq_lens)
    "1x2048 new": ([2048], [2048]),
    "4x512 new +1536 cached": ([512] * 4, [2048] * 4),
    "1x1024 chunk +31 decodes": ([1024] + [1] * 31, [1024] + [768] * 31),
}


def check_prefill(model: str, case: str, dtype: torch.dtype, reps: int, bench: bool) -> Row:
    heads, kv_heads, head_dim = ATTENTION_MODELS[model]
    q_lens, seq_lens = PREFILL_CASES[case]
    row = Row("prefill", model, case, dtype_name(dtype))
    gen = torch.Generator(device=DEVICE).manual_seed(len(q_lens))
    lens = torch.tensor(seq_lens, device=DEVICE, dtype=torch.int32)
    k_cache, v_cache, tables = paged_cache(lens, kv_heads, head_dim, -(-max(seq_lens) // BLOCK_SIZE), dtype, gen)
    starts = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), device=DEVICE, dtype=torch.int32)
    q = torch.randn(sum(q_lens), heads, head_dim, device=DEVICE, dtype=dtype, generator=gen)
    args = (q, k_cache, v_cache, tables, starts, lens, head_dim ** -0.5, max(q_lens), max(seq_lens))
    row.max_abs_err, row.rel_err = errors(prefill_attention_triton(*args), prefill_attention_reference(*args))
    if bench:
        row.kernel_ms = cuda_time_ms(lambda: prefill_attention_triton(*args), reps)
        row.ref_ms = cuda_time_ms(lambda: prefill_attention_reference(*args), max(3, reps // 5))
    return row


def check_moe(model: str, num_tokens: int, dtype: torch.dtype, reps: int, bench: bool) -> list[Row]:
    experts, topk, hidden, inter = MOE_MODELS[model]
    gen = torch.Generator(device=DEVICE).manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, device=DEVICE, generator=gen).to(dtype)
    logits = torch.randn(num_tokens, experts, device=DEVICE, generator=gen)
    weights, ids = torch.softmax(logits, dim=-1).topk(topk, dim=-1)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=DEVICE, generator=gen) * hidden ** -0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=DEVICE, generator=gen) * inter ** -0.5).to(dtype)
    args = (x, ids, weights.to(dtype), w13, w2)
    ref = moe_experts_reference(*args)
    ref_ms = cuda_time_ms(lambda: moe_experts_reference(*args), max(3, reps // 5)) if bench else None
    rows = []
    for name, fn in (("moe_grouped", moe_experts_grouped), ("moe_dense_fallback", moe_experts_dense)):
        row = Row(name, model, f"T={num_tokens}", dtype_name(dtype), ref_ms=ref_ms)
        row.max_abs_err, row.rel_err = errors(fn(*args), ref)
        if bench:
            row.kernel_ms = cuda_time_ms(lambda: fn(*args), reps)
            record_graph_time(row, lambda: fn(*args), reps)
        rows.append(row)
    return rows


def guarded(make: Callable[[], Row | list[Row]], fallback: Row) -> list[Row]:
    """Run one check; a failure becomes a row with its error instead of ending the run."""
    try:
        result = make()
        rows = result if isinstance(result, list) else [result]
        for row in rows:  # progress survives a run cut short by a time limit
            print(row, flush=True)
        return rows
    except Exception as exc:  # noqa: BLE001  (report every failure, keep checking the rest)
        traceback.print_exc()
        fallback.note = f"{type(exc).__name__}: {str(exc)[:120]}"
        return [fallback]
    finally:
        torch.cuda.empty_cache()


def all_checks(reps: int, quick: bool) -> list[Row]:
    batches, contexts, token_counts = ([1, 64], [512], [64, 4096]) if quick else ([1, 64, 256], [512, 2048], [64, 256, 4096])
    rows: list[Row] = []
    bf16 = torch.bfloat16
    for model in ATTENTION_MODELS:
        for batch in batches:
            for context in contexts:
                rows += guarded(lambda: check_decode(model, batch, context, bf16, reps, True),
                                Row("paged_decode", model, f"B={batch} ctx<={context}", "bfloat16"))
        for dtype in (torch.float16, torch.float32):  # correctness only for the other dtypes
            rows += guarded(lambda: check_decode(model, 64, 512, dtype, reps, False),
                            Row("paged_decode", model, "B=64 ctx<=512", dtype_name(dtype)))
        for case in PREFILL_CASES:
            rows += guarded(lambda: check_prefill(model, case, bf16, reps, True), Row("prefill", model, case, "bfloat16"))
        rows += guarded(lambda: check_prefill(model, "4x512 new +1536 cached", torch.float16, reps, False),
                        Row("prefill", model, "4x512 new +1536 cached", "float16"))
    for model in MOE_MODELS:
        for num_tokens in token_counts:
            rows += guarded(lambda: check_moe(model, num_tokens, bf16, reps, True),
                            Row("moe", model, f"T={num_tokens}", "bfloat16"))
        rows += guarded(lambda: check_moe(model, 256, torch.float16, reps, False),
                        Row("moe", model, "T=256", "float16"))
    return rows


def fmt(value: float | None, spec: str) -> str:
    width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
    return format("-", f">{width}") if value is None else format(value, spec)


def print_table(rows: list[Row]) -> None:
    header = f"{'kernel':<19} {'model':<14} {'shape':<25} {'dtype':<8} {'max_err':>9} {'rel_err':>9} " \
             f"{'eager_ms':>9} {'graph_ms':>9} {'ref_ms':>9} {'speedup':>8} {'GB/s':>7}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        speedup = r.ref_ms / r.kernel_ms if r.ref_ms and r.kernel_ms else None
        print(f"{r.kernel:<19} {r.model:<14} {r.shape:<25} {r.dtype:<8} {fmt(r.max_abs_err, '9.2e')} "
              f"{fmt(r.rel_err, '9.2e')} {fmt(r.kernel_ms, '9.3f')} {fmt(r.graph_ms, '9.3f')} {fmt(r.ref_ms, '9.3f')} "
              f"{fmt(speedup, '8.1f')} {fmt(r.gbps, '7.0f')}  {r.note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, help="write the rows as JSON here")
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per kernel")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: gpu_check_kernels.py needs a CUDA GPU (exit status 2: nothing checked)", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    rows = all_checks(args.reps, args.quick)
    if args.output:
        payload = {"device": device, "torch": torch.__version__, "rows": [dataclasses.asdict(r) for r in rows]}
        args.output.write_text(json.dumps(payload, indent=1))
    print(f"\n{device}, torch {torch.__version__}")
    print_table(rows)
    return 1 if any(r.note for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
