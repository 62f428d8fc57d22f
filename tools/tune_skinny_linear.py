#!/usr/bin/env python
"""Sweep the skinny GEMM's launch parameters on a GPU against F.linear (cuBLAS).

For each shape (a model's attention projection x decode rows) the sweep runs in two stages
per multiply path (broadcast FMA up to 8 rows, tl.dot at every row count): tiles
``block_n`` x ``block_k`` at 4 warps and 3 stages, then the best tile with every
``num_warps`` x ``num_stages``. Every launch is checked against fp32 F.linear first, then
timed as CUDA-graph replays of back-to-back calls; the calls rotate over enough copies of
the weight to overflow the L2 cache (as a decode step's distinct layers do: a single 20 MB
weight would otherwise stay in the H200's 50 MB L2). The table shows cuBLAS, the kernel's
default launch and the best one, achieved bandwidth over the weight bytes and its share of
the measured copy bandwidth, and the speedup over cuBLAS; the last lines sum each model's
qkv + o projections over its layers (per decode step, at each row count).

    python tools/tune_skinny_linear.py --output docs/bench/skinny_linear_tuning_h200.json --time-budget 240

Shapes (K -> N): OLMoE-1B-7B qkv 2048 -> 6144, o 2048 -> 2048 (16 layers); Qwen3-30B-A3B
qkv 2048 -> 5120, o 4096 -> 2048 (48 layers); rows 1, 2, 4, 8, 16. Shapes are swept rows
first, so a run cut short by the budget keeps the smallest row counts of every projection.
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

import orjson
import torch
import torch.nn.functional as F

from inference.kernels.skinny_linear import BROADCAST_TILE_ELEMENTS, SkinnyLaunch, resolve_launch, skinny_linear_triton
from inference.presets import get_preset
from tools.tune_sweeps import add_sweep_args, run_sweeps

MODELS = {"olmoe-1b-7b": "olmoe-1b-7b-shape", "qwen3-30b-a3b": "qwen3-30b-a3b-shape"}
PROJECTIONS = ("qkv", "o")
ROWS = (1, 2, 4, 8, 16)
BROADCAST_MAX_ROWS = 8          # beyond it the CUDA-core FMAs outlast the weight's load
BROADCAST_BLOCK_NS = (4, 8, 16, 32)
DOT_BLOCK_NS = (16, 32, 64)
BLOCK_KS = (128, 256, 512, 1024)
WARPS = (2, 4, 8)
STAGES = (1, 2, 3, 4)
# Broadcast tiles past this many product elements spill registers at 4 warps: not swept.
MAX_BROADCAST_TILE = 4 * BROADCAST_TILE_ELEMENTS
L2_FLUSH_BYTES = 256 << 20      # weight copies per graph: at least this many bytes, well past any L2
MIN_COPIES = 2


@dataclass(frozen=True)
class Shape:
    model: str
    proj: str
    rows: int
    k: int
    n: int
    layers: int = 1


def model_shapes(model: str) -> dict[str, tuple[int, int]]:
    """(K, N) of the model's qkv_proj and o_proj, from its preset."""
    c = get_preset(MODELS[model])
    q = c.num_heads * c.head_dim
    return {"qkv": (c.hidden_size, q + 2 * c.num_kv_heads * c.head_dim), "o": (q, c.hidden_size)}


def shapes_for(models: list[str], rows: list[int]) -> list[Shape]:
    """Rows outermost (the budget cuts the largest row counts first)."""
    out = []
    for m, model in itertools.product(rows, models):
        layers = get_preset(MODELS[model]).num_layers
        out += [Shape(model, proj, m, k, n, layers) for proj, (k, n) in model_shapes(model).items()]
    return out


def _broadcast_rows(rows: int) -> int:
    return min(1 << max(0, rows - 1).bit_length(), 16)


def stage_one(rows: int, quick: bool) -> list[SkinnyLaunch]:
    """Tiles of each path that applies to ``rows`` at 4 warps, 3 stages (quick: 2 x 2 tiles)."""
    block_ks = (256, 512) if quick else BLOCK_KS
    launches = [SkinnyLaunch(n, k, 4, 3, True) for n, k in itertools.product(DOT_BLOCK_NS[:2] if quick else DOT_BLOCK_NS,
                                                                              block_ks)]
    if rows <= BROADCAST_MAX_ROWS:
        block_ns = (8, 16) if quick else BROADCAST_BLOCK_NS
        launches += [SkinnyLaunch(n, k, 4, 3, False) for n, k in itertools.product(block_ns, block_ks)
                     if _broadcast_rows(rows) * n * k <= MAX_BROADCAST_TILE]
    return launches


