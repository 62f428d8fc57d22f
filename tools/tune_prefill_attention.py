#!/usr/bin/env python
"""Sweep the paged prefill attention kernels' tiles on a GPU (issue 14, item 4).

For each shape (model heads x chunk layout) every combination of query rows per program
``block_m``, keys per tile ``block_n``, ``num_warps`` and ``num_stages`` is checked against
the torch reference and timed with CUDA events, for the per-head kernel and, where query
heads share a kv head, for the packed kernel too (``block_m`` rows = block_m // group
tokens x the group's heads); the table shows the default launch, the best one, and both as
a share of the measured bf16 matmul rate (the causal attention's QK^T and PV FLOPs, counted
key by key), then the best packed launch against the best per-head one.

    python tools/tune_prefill_attention.py --output docs/bench/prefill_attention_tuning_h200.json [--quick]
        [--models qwen3-30b-a3b,gpt-oss-20b] [--kernels packed]

Shapes: OLMoE-1B-7B (16 q / 16 kv heads, head_dim 128), Qwen3-30B-A3B (32 / 4, 128),
GPT-OSS-20B (64 / 8, 64; causal, its windowed layers are not tuned here); layouts: the
decode benchmark's 8k prefill step (4 prompts of 2048 tokens) and one 4096-token chunk
after a 4096-token cached prefix (a long prompt's second chunk).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from inference.kernels.prefill_attention import (
    default_prefill_launch,
    packed_by_default,
    prefill_attention_reference,
    prefill_attention_triton,
)
from tools.tune_sweeps import add_sweep_args, run_sweeps

MODELS = {"olmoe-1b-7b": (16, 16, 128), "qwen3-30b-a3b": (32, 4, 128), "gpt-oss-20b": (64, 8, 64)}
LAYOUTS = {"4x2048": ([2048] * 4, [2048] * 4), "4096+4096": ([4096], [8192])}
BLOCK_SIZE = 16
BLOCK_MS = (64, 128)
BLOCK_NS = (32, 64, 128)
WARPS = (4, 8)
STAGES = (1, 2, 3, 4)
KERNELS = ("per-head", "packed")


@dataclass(frozen=True)
class Launch:
    """One kernel configuration; ``None`` fields take the kernel's defaults (``packed``
    None: the packed kernel for grouped 16-bit queries)."""

    block_m: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    packed: bool | None = None


@dataclass
class Shape:
    model: str
    layout: str

    @property
    def heads(self) -> tuple[int, int, int]:
        return MODELS[self.model]

    @property
    def lens(self) -> tuple[list[int], list[int]]:
        return LAYOUTS[self.layout]


def attention_flops(q_lens: list[int], seq_lens: list[int], num_heads: int, head_dim: int) -> int:
    """QK^T and PV FLOPs of causal prefill: each query row attends to the keys up to its own
    position (its request's cached prefix included), 2 FLOPs per multiply-add, two matmuls."""
    keys = 0
    for q_len, seq_len in zip(q_lens, seq_lens):
        ctx = seq_len - q_len
        keys += q_len * ctx + q_len * (q_len + 1) // 2
    return 4 * keys * num_heads * head_dim


def candidate_launches(quick: bool, group: int = 1, kernels: tuple[str, ...] = KERNELS) -> list[Launch]:
    """Every tile x warps x stages combination of the per-head kernel and, for a group
    above 1, of the packed kernel (``block_m`` at least the group), of those ``kernels``
    named; quick: 64 / 128 key tiles, stages 2 / 3."""
    block_ns = (64, 128) if quick else BLOCK_NS
    stages = (2, 3) if quick else STAGES
    variants = [packed for packed, name in ((False, "per-head"), (True, "packed"))
                if name in kernels and (group > 1 or not packed)]
    return [Launch(m, n, w, s, packed) for packed, m, n, w, s in itertools.product(variants, BLOCK_MS, block_ns, WARPS, stages)
            if not packed or m >= group]


def best_launch(timed: list[dict], packed: bool | None = None) -> dict | None:
    """The fastest correct row (ties: smaller tiles, then fewer warps and stages, then the
    per-head kernel); ``packed`` True / False: among that kernel's rows only."""
    ok = [r for r in timed if r["ok"] and r["ms"] is not None and packed in (None, r["launch"]["packed"])]
    if not ok:
        return None
    return min(ok, key=lambda r: (round(r["ms"], 4), *(r["launch"][k] or 0 for k in asdict(Launch()))))


def make_case(shape: Shape, dtype: torch.dtype, seed: int, device: str = "cuda"):
    """Queries, a paged cache with every request's blocks scattered, and the launch metadata."""
    heads, kv_heads, head_dim = shape.heads
    q_lens, seq_lens = shape.lens
    gen = torch.Generator(device=device).manual_seed(seed)
    counts = [-(-s // BLOCK_SIZE) for s in seq_lens]
    num_blocks = sum(counts)
    cache_shape = (num_blocks + 1, BLOCK_SIZE, kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, device=device, dtype=dtype, generator=gen)
    v_cache = torch.randn(cache_shape, device=device, dtype=dtype, generator=gen)
    perm = torch.randperm(num_blocks, device=device, generator=gen).int()
    tables = torch.full((len(seq_lens), max(counts)), num_blocks, dtype=torch.int32, device=device)
    used = 0
    for r, count in enumerate(counts):
        tables[r, :count] = perm[used:used + count]
        used += count
    starts = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), heads, head_dim, device=device, dtype=dtype, generator=gen)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables, query_start_loc=starts,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), scale=head_dim ** -0.5,
                max_query_len=max(q_lens), max_seq_len=max(seq_lens))


