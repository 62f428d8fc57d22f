"""The small-batch half of ``tools/tune_fused_moe.py``: tiles of the two small-batch kernels
(``inference/kernels/fused_moe_small.py``) per token count, their end-to-end time against
the aligned path's, and the crossover ``max_tokens`` written into the tuned files'
``small_batch`` object (format in ``inference/kernels/fused_moe_configs.py``).

Timing is injected (``time_fn(fn, num_tokens) -> ms``, the tuner's CUDA-graph timer on the
GPU, a fake clock in the CPU tests); ``choose_small_batch_max_tokens`` is the pure decision.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from inference.kernels import fused_moe as fm
from inference.kernels import fused_moe_configs as cfgs
from inference.kernels import fused_moe_small as fms

SMALL_TOKENS = (1, 2, 4, 8)
# (block_n, block_k, num_warps, num_stages). gate/up holds two [block_n, block_k] tiles;
# down holds [topk, block_n, block_k]: its tiles are narrower.
GATE_UP_TILES = [(8, 256, 4, 2), (16, 128, 4, 2), (16, 256, 4, 2), (16, 256, 4, 3), (32, 128, 4, 2),
                 (32, 256, 8, 2), (16, 512, 8, 2), (8, 512, 4, 2)]
DOWN_TILES = [(4, 128, 4, 2), (8, 64, 4, 2), (8, 128, 4, 2), (8, 128, 8, 3), (16, 64, 4, 2), (16, 128, 8, 2),
              (4, 256, 4, 2), (8, 256, 8, 2)]
# The small path must be faster by this factor at a token count to take it: equal times go
# to the aligned path, which was tuned over many more candidates.
SMALL_MARGIN = 1.0

TimeFn = Callable[[Callable[[], object], int], float]


def choose_small_batch_max_tokens(timings: Mapping[int, tuple[float | None, float | None]],
                                  margin: float = SMALL_MARGIN) -> int:
    """The threshold from ``{tokens: (small_ms, aligned_ms)}``: the largest measured token
    count at which the small path beat the aligned one (``small < margin * aligned``) and did
    so at every smaller measured count too; 0 when it lost (or failed) at the smallest.

    Token counts between measured ones follow the smaller neighbour's verdict; the scan
    stops at the first loss or missing measurement (None), so a win further up (noise, or
    a failed aligned run) never extends the threshold past a loss.
    """
    best = 0
    for tokens in sorted(timings):
        small_ms, aligned_ms = timings[tokens]
        if small_ms is None or aligned_ms is None or not small_ms < margin * aligned_ms:
            break
        best = tokens
    return best


def tiles_from(entries) -> list[cfgs.GemvTiles]:
    return [cfgs.GemvTiles(n, k, w, s) for n, k, w, s in entries]


def tune_small_bucket(name: str, problem: list[torch.Tensor], ref: torch.Tensor, aligned: cfgs.FusedMoEConfig,
                      time_fn: TimeFn, rel_err: Callable, rel_tol: float) -> dict:
    """Best small-path tiles for one problem (gate/up first with the heuristic down tiles,
    then down), every candidate's whole output checked against ``ref``; then the small
    path's and the aligned path's (``aligned`` tiles) end-to-end times."""
    x, ids, topk_weights, w13, w2 = problem
    num_tokens, topk = ids.shape
    heuristic = cfgs.default_small_config(topk, x.shape[1], w2.shape[2], x.dtype)
    row = {"shape": name, "tokens": num_tokens, "problems": [], "aligned_config": aligned.to_dict()}

    def checked_ms(config: cfgs.SmallMoEConfig, fn: Callable[[], object]) -> float | None:
        try:
            err = rel_err(fms.small_moe_experts(*problem, config), ref)
            if err > rel_tol:
                row["problems"].append(f"small {config}: rel err {err:.2e}")
                return None
            return time_fn(fn, num_tokens)
        except Exception as exc:  # noqa: BLE001  (a tile that cannot launch here is skipped)
            row["problems"].append(f"small {config}: {type(exc).__name__}: {str(exc)[:80]}")
            return None

    best_gu, best_ms = heuristic.gate_up, float("inf")
    for tiles in tiles_from(GATE_UP_TILES):
        config = cfgs.SmallMoEConfig(tiles, heuristic.down)
        ms = checked_ms(config, lambda c=config: fms.small_gate_up(x, ids, w13, c))
        if ms is not None and ms < best_ms:
            best_gu, best_ms = tiles, ms
    h = fms.small_gate_up(x, ids, w13, cfgs.SmallMoEConfig(best_gu, heuristic.down))
    best_dn, best_ms = heuristic.down, float("inf")
    for tiles in tiles_from(DOWN_TILES):
        config = cfgs.SmallMoEConfig(best_gu, tiles)
        ms = checked_ms(config, lambda c=config: fms.small_down(h, ids, topk_weights, w2, c))
        if ms is not None and ms < best_ms:
            best_dn, best_ms = tiles, ms
    timed = []
    for config in dict.fromkeys([heuristic, cfgs.SmallMoEConfig(best_gu, best_dn)]):
        ms = checked_ms(config, lambda c=config: fms.small_moe_experts(*problem, c))
        if ms is not None:
            timed.append((ms, config != heuristic, config))
    if timed:   # ties go to the heuristic
        ms, _, config = min(timed, key=lambda t: t[:2])
        row.update(small_config=config.to_dict(), small_ms=ms,
                   small_rel_err=rel_err(fms.small_moe_experts(*problem, config), ref))
    row["aligned_ms"] = time_fn(lambda: fm.fused_moe_experts(*problem, config=aligned), num_tokens)
    return row


def small_batch_field(rows: list[dict], meta: dict, rel_tol: float) -> dict | None:
    """The ``small_batch`` object of one shape's tuned file from its small-bucket rows, or
    None when none produced a valid config."""
    ok = {r["tokens"]: r for r in rows if "small_config" in r and r["small_rel_err"] <= rel_tol}
    if not ok:
        return None
    timings = {r["tokens"]: (r["small_ms"] if r["tokens"] in ok else None, r.get("aligned_ms")) for r in rows}
    configs = {str(t): {**r["small_config"], "small_ms": round(r["small_ms"], 5),
                        "aligned_ms": r.get("aligned_ms") and round(r["aligned_ms"], 5)}
               for t, r in sorted(ok.items())}
    return {"max_tokens": choose_small_batch_max_tokens(timings), "date": meta.get("date"),
            "command": meta.get("command"), "configs": configs}


def print_small_table(rows: list[dict]) -> None:
    if not rows:
        return
    print("\nsmall-batch path vs aligned path, ms per layer call (CUDA-graph replay)")
    head = f"{'shape':<14} {'T':>3} {'small':>8} {'aligned':>8} {'speedup':>7}  small tiles (gate/up, down)"
    print(head + "\n" + "-" * len(head))
    for r in sorted(rows, key=lambda r: (r["shape"], r["tokens"])):
        s, a, c = r.get("small_ms"), r.get("aligned_ms"), r.get("small_config")
        tiles = (" ".join(f"{c[k]['block_n']}x{c[k]['block_k']}w{c[k]['num_warps']}s{c[k]['num_stages']}"
                          for k in ("gate_up", "down")) if c else r.get("error", "no valid config"))
        speedup = f"{a / s:7.2f}" if s and a else f"{'-':>7}"
        print(f"{r['shape']:<14} {r['tokens']:>3} {s or 0:8.4f} {a or 0:8.4f} {speedup}  {tiles}")
