#!/usr/bin/env python
"""Tune the fused MoE kernels' tiles on this GPU and write them as data files.

For each model shape and token count: for every candidate ``block_m``, the gate/up and the
down GEMM are tuned separately over a pruned tile list (timed as CUDA-graph replays, each
candidate's output checked against ``moe_experts_reference``), then the best combination
is timed end to end and compared with the shape heuristic and ``torch._grouped_mm`` (the
path ``moe_experts_grouped`` took before the fused kernel, on sm90 bf16).

    python tools/tune_fused_moe.py --time-budget 240 --report docs/bench/fused_moe_h200.json

Writes ``inference/kernels/configs/fused_moe/E=..,H=..,I=..,dtype=bfloat16,device=<gpu>.json``
(or ``--config-dir``) with the buckets it tuned, and a report with every measurement. Kernels
are compiled first by ``--jobs`` worker processes (Triton's disk cache), then token counts
are tuned in priority order (decode sizes first) until ``--time-budget`` seconds have passed.

Small-batch path (``tools/fused_moe_small_tuning.py``): at ``--small-tokens`` (default
1,2,4,8) the two small-batch kernels' tiles are tuned too and the whole small path is timed
against the aligned path (this run's tuned tiles for that token count, else the tiles the
lookup would use); the crossover goes into each file's ``small_batch`` object. A file
rewritten without those measurements loses its ``small_batch`` (the default threshold
applies). ``--small-only`` measures just that and adds it to the existing files, keeping
their aligned tiles:

    python tools/tune_fused_moe.py --small-only --shapes olmoe-1b-7b,qwen3-30b-a3b
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from inference.kernels import fused_moe as fm
from inference.kernels import fused_moe_configs as cfgs
from inference.kernels.moe_grouped import moe_experts_grouped_mm, moe_experts_reference
from tools import fused_moe_small_tuning as small
from tools.decode_profile import capture_graph, cuda_ms, gpu_slug

SHAPES = {"olmoe-1b-7b": (64, 8, 2048, 1024), "qwen3-30b-a3b": (128, 8, 2048, 768),  # E, topk, H, I
          "moonlight-16b-a3b": (64, 6, 2048, 1408)}
# Decode batch sizes first: they matter most and are cheapest to tune.
TOKENS = (64, 256, 1, 16, 128, 32, 8192, 4096, 1024, 2048, 512, 8, 4, 2, 24, 48, 96, 192, 384)
QUICK_TOKENS = (64, 256, 1, 16, 4096, 8192, 1024)
TILES = {  # block_m: (block_n, block_k, num_warps, num_stages, group_m)
    16: [(32, 128, 4, 4, 1), (64, 64, 4, 4, 1), (64, 128, 4, 3, 1), (64, 128, 4, 4, 1), (64, 256, 4, 3, 1),
         (128, 64, 4, 4, 1), (128, 128, 4, 3, 1), (128, 128, 8, 3, 1), (32, 256, 4, 3, 1), (64, 64, 4, 5, 1)],
    32: [(64, 64, 4, 4, 1), (64, 128, 4, 3, 1), (64, 128, 4, 4, 1), (128, 64, 4, 4, 1), (128, 128, 8, 3, 1),
         (128, 128, 4, 3, 1), (64, 256, 4, 3, 1)],
    64: [(64, 64, 4, 4, 8), (64, 128, 4, 3, 8), (128, 64, 4, 3, 8), (128, 64, 8, 4, 8), (128, 128, 8, 3, 8),
         (256, 64, 8, 3, 8), (128, 64, 4, 4, 1)],
    128: [(64, 64, 4, 4, 8), (128, 64, 8, 3, 8), (128, 64, 4, 3, 8), (128, 128, 8, 3, 8), (256, 64, 8, 3, 8),
          (64, 128, 8, 3, 8)],
}
REL_TOL = 2e-2   # bf16 outputs against the fp32-accumulated reference, relative to max |ref|


def block_m_candidates(num_tokens: int, topk: int, num_experts: int) -> list[int]:
    pairs_per_expert = num_tokens * topk / num_experts
    for bound, bms in ((4, [16]), (24, [16, 32]), (96, [16, 32, 64]), (384, [32, 64, 128])):
        if pairs_per_expert <= bound:
            return bms
    return [64, 128]


def tile_candidates(block_m: int, weight_tiles: int, smem: int) -> list[cfgs.GemmTiles]:
    out = []
    for n, k, warps, stages, group in TILES[block_m]:
        tiles = cfgs.GemmTiles(n, k, group, warps, stages)
        if cfgs.smem_estimate(block_m, tiles, weight_tiles, 2) <= smem - 4096:
            out.append(tiles)
    return out


def precompile(job: tuple) -> list[tuple[int, dict, str, str | None]]:
    """Worker: launch every (block_m, tiles) of ``job`` once on a small problem with the
    real H and I, so Triton's disk cache holds the kernels; returns launch errors."""
    hidden, inter, topk, items = job
    device = "cuda" if torch.cuda.is_available() else "cpu"   # cpu: the interpreter (tests)
    x = torch.randn(64, hidden, device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, 8, (64, topk), device=device)
    weights = torch.rand(64, topk, device=device)
    w13 = torch.randn(8, 2 * inter, hidden, device=device, dtype=torch.bfloat16)
    w2 = torch.randn(8, hidden, inter, device=device, dtype=torch.bfloat16)
    errors = []
    for block_m, tiles_dict in items:
        tiles = cfgs.GemmTiles(**tiles_dict)
        layout = fm.align_pairs(ids, 8, block_m)
        h = None
        for kernel in ("gate_up", "down"):
            try:
                if kernel == "gate_up":
                    h = fm.gate_up_swiglu(x, w13, layout, tiles)
                else:
                    fm.down_weighted(h if h is not None else torch.zeros(layout.sorted_ids.shape[0], inter,
                                     device=device, dtype=torch.bfloat16), w2, weights, layout, tiles)
                if device == "cuda":
                    torch.cuda.synchronize()
                errors.append((block_m, tiles_dict, kernel, None))
            except Exception as exc:  # noqa: BLE001  (out of resources etc.: that candidate is dropped)
                errors.append((block_m, tiles_dict, kernel, f"{type(exc).__name__}: {str(exc)[:120]}"))
    return errors