def stage_two(best: SkinnyLaunch, quick: bool) -> list[SkinnyLaunch]:
    """The best tile of a path with every warps x stages pair but the one already timed
    (quick: warps 4 / 8 at 2 / 3 stages)."""
    warps, stages = ((4, 8), (2, 3)) if quick else (WARPS, STAGES)
    return [SkinnyLaunch(best.block_n, best.block_k, w, s, best.use_dot) for w, s in itertools.product(warps, stages)
            if (w, s) != (best.num_warps, best.num_stages)]


def best_row(rows: list[dict], use_dot: bool | None = None) -> dict | None:
    """The fastest correct row (of one path, if given); ties: smaller tiles, fewer warps
    and stages, so the choice does not flip on noise between equals."""
    ok = [r for r in rows if r["ok"] and r["ms"] is not None and (use_dot is None or r["launch"]["use_dot"] == use_dot)]
    if not ok:
        return None
    return min(ok, key=lambda r: (round(r["ms"], 5), *(r["launch"][k] for k in ("block_n", "block_k", "num_warps",
                                                                              "num_stages"))))


def graph_ms(fn, reps: int) -> float:
    """Median time of one replay of ``fn`` captured as a CUDA graph."""
    from tools.decode_profile import capture_graph, cuda_ms

    graph = capture_graph(fn)
    return statistics.median(cuda_ms(graph.replay, reps))


