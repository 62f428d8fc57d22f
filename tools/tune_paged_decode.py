#!/usr/bin/env python
"""Sweep the paged decode attention kernel's launch parameters on a GPU (issue 14, item 3).

For each shape (batch, context, q heads, kv heads, head_dim) every combination of context
splits, tile length ``block_n``, ``num_warps`` and ``num_stages`` (and, for MHA shapes,
the element-wise path against ``use_dot``: the query row padded for ``tl.dot``) is checked against the
torch reference and timed as CUDA-graph replays of back-to-back calls; the table shows the
current heuristic's time, the best configuration's, and both as achieved bandwidth over the
KV bytes a step must read (K and V of every context token, once).

    python tools/tune_paged_decode.py --output docs/bench/paged_decode_tuning_h200.json [--quick]

Shapes: OLMoE-1B-7B (16 q / 16 kv heads, head_dim 128: no query groups), Qwen3-30B-A3B
(32 / 4, 128), GPT-OSS-20B (64 / 8, head_dim 64); batches 1 / 16 / 64 / 256; contexts 544
(the decode benchmark's 512 + 32) and 4096. Rows are ragged like real batches (lengths in
[context / 2, context]) and blocks are scattered. The "default" row is the kernel's own
choice for a block table as wide as the context; inside the engine's decode graphs the
table is as wide as the longest context allowed, which can raise its split count.
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

from inference.kernels.paged_decode_triton import (
    MAX_SPLITS,
    choose_num_splits,
    paged_decode_attention_reference,
    paged_decode_attention_triton,
)
from tools.tune_sweeps import add_sweep_args, run_sweeps

MODELS = {"olmoe-1b-7b": (16, 16, 128), "qwen3-30b-a3b": (32, 4, 128), "gpt-oss-20b": (64, 8, 64)}
BLOCK_SIZE = 16
SPLITS = (1, 2, 4, 8, 16, 32)
BLOCK_NS = (16, 32, 64, 128)
WARPS = (2, 4, 8)
STAGES = (1, 2, 3)
CALLS_PER_GRAPH = 10


@dataclass(frozen=True)
class Launch:
    """One kernel configuration; ``None`` fields take the kernel's defaults."""

    num_splits: int | None = None
    block_n: int | None = None
    num_warps: int = 4
    num_stages: int | None = None
    use_dot: bool | None = None


@dataclass
class Shape:
    model: str
    batch: int
    context: int

    @property
    def heads(self) -> tuple[int, int, int]:
        return MODELS[self.model]


def kv_bytes(seq_lens: list[int], kv_heads: int, head_dim: int, element_size: int) -> int:
    """Bytes of K and V a decode step must read: every context token of every row, once."""
    return 2 * sum(seq_lens) * kv_heads * head_dim * element_size


def candidate_launches(context: int, quick: bool, mha: bool = False) -> list[Launch]:
    """First stage of the sweep: context splits x tile lengths at 4 warps and Triton's
    default stages; splits that leave at least one 16-token tile per split. MHA shapes
    (no query groups) try every one of them on both paths (``use_dot`` False and True)."""
    splits = [s for s in SPLITS if s <= MAX_SPLITS and s * 16 <= context]
    block_ns = (32, 64) if quick else BLOCK_NS
    # Named explicitly: None would follow MHA_USE_DOT and stop measuring one path once it flips.
    paths = (False, True) if mha else (None,)
    return [Launch(s, b, use_dot=d) for d, s, b in itertools.product(paths, splits, block_ns)]


def refine_launches(best: Launch, quick: bool) -> list[Launch]:
    """Second stage: the best first-stage launch with every warps x stages pair (the first
    stage ran Triton's default stages, which is not one of them)."""
    if quick:
        return []
    return [Launch(best.num_splits, best.block_n, w, st, best.use_dot) for w, st in itertools.product(WARPS, STAGES)]


def best_launch(timed: list[dict]) -> dict | None:
    """The fastest correct row of a sweep (``ok`` rows only; ties: fewer splits, then
    smaller tiles, so the choice does not flip on noise between equals)."""
    ok = [r for r in timed if r["ok"] and r["ms"] is not None]
    if not ok:
        return None
    return min(ok, key=lambda r: (round(r["ms"], 4), r["launch"]["num_splits"] or 0, r["launch"]["block_n"] or 0))