def precompile_all(shape: tuple, smem: int, jobs: int) -> set[tuple[int, cfgs.GemmTiles, str]]:
    """(block_m, tiles, kernel) that failed to compile or launch; empty if the pool fails."""
    _, topk, hidden, inter = shape
    items = sorted({(bm, t) for bm in TILES for w in (1, 2) for t in tile_candidates(bm, w, smem)},
                   key=lambda it: (it[0], dataclasses.astuple(it[1])))
    if jobs <= 0:
        return set()
    chunks = [items[i::jobs] for i in range(jobs)]
    failed = set()
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            args = [(hidden, inter, topk, [(bm, dataclasses.asdict(t)) for bm, t in chunk]) for chunk in chunks if chunk]
            for result in pool.map(precompile, args):
                failed |= {(bm, cfgs.GemmTiles(**t), k) for bm, t, k, err in result if err is not None}
    except Exception as exc:  # noqa: BLE001  (fall back to compiling on first use)
        print(f"precompile pool failed ({type(exc).__name__}: {exc}); compiling serially", flush=True)
    return failed


def graph_ms(fn, num_tokens: int) -> float:
    """Median time of one ``fn()`` from CUDA-graph replays of several back-to-back calls."""
    calls = 20 if num_tokens <= 256 else 5 if num_tokens <= 2048 else 2
    graph = capture_graph(fn, calls)
    times = cuda_ms(graph.replay, reps=5, warmup=1)
    del graph
    return statistics.median(times) / calls


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-6)


def make_weights(shape: tuple, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    num_experts, _, hidden, inter = shape
    gen = torch.Generator(device=device).manual_seed(0)
    return ((torch.randn(num_experts, 2 * inter, hidden, device=device, generator=gen) * hidden ** -0.5).bfloat16(),
            (torch.randn(num_experts, hidden, inter, device=device, generator=gen) * inter ** -0.5).bfloat16())


def make_problem(shape: tuple, num_tokens: int, weights: tuple):
    """Random bf16 activations and softmax top-k routing on the weights' device."""
    num_experts, topk, hidden, _ = shape
    device = weights[0].device
    gen = torch.Generator(device=device).manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, device=device, generator=gen).bfloat16()
    logits = torch.randn(num_tokens, num_experts, device=device, generator=gen)
    topk_weights, topk_ids = torch.softmax(logits, dim=-1).topk(topk, dim=-1)
    return x, topk_ids, topk_weights, *weights


