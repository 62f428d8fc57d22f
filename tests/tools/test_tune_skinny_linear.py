"""The skinny GEMM tuner's logic on CPU: the projection shapes from the presets, the two
sweep stages per path, the choice of the best launch, the per-step sums, and one whole
sweep through the Triton interpreter with a fake clock (every launch it times must be
correct, stage two must refine stage one's best tile, and it must pick the fastest)."""

from __future__ import annotations

import itertools

import pytest
import torch

from inference.kernels.skinny_linear import SkinnyLaunch
from tests.inference.kernels.harness import assert_interpreter_checks_pass, needs_triton, run_interpreter_checks
from tools import tune_skinny_linear as tune


def test_projection_shapes_come_from_the_presets():
    assert tune.model_shapes("olmoe-1b-7b") == {"qkv": (2048, 6144), "o": (2048, 2048)}
    assert tune.model_shapes("qwen3-30b-a3b") == {"qkv": (2048, 5120), "o": (4096, 2048)}
    shapes = tune.shapes_for(["olmoe-1b-7b", "qwen3-30b-a3b"], [1, 16])
    assert [(s.rows, s.model, s.proj) for s in shapes[:4]] == [
        (1, "olmoe-1b-7b", "qkv"), (1, "olmoe-1b-7b", "o"), (1, "qwen3-30b-a3b", "qkv"), (1, "qwen3-30b-a3b", "o")]
    assert len(shapes) == 8 and {s.layers for s in shapes if s.model == "qwen3-30b-a3b"} == {48}


@pytest.mark.parametrize("rows", [1, 4, 8, 16])
def test_stages_cover_each_path_that_applies(rows):
    full, quick = tune.stage_one(rows, quick=False), tune.stage_one(rows, quick=True)
    assert len(set(full)) == len(full) and set(quick) <= set(full) and len(quick) < len(full)
    dot = [launch for launch in full if launch.use_dot]
    assert len(dot) == len(tune.DOT_BLOCK_NS) * len(tune.BLOCK_KS) and all(launch.block_n >= 16 for launch in dot)
    broadcast = [launch for launch in full if not launch.use_dot]
    assert bool(broadcast) == (rows <= tune.BROADCAST_MAX_ROWS)
    assert all(tune._broadcast_rows(rows) * b.block_n * b.block_k <= tune.MAX_BROADCAST_TILE for b in broadcast)
    best = SkinnyLaunch(16, 256, 4, 3, True)
    second = tune.stage_two(best, quick=False)
    assert len(second) == len(tune.WARPS) * len(tune.STAGES) - 1 and best not in second
    assert all((s.block_n, s.block_k, s.use_dot) == (16, 256, True) for s in second)


def _row(ms, block_n, use_dot=True, ok=True):
    return {"ok": ok, "ms": ms, "launch": {"block_n": block_n, "block_k": 128, "num_warps": 4, "num_stages": 3,
                                          "use_dot": use_dot}}


def test_best_row_skips_wrong_or_failed_rows_and_breaks_ties_towards_smaller_tiles():
    rows = [_row(0.5, 32), _row(0.1, 16, ok=False), _row(None, 16, ok=False), _row(0.5, 16), _row(0.2, 8, False)]
    assert tune.best_row(rows, use_dot=True)["launch"]["block_n"] == 16
    assert tune.best_row(rows)["launch"]["block_n"] == 8
    assert tune.best_row(rows, use_dot=False)["ms"] == 0.2
    assert tune.best_row([_row(0.1, 16, ok=False)]) is None


def test_per_step_sums_both_projections_over_the_layers():
    def result(proj, rows, cublas, best):
        return {"model": "m", "proj": proj, "rows": rows, "layers": 10, "cublas_ms": cublas, "weight_bytes": 100,
                "best": None if best is None else {"ms": best}}
    steps = tune.per_step([result("qkv", 1, 0.02, 0.01), result("o", 1, 0.01, 0.005), result("qkv", 2, 0.02, 0.01),
                           result("qkv", 4, 0.02, None), result("o", 4, 0.01, 0.01)])
    assert steps == [{"model": "m", "rows": 1, "layers": 10, "cublas_ms": pytest.approx(0.3),
                      "best_ms": pytest.approx(0.15), "floor_weight_bytes": 2000}]   # rows 2, 4: incomplete


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        tune.parse_args(["--models", "qwen3-30b-a3b,nope"])
    with pytest.raises(SystemExit):
        tune.parse_args(["--rows", "0,1"])
    assert tune.parse_args(["--rows", "1,3"]).rows == [1, 3]
    if not torch.cuda.is_available():
        assert tune.main(["--quick"]) == 2


def check_interpreter_cases() -> int:
    clock = itertools.count(1)
    # A fake clock: later calls look faster, so the sweep must pick its last launch (and
    # cuBLAS, timed first, is the slowest).
    fake = lambda call, reps: (call(), 10.0 / next(clock))[1]  # noqa: E731
    shape = tune.Shape("tiny", "qkv", rows=3, k=48, n=40, layers=2)
    result = tune.sweep_shape(shape, torch.float32, reps=1, quick=False, device="cpu", timer=fake)
    rows = result["launches"]
    assert (result["rows"], result["layers"], result["k"], result["n"]) == (3, 2, 48, 40)
    first = tune.stage_one(3, quick=False)
    assert len(rows) == 1 + len(first) + 2 * (len(tune.WARPS) * len(tune.STAGES) - 1)
    assert all(r["ok"] and r["rel_err"] <= 1e-4 for r in rows), [r for r in rows if not r["ok"]]
    assert result["best"] is rows[-1] and result["best_vs_cublas"] > result["default_vs_cublas"] > 1
    # Stage two of each path keeps the tile stage one found best (its last, by the clock).
    last_dot = [launch for launch in first if launch.use_dot][-1]
    dot_refined = [r["launch"] for r in rows[1 + len(first):] if r["launch"]["use_dot"]]
    assert dot_refined and all((d["block_n"], d["block_k"]) == (last_dot.block_n, last_dot.block_k)
                               for d in dot_refined)
    assert result["best_dot"]["launch"]["use_dot"] and not result["best_broadcast"]["launch"]["use_dot"]
    weight_bytes = 48 * 40 * 4
    assert result["weight_bytes"] == weight_bytes and result["weight_copies"] == tune.MIN_COPIES
    assert all(r["gb_s"] == pytest.approx(weight_bytes / (r["ms"] * 1e-3) / 1e9) for r in rows)
    table = tune.format_table([result], copy_gb_s=1.0).splitlines()
    assert len(table) == 2 and table[1].startswith("tiny qkv M=3") and "broadcast" in table[1]
    return len(rows)


@needs_triton
def test_sweep_checks_every_launch_and_takes_the_fastest_in_interpreter():
    first = tune.stage_one(3, quick=False)
    assert_interpreter_checks_pass(__file__, 1 + len(first) + 2 * (len(tune.WARPS) * len(tune.STAGES) - 1))


if __name__ == "__main__":
    run_interpreter_checks(check_interpreter_cases)