def make_case(shape: Shape, dtype: torch.dtype, seed: int, device: str = "cuda"):
    heads, kv_heads, head_dim = shape.heads
    gen = torch.Generator(device=device).manual_seed(seed)
    seq_lens = torch.randint(shape.context // 2, shape.context + 1, (shape.batch,), device=device, generator=gen).int()
    max_blocks = -(-shape.context // BLOCK_SIZE)
    num_blocks = shape.batch * max_blocks
    cache_shape = (num_blocks + 1, BLOCK_SIZE, kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, device=device, dtype=dtype, generator=gen)
    v_cache = torch.randn(cache_shape, device=device, dtype=dtype, generator=gen)
    tables = torch.randperm(num_blocks, device=device, generator=gen).view(shape.batch, max_blocks).int()
    q = torch.randn(shape.batch, heads, head_dim, device=device, dtype=dtype, generator=gen)
    return q, k_cache, v_cache, tables, seq_lens, head_dim ** -0.5


def graph_ms(fn, reps: int) -> float:
    """Median per-call time of ``CALLS_PER_GRAPH`` back-to-back calls replayed as a graph."""
    from tools.decode_profile import capture_graph, cuda_ms

    graph = capture_graph(fn, CALLS_PER_GRAPH)
    return statistics.median(cuda_ms(graph.replay, reps)) / CALLS_PER_GRAPH


def sweep_shape(shape: Shape, dtype: torch.dtype, reps: int, quick: bool, device: str = "cuda",
                timer=graph_ms) -> dict:
    """Every launch of the two-stage sweep checked against the reference and timed with
    ``timer(call, reps)`` (ms per call); the CPU tests pass the Triton interpreter's device
    and a fake clock."""
    q, k_cache, v_cache, tables, seq_lens, scale = make_case(shape, dtype, seed=shape.batch * 7 + shape.context,
                                                             device=device)
    args = (q, k_cache, v_cache, tables, seq_lens, scale)
    ref = paged_decode_attention_reference(*args).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    heads, kv_heads, head_dim = shape.heads
    default_splits = choose_num_splits(shape.batch, kv_heads, tables.shape[1], BLOCK_SIZE, q.device,
                                       grouped=heads > kv_heads)

    def measure(launch: Launch) -> dict:
        def call():
            return paged_decode_attention_triton(*args, num_splits=launch.num_splits, block_n=launch.block_n,
                                                 num_warps=launch.num_warps, num_stages=launch.num_stages,
                                                 use_dot=launch.use_dot)
        row = {"launch": asdict(launch), "ok": False, "ms": None, "error": None}
        try:
            err = (call().float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
            row["ok"], row["rel_err"] = err <= tol, err
            if row["ok"]:
                row["ms"] = timer(call, reps)
        except Exception as exc:  # a configuration the compiler or the GPU refuses (e.g. out of resources)
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return row

    rows = [measure(launch) for launch in [Launch()] + candidate_launches(shape.context, quick, mha=heads == kv_heads)]
    first = best_launch(rows[1:])
    # MHA: the two paths side by side, each at its best first-stage launch (same warps and stages).
    paths = {name: best_launch([r for r in rows[1:] if bool(r["launch"]["use_dot"]) == dot])
             for name, dot in (("elementwise", False), ("dot", True))} if heads == kv_heads else {}
    if first is not None:
        rows += [measure(launch) for launch in refine_launches(Launch(**first["launch"]), quick)]
    nbytes = kv_bytes(seq_lens.tolist(), kv_heads, head_dim, k_cache.element_size())
    default, best = rows[0], best_launch(rows[1:])
    for r in rows:
        r["gb_s"] = nbytes / (r["ms"] * 1e-3) / 1e9 if r["ms"] else None
    return {"model": shape.model, "batch": shape.batch, "context": shape.context, "heads": heads,
            "kv_heads": kv_heads, "head_dim": head_dim, "kv_bytes": nbytes, "default_num_splits": default_splits,
            "default": default, "best": best,
            "speedup": default["ms"] / best["ms"] if best and default["ms"] else None,
            "best_ms_by_path": {name: (r["ms"] if r else None) for name, r in paths.items()}, "rows": rows}


def format_table(results: list[dict]) -> str:
    lines = [f"{'shape':<30} {'default ms':>10} {'GB/s':>7} {'best ms':>9} {'GB/s':>7} {'speedup':>8} "
             f"{'dot/elem':>8}  best launch"]
    for r in results:
        d, b = r["default"], r["best"] or {}
        name = f"{r['model']} B={r['batch']} ctx={r['context']}"
        f = lambda v, spec: "-" if v is None else format(v, spec)
        launch = b.get("launch", {})
        paths = r.get("best_ms_by_path") or {}
        # > 1: the tl.dot path's best time is shorter than the element-wise path's (MHA only)
        ratio = paths["elementwise"] / paths["dot"] if paths.get("dot") and paths.get("elementwise") else None
        lines.append(f"{name:<30} {f(d['ms'], '10.4f')} {f(d['gb_s'], '7.0f')} {f(b.get('ms'), '9.4f')} "
                     f"{f(b.get('gb_s'), '7.0f')} {f(r['speedup'], '8.2f')} {f(ratio, '8.2f')}  "
                     f"splits={launch.get('num_splits')} block_n={launch.get('block_n')} "
                     f"warps={launch.get('num_warps')} stages={launch.get('num_stages')} dot={launch.get('use_dot')}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), type=lambda s: [m for m in s.split(",") if m])
    p.add_argument("--batches", default="1,16,64,256", type=lambda s: [int(b) for b in s.split(",")])
    p.add_argument("--contexts", default="544,4096", type=lambda s: [int(c) for c in s.split(",")])
    add_sweep_args(p, quick_help="splits x block_n 32/64 only, 4 warps, default stages")
    args = p.parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_paged_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    shapes = (Shape(m, b, c) for m, b, c in itertools.product(args.models, args.batches, args.contexts))
    results, skipped = run_sweeps(shapes, lambda shape: sweep_shape(shape, dtype, args.reps, args.quick), format_table,
                                  args.time_budget, args.output, {"dtype": args.dtype, "block_size": BLOCK_SIZE})
    print(format_table(results))
    if skipped:
        print(f"skipped past the time budget: {len(skipped)} shapes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