def tune_gemm(kind: str, problem, layout, candidates, failed, ref, num_tokens, fixed: dict) -> tuple:
    """Best tiles of one GEMM for ``layout``; every candidate's full output is checked."""
    x, ids, topk_weights, w13, w2 = problem
    best, best_ms, bad = None, float("inf"), []
    for tiles in candidates:
        if (layout.block_m, tiles, kind) in failed:
            continue
        try:
            h = fm.gate_up_swiglu(x, w13, layout, tiles) if kind == "gate_up" else fixed["h"]
            dn = fixed["down"] if kind == "gate_up" else tiles
            y = fm.down_weighted(h, w2, topk_weights, layout, dn).view(num_tokens, -1, x.shape[1]).sum(1)
            err = rel_err(y, ref)
            if err > REL_TOL:
                bad.append(f"{kind} bm={layout.block_m} {tiles}: rel err {err:.2e}")
                continue
            fn = ((lambda t=tiles: fm.gate_up_swiglu(x, w13, layout, t)) if kind == "gate_up"
                  else (lambda t=tiles: fm.down_weighted(fixed["h"], w2, topk_weights, layout, t)))
            ms = graph_ms(fn, num_tokens)
        except Exception as exc:  # noqa: BLE001  (a tile that cannot launch here is skipped)
            bad.append(f"{kind} bm={layout.block_m} {tiles}: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        if ms < best_ms:
            best, best_ms = tiles, ms
    return best, best_ms, bad


def tune_bucket(name: str, shape: tuple, num_tokens: int, weights: tuple, smem: int, failed: set) -> dict:
    num_experts, topk, hidden, inter = shape
    problem = make_problem(shape, num_tokens, weights)
    x, ids, topk_weights, w13, w2 = problem
    ref = moe_experts_reference(*problem)
    heuristic = cfgs.default_config(num_tokens, topk, num_experts, torch.bfloat16, smem)
    row = {"shape": name, "tokens": num_tokens, "problems": []}
    row["heuristic_ms"] = graph_ms(lambda: fm.fused_moe_experts(*problem, config=heuristic), num_tokens)
    row["heuristic_rel_err"] = rel_err(fm.fused_moe_experts(*problem, config=heuristic), ref)
    try:
        row["grouped_mm_ms"] = graph_ms(lambda: moe_experts_grouped_mm(*problem), num_tokens)
        row["grouped_mm_rel_err"] = rel_err(moe_experts_grouped_mm(*problem), ref)
    except Exception as exc:  # noqa: BLE001  (not sm90, or no torch._grouped_mm)
        row["grouped_mm_ms"], row["grouped_mm_error"] = None, f"{type(exc).__name__}: {exc}"
    best = None
    for block_m in block_m_candidates(num_tokens, topk, num_experts):
        layout = fm.align_pairs(ids, num_experts, block_m)
        fixed = {"down": heuristic.down}
        gu, _, bad1 = tune_gemm("gate_up", problem, layout, tile_candidates(block_m, 2, smem), failed, ref,
                                num_tokens, fixed)
        if gu is None:
            row["problems"] += bad1
            continue
        fixed = {"h": fm.gate_up_swiglu(x, w13, layout, gu)}
        dn, _, bad2 = tune_gemm("down", problem, layout, tile_candidates(block_m, 1, smem), failed, ref,
                                num_tokens, fixed)
        row["problems"] += bad1 + bad2
        if dn is None:
            continue
        config = cfgs.FusedMoEConfig(block_m, gu, dn)
        ms = graph_ms(lambda: fm.fused_moe_experts(*problem, config=config), num_tokens)
        if best is None or ms < best[1]:
            best = (config, ms)
    if best is None or best[1] > row["heuristic_ms"]:
        best = (heuristic, row["heuristic_ms"])   # never ship a config slower than the default
    row["config"], row["tuned_ms"] = best[0].to_dict(), best[1]
    row["tuned_rel_err"] = rel_err(fm.fused_moe_experts(*problem, config=best[0]), ref)
    if row["tuned_rel_err"] > REL_TOL:
        row["problems"].append(f"tuned config rel err {row['tuned_rel_err']:.2e}")
    return row


def tune_small(name: str, shape: tuple, num_tokens: int, weights: tuple, rows: list[dict], config_dir: Path) -> dict:
    """One small-batch bucket, against the aligned tiles this run tuned for ``num_tokens``
    (else those ``config_dir``'s file or the heuristic gives)."""
    num_experts, topk, hidden, inter = shape
    problem = make_problem(shape, num_tokens, weights)
    tuned = [r["config"] for r in rows if r["shape"] == name and r["tokens"] == num_tokens and "config" in r]
    aligned = (cfgs.FusedMoEConfig.from_dict(tuned[0]) if tuned else
               cfgs.select_config(num_tokens, topk, num_experts, hidden, inter, torch.bfloat16, weights[0].device,
                                  config_dir))
    return small.tune_small_bucket(name, problem, moe_experts_reference(*problem), aligned, graph_ms, rel_err, REL_TOL)


def write_configs(rows: list[dict], config_dir: Path, device: str, meta: dict,
                  small_rows: list[dict] = ()) -> list[str]:
    """One file per shape with tuned rows; small-batch rows alone update an existing file's
    ``small_batch`` and keep its aligned tiles and meta."""
    written = []
    for name, (num_experts, _, hidden, inter) in SHAPES.items():
        mine = sorted((r for r in rows if r["shape"] == name and "config" in r and r["tuned_rel_err"] <= REL_TOL),
                      key=lambda r: r["tokens"])
        small_batch = small.small_batch_field([r for r in small_rows if r["shape"] == name], meta, REL_TOL)
        path = config_dir / cfgs.config_file_name(num_experts, hidden, inter, torch.bfloat16, device)
        if mine:
            configs = {str(r["tokens"]): {**r["config"], "fused_ms": round(r["tuned_ms"], 5),
                                          "grouped_mm_ms": r["grouped_mm_ms"] and round(r["grouped_mm_ms"], 5)}
                       for r in mine}
            data = {"meta": meta, "configs": configs}
        elif small_batch is not None and path.is_file():
            data = json.loads(path.read_text())
        else:
            continue
        if small_batch is not None:
            data["small_batch"] = small_batch
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
        written.append(str(path))
    cfgs.load_tuned_file.cache_clear()
    cfgs.load_small_batch.cache_clear()
    return written


def work_list(tokens: list[int], small_tokens: list[int], small_only: bool) -> list[tuple[str, int]]:
    """("aligned" | "small", tokens) in priority order: a small bucket right after the
    aligned bucket of the same size (it compares against those tiles); small sizes not
    tuned on the aligned side first (they are decode sizes)."""
    if small_only:
        return [("small", t) for t in small_tokens]
    work = [("small", t) for t in small_tokens if t not in tokens]
    for t in tokens:
        work += [("aligned", t)] + ([("small", t)] if t in small_tokens else [])
    return work


def run_buckets(names: list[str], work: list[tuple[str, int]], weights: dict, smem: int, failed: set,
                config_dir: Path, start: float, budget: float) -> tuple[list[dict], list[dict], list[str]]:
    """Tune ``work`` in order for every shape until ``budget`` seconds after ``start``."""
    rows, small_rows, skipped = [], [], []
    for kind, t in work:
        for name in names:
            if time.perf_counter() - start > budget:
                skipped.append(f"{name} T={t}" + (" small" if kind == "small" else ""))
                continue
            out = small_rows if kind == "small" else rows
            try:
                out.append(tune_small(name, SHAPES[name], t, weights[name], rows, config_dir)
                           if kind == "small" else tune_bucket(name, SHAPES[name], t, weights[name], smem, failed))
            except Exception as exc:  # noqa: BLE001  (report it; other buckets go on)
                out.append({"shape": name, "tokens": t, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            r = out[-1]
            if kind == "small":
                print(f"{name} T={t}: small {fmt(r.get('small_ms'), '.4f')} ms, aligned "
                      f"{fmt(r.get('aligned_ms'), '.4f')} {r.get('error', '')}", flush=True)
            else:
                print(f"{name} T={t}: tuned {fmt(r.get('tuned_ms'), '.4f')} ms, heuristic "
                      f"{fmt(r.get('heuristic_ms'), '.4f')}, grouped_mm {fmt(r.get('grouped_mm_ms'), '.4f')} "
                      f"{r.get('error', '')}", flush=True)
            torch.cuda.empty_cache()
    return rows, small_rows, skipped


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict], device: str) -> None:
    print(f"\nfused MoE on {device}, bf16, ms per layer call (CUDA-graph replay); grouped_mm = main's path on sm90")
    head = f"{'shape':<14} {'T':>5} {'tuned':>8} {'heuristic':>9} {'grouped_mm':>10} {'vs gmm':>7} {'vs heur':>7} {'err':>8}  config"
    print(head + "\n" + "-" * len(head))
    for r in sorted(rows, key=lambda r: (r["shape"], r["tokens"])):
        c = r.get("config")
        tiles = (f"m{c['block_m']} gu{c['gate_up']['block_n']}x{c['gate_up']['block_k']}w{c['gate_up']['num_warps']}"
                 f"s{c['gate_up']['num_stages']} dn{c['down']['block_n']}x{c['down']['block_k']}"
                 f"w{c['down']['num_warps']}s{c['down']['num_stages']}") if c else r.get("error", "")
        gmm = r.get("grouped_mm_ms")
        print(f"{r['shape']:<14} {r['tokens']:>5} {fmt(r.get('tuned_ms'), '8.4f')} {fmt(r.get('heuristic_ms'), '9.4f')} "
              f"{fmt(gmm, '10.4f')} {fmt(gmm / r['tuned_ms'] if gmm and r.get('tuned_ms') else None, '7.2f')} "
              f"{fmt(r['heuristic_ms'] / r['tuned_ms'] if r.get('tuned_ms') else None, '7.2f')} "
              f"{fmt(r.get('tuned_rel_err'), '8.1e')}  {tiles}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    p.add_argument("--tokens", default=None, help="comma list of token counts (default: 1..8192, decode first)")
    p.add_argument("--quick", action="store_true", help=f"tokens {QUICK_TOKENS}")
    p.add_argument("--time-budget", type=float, default=270.0, help="seconds; later buckets are skipped")
    p.add_argument("--jobs", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)), help="compile workers")
    p.add_argument("--config-dir", type=Path, default=cfgs.CONFIG_DIR)
    p.add_argument("--report", type=Path, default=None,
                   help="default docs/bench/fused_moe_<gpu>.json (fused_moe_small_<gpu>.json with --small-only)")
    p.add_argument("--small-tokens", default=",".join(map(str, small.SMALL_TOKENS)),
                   help="token counts timed on the small-batch path too ('' for none)")
    p.add_argument("--small-only", action="store_true", help="only the small-batch path; keep the files' aligned tiles")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_fused_moe needs a CUDA GPU", file=sys.stderr)
        return 2
    start = time.perf_counter()
    names = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in names if s not in SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; choose from {list(SHAPES)}")
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else list(QUICK_TOKENS if args.quick else TOKENS)
    small_tokens = [int(t) for t in args.small_tokens.split(",") if t]
    device = cfgs.device_name(torch.cuda.current_device())
    smem = cfgs.shared_memory_bytes(torch.cuda.current_device())
    failed = set() if args.small_only else precompile_all(SHAPES[names[0]], smem, args.jobs)
    print(f"precompiled in {time.perf_counter() - start:.0f} s ({len(failed)} tile/kernel pairs cannot launch)", flush=True)
    weights = {name: make_weights(SHAPES[name]) for name in names}
    rows, small_rows, skipped = run_buckets(names, work_list(tokens, small_tokens, args.small_only), weights, smem,
                                            failed, args.config_dir, start, args.time_budget)
    import triton
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": "python tools/tune_fused_moe.py " + " ".join(argv or sys.argv[1:])}
    written = write_configs(rows, args.config_dir, device, meta, small_rows)
    kind = "fused_moe_small" if args.small_only else "fused_moe"   # keep the full run's report
    report_path = args.report or Path("docs/bench") / f"{kind}_{gpu_slug(meta['device'])}.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps({"meta": meta, "config_files": written, "skipped": skipped,
                                       "seconds": time.perf_counter() - start, "rows": rows,
                                       "small_rows": small_rows}, indent=1) + "\n")
    if rows:
        print_table(rows, meta["device"])
    small.print_small_table(small_rows)
    for name in names:
        field = small.small_batch_field([r for r in small_rows if r["shape"] == name], meta, REL_TOL)
        if field is not None:
            print(f"{name}: small-batch path up to {field['max_tokens']} tokens")
    print(f"\nwrote {', '.join(written) or 'no config files'}; report {report_path}; "
          f"{time.perf_counter() - start:.0f} s; skipped {len(skipped)} buckets")
    every = rows + small_rows
    problems = [p for r in every for p in r.get("problems", [])] + [r["error"] for r in every if "error" in r]
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if any("rel err" in p for p in problems) or any("error" in r for r in every) else 0


if __name__ == "__main__":
    sys.exit(main())