def event_ms(fn, reps: int) -> float:
    """Median time of one call over ``reps`` CUDA-event-timed calls (after two warm-ups)."""
    from tools.decode_profile import cuda_ms

    return statistics.median(cuda_ms(fn, reps=reps, warmup=2))


def sweep_shape(shape: Shape, dtype: torch.dtype, reps: int, quick: bool, matmul_flops: float,
                device: str = "cuda", timer=event_ms, kernels: tuple[str, ...] = KERNELS) -> dict:
    """Every launch checked against the reference and timed with ``timer(call, reps)`` (ms
    per call); the CPU tests pass the Triton interpreter's device and a fake clock."""
    args = make_case(shape, dtype, seed=len(shape.layout) * 7 + shape.heads[0], device=device)
    ref = prefill_attention_reference(**args).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    heads, kv_heads, head_dim = shape.heads
    flops = attention_flops(*shape.lens, heads, head_dim)

    def measure(launch: Launch) -> dict:
        def call():
            return prefill_attention_triton(**args, **asdict(launch))
        row = {"launch": asdict(launch), "ok": False, "ms": None, "error": None}
        try:
            err = (call().float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
            row["ok"], row["rel_err"] = err <= tol, err
            if row["ok"]:
                row["ms"] = timer(call, reps)
        except Exception as exc:  # a configuration the compiler or the GPU refuses (e.g. out of resources)
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return row

    group = heads // kv_heads
    rows = [measure(launch) for launch in [Launch()] + candidate_launches(quick, group, kernels)]
    for r in rows:
        r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12 if r["ms"] else None
        r["fraction_of_matmul_rate"] = r["tflops"] * 1e12 / matmul_flops if r["ms"] else None
    default, best = rows[0], best_launch(rows[1:])
    per_head, packed = best_launch(rows[1:], packed=False), best_launch(rows[1:], packed=True)
    default_packed = packed_by_default(group, args["q"].element_size())
    return {"model": shape.model, "layout": shape.layout, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "flops": flops, "default_packed": default_packed,
            "default_launch": default_prefill_launch(head_dim, args["q"].element_size(), args["max_query_len"],
                                                     packed=default_packed, group=group),
            "default": default, "best": best, "best_per_head": per_head, "best_packed": packed,
            "speedup": default["ms"] / best["ms"] if best and default["ms"] else None,
            "packed_speedup": per_head["ms"] / packed["ms"] if per_head and packed else None, "rows": rows}


def format_table(results: list[dict]) -> str:
    """One line per shape: the default and best launches (ms, share of the matmul rate),
    the best per-head and packed launches, and the packed kernel's speedup over per-head."""
    lines = [f"{'shape':<26} {'default ms':>10} {'of peak':>8} {'best ms':>8} {'of peak':>8} {'speedup':>8} "
             f"{'head ms':>8} {'packed ms':>9} {'packed x':>8}  best launch"]
    f = lambda v, spec: format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)  # noqa: E731
    for r in results:
        d, b = r["default"], r["best"] or {}
        launch = b.get("launch", {})
        kernel = {True: "packed", False: "per-head"}.get(launch.get("packed"), "-")
        lines.append(f"{r['model'] + ' ' + r['layout']:<26} {f(d['ms'], '10.3f')} "
                     f"{f(d['fraction_of_matmul_rate'], '8.0%')} {f(b.get('ms'), '8.3f')} "
                     f"{f(b.get('fraction_of_matmul_rate'), '8.0%')} {f(r['speedup'], '8.2f')} "
                     f"{f((r['best_per_head'] or {}).get('ms'), '8.3f')} {f((r['best_packed'] or {}).get('ms'), '9.3f')} "
                     f"{f(r['packed_speedup'], '8.2f')}  {kernel} m={launch.get('block_m')} n={launch.get('block_n')} "
                     f"warps={launch.get('num_warps')} stages={launch.get('num_stages')}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--models", default=list(MODELS), type=csv)
    p.add_argument("--layouts", default=list(LAYOUTS), type=csv)
    add_sweep_args(p, quick_help="64 / 128 tiles, stages 2 / 3")
    p.add_argument("--kernels", default=list(KERNELS), type=csv,
                   help="kernels to sweep (the packed one only where q heads share a kv head)")
    args = p.parse_args(argv)
    for name, given, known in (("--models", args.models, MODELS), ("--layouts", args.layouts, LAYOUTS),
                               ("--kernels", args.kernels, KERNELS)):
        unknown = [x for x in given if x not in known]
        if unknown:
            p.error(f"{name}: unknown {unknown}; choose from {list(known)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_prefill_attention.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from tools.decode_profile import matmul_rate

    dtype = getattr(torch, args.dtype)
    rate = matmul_rate(dtype=dtype)
    shapes = (Shape(m, layout) for m, layout in itertools.product(args.models, args.layouts))
    kernels = tuple(args.kernels)
    results, skipped = run_sweeps(shapes, lambda shape: sweep_shape(shape, dtype, args.reps, args.quick, rate,
                                                                     kernels=kernels),
                                  format_table, args.time_budget, args.output,
                                  {"dtype": args.dtype, "matmul_tflops": rate / 1e12, "block_size": BLOCK_SIZE})
    print(f"bf16 matmul rate {rate / 1e12:.0f} TFLOP/s")
    print(format_table(results))
    if skipped:
        print(f"skipped past the time budget: {len(skipped)} shapes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