def make_case(shape: Shape, dtype: torch.dtype, seed: int, device: str):
    """x [rows, K] and enough weight copies [N, K] to flush the L2 between two uses."""
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_bytes = shape.n * shape.k * torch.empty((), dtype=dtype).element_size()
    copies = max(MIN_COPIES, -(-L2_FLUSH_BYTES // weight_bytes)) if device != "cpu" else MIN_COPIES
    x = torch.randn(shape.rows, shape.k, device=device, generator=gen).to(dtype)
    weights = [(torch.randn(shape.n, shape.k, device=device, generator=gen) / shape.k ** 0.5).to(dtype)
               for _ in range(copies)]
    return x, weights, weight_bytes


def sweep_shape(shape: Shape, dtype: torch.dtype, reps: int, quick: bool, device: str = "cuda",
                timer=graph_ms) -> dict:
    """cuBLAS, the default launch and both stages of every path, each launch checked
    against fp32 F.linear and timed with ``timer(call, reps)`` (ms of one call over all
    weight copies); the CPU tests pass the Triton interpreter's device and a fake clock."""
    x, weights, weight_bytes = make_case(shape, dtype, seed=shape.rows * 31 + shape.n + shape.k, device=device)
    ref = F.linear(x.float(), weights[0].float())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    per_call = 1.0 / len(weights)
    cublas_ms = timer(lambda: [F.linear(x, w) for w in weights], reps) * per_call

    def measure(launch: SkinnyLaunch) -> dict:
        knobs = asdict(launch)
        row = {"launch": knobs, "ok": False, "ms": None, "error": None}
        try:
            out = skinny_linear_triton(x, weights[0], **knobs)
            err = (out.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
            row["ok"], row["rel_err"] = err <= tol, err
            if row["ok"]:
                row["ms"] = timer(lambda: [skinny_linear_triton(x, w, **knobs) for w in weights], reps) * per_call
        except Exception as exc:  # a configuration the compiler or the GPU refuses (e.g. out of resources)
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return row

    rows = [measure(resolve_launch(shape.rows, shape.n, shape.k, dtype))]
    first = [measure(launch) for launch in stage_one(shape.rows, quick)]
    rows += first
    for use_dot in (True, False):
        best = best_row(first, use_dot)
        if best is not None:
            rows += [measure(launch) for launch in stage_two(SkinnyLaunch(**best["launch"]), quick)]
    for r in rows:
        r["gb_s"] = weight_bytes / (r["ms"] * 1e-3) / 1e9 if r["ms"] else None
    default, best = rows[0], best_row(rows[1:])
    speedup = lambda r: cublas_ms / r["ms"] if r and r["ms"] else None  # noqa: E731
    return {**asdict(shape), "weight_bytes": weight_bytes, "weight_copies": len(weights),
            "cublas_ms": cublas_ms, "cublas_gb_s": weight_bytes / (cublas_ms * 1e-3) / 1e9,
            "default": default, "best": best, "best_dot": best_row(rows, True), "best_broadcast": best_row(rows, False),
            "default_vs_cublas": speedup(default), "best_vs_cublas": speedup(best), "launches": rows}


def format_table(results: list[dict], copy_gb_s: float | None = None) -> str:
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [f"{'shape':<28} {'cuBLAS ms':>9} {'default ms':>10} {'best ms':>8} {'GB/s':>6} {'of copy':>7} "
             f"{'vs cuBLAS':>9}  best launch"]
    for r in results:
        b = r["best"] or {}
        launch = b.get("launch", {})
        share = b["gb_s"] / copy_gb_s if copy_gb_s and b.get("gb_s") else None
        path = {True: "dot", False: "broadcast"}.get(launch.get("use_dot"), "-")
        lines.append(f"{r['model'] + ' ' + r['proj'] + ' M=' + str(r['rows']):<28} {r['cublas_ms']:9.4f} "
                     f"{f(r['default']['ms'], '10.4f')} {f(b.get('ms'), '8.4f')} {f(b.get('gb_s'), '6.0f')} "
                     f"{f(share, '7.0%')} {f(r['best_vs_cublas'], '9.2f')}  {path} n={launch.get('block_n')} "
                     f"k={launch.get('block_k')} warps={launch.get('num_warps')} stages={launch.get('num_stages')}")
    return "\n".join(lines)


def per_step(results: list[dict]) -> list[dict]:
    """Per model and row count where every projection was measured: the attention
    projections of one decode step (qkv + o, times the layers), cuBLAS vs the best launch."""
    out = []
    for (model, rows), group in itertools.groupby(sorted(results, key=lambda r: (r["model"], r["rows"])),
                                                  key=lambda r: (r["model"], r["rows"])):
        group = list(group)
        if len(group) != len(PROJECTIONS) or any(r["best"] is None for r in group):
            continue
        layers = group[0]["layers"]
        out.append({"model": model, "rows": rows, "layers": layers,
                    "cublas_ms": layers * sum(r["cublas_ms"] for r in group),
                    "best_ms": layers * sum(r["best"]["ms"] for r in group),
                    "floor_weight_bytes": layers * sum(r["weight_bytes"] for r in group)})
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=list(MODELS), type=lambda s: [m for m in s.split(",") if m])
    p.add_argument("--rows", default=list(ROWS), type=lambda s: [int(m) for m in s.split(",") if m])
    add_sweep_args(p, quick_help="2 x 2 tiles per path, warps 4 / 8 x stages 2 / 3")
    args = p.parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    if any(m < 1 for m in args.rows):
        p.error(f"--rows must be >= 1, got {args.rows}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_skinny_linear.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from tools.decode_profile import copy_bandwidth

    dtype = getattr(torch, args.dtype)
    copy_gb_s = copy_bandwidth() / 1e9
    results, skipped = run_sweeps(shapes_for(args.models, args.rows),
                                  lambda shape: sweep_shape(shape, dtype, args.reps, args.quick),
                                  lambda rs: format_table(rs, copy_gb_s), args.time_budget, args.output,
                                  {"dtype": args.dtype, "copy_gb_s": copy_gb_s, "l2_flush_bytes": L2_FLUSH_BYTES})
    steps = per_step(results)
    if args.output:
        report = orjson.loads(args.output.read_bytes())
        args.output.write_bytes(orjson.dumps({**report, "per_step": steps}, option=orjson.OPT_INDENT_2))
    print(f"copy bandwidth {copy_gb_s:,.0f} GB/s")
    print(format_table(results, copy_gb_s))
    for s in steps:
        floor = s["floor_weight_bytes"] / (copy_gb_s * 1e9) * 1e3
        print(f"{s['model']} M={s['rows']}: qkv + o x {s['layers']} layers per step: cuBLAS {s['cublas_ms']:.3f} ms, "
              f"best {s['best_ms']:.3f} ms, weight floor {floor:.3f} ms at copy bandwidth")
    if skipped:
        print(f"skipped past the time budget: {len(skipped)} shapes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
