"""The paged decode tuner's logic on CPU: the sweep's candidates, the choice of the best
launch, the bytes floor, and one whole sweep through the Triton interpreter with a fake
clock (every launch it times must be correct, and it must pick the fastest)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from tests.inference.kernels.harness import assert_interpreter_checks_pass, needs_triton, run_interpreter_checks
from tools import tune_paged_decode as tune


def test_kv_bytes_counts_k_and_v_of_every_context_token_once():
    assert tune.kv_bytes([3, 5], kv_heads=4, head_dim=128, element_size=2) == 2 * 8 * 4 * 128 * 2


def test_candidates_leave_a_tile_per_split_and_refinement_varies_warps_and_stages():
    launches = tune.candidate_launches(context=64, quick=False)
    assert {launch.num_splits for launch in launches} == {1, 2, 4}
    assert {launch.block_n for launch in launches} == set(tune.BLOCK_NS)
    assert len(launches) == 3 * len(tune.BLOCK_NS)
    best = tune.Launch(2, 64)
    refined = tune.refine_launches(best, quick=False)
    assert len(refined) == len(tune.WARPS) * len(tune.STAGES) and best not in refined
    assert all((r.num_splits, r.block_n) == (2, 64) for r in refined)
    assert tune.refine_launches(best, quick=True) == []
    mha = tune.candidate_launches(context=64, quick=False, mha=True)
    # Both paths named explicitly: use_dot=None follows MHA_USE_DOT, so once that flips an
    # element-wise half left at None would run the dot path twice (and be reported as elem).
    assert {launch.use_dot for launch in mha} == {False, True}
    assert [dataclasses.replace(l, use_dot=None) for l in mha if l.use_dot is False] == launches
    assert {(l.num_splits, l.block_n) for l in mha if l.use_dot} == {(l.num_splits, l.block_n) for l in launches}
    assert all(r.use_dot for r in tune.refine_launches(tune.Launch(2, 64, use_dot=True), quick=False))


def _row(ms, splits, block_n, ok=True):
    return {"ok": ok, "ms": ms, "launch": {"num_splits": splits, "block_n": block_n}}


def test_best_launch_skips_wrong_or_failed_rows_and_breaks_ties_towards_fewer_splits():
    rows = [_row(0.5, 4, 64), _row(0.1, 8, 32, ok=False), _row(None, 2, 32, ok=False), _row(0.5, 2, 128)]
    assert tune.best_launch(rows)["launch"] == {"num_splits": 2, "block_n": 128}
    assert tune.best_launch([_row(0.1, 8, 32, ok=False)]) is None


def test_unknown_models_are_refused():
    with pytest.raises(SystemExit):
        tune.parse_args(["--models", "olmoe-1b-7b,nope"])


def check_interpreter_cases() -> int:
    tune.MODELS["tiny"] = (4, 2, 16)
    clock = itertools.count(1)
    # A fake clock: later launches look faster, so the first stage must pick its last one.
    fake = lambda call, reps: (call(), 10.0 / next(clock))[1]
    result = tune.sweep_shape(tune.Shape("tiny", batch=3, context=64), torch.float32, reps=1, quick=True,
                              device="cpu", timer=fake)
    rows = result["rows"]
    assert len(rows) == 1 + len(tune.candidate_launches(64, quick=True))
    assert all(r["ok"] and r["rel_err"] <= 1e-4 for r in rows), [r for r in rows if not r["ok"]]
    assert result["best"] is rows[-1] and result["speedup"] > 1
    assert result["kv_bytes"] > 0 and all(r["gb_s"] > 0 for r in rows)
    assert result["best_ms_by_path"] == {}                  # query groups: one path
    # MHA: both paths swept, each one's best reported (the fake clock makes the dot path's last launch fastest).
    tune.MODELS["tiny-mha"] = (3, 3, 16)
    mha = tune.sweep_shape(tune.Shape("tiny-mha", batch=3, context=64), torch.float32, reps=1, quick=True,
                           device="cpu", timer=fake)
    assert all(r["ok"] and r["rel_err"] <= 1e-4 for r in mha["rows"]), [r for r in mha["rows"] if not r["ok"]]
    assert {bool(r["launch"]["use_dot"]) for r in mha["rows"][1:]} == {False, True}
    paths = mha["best_ms_by_path"]
    assert paths["dot"] == mha["best"]["ms"] < paths["elementwise"]
    assert "dot/elem" in tune.format_table([result, mha])
    return len(rows) + len(mha["rows"])


@needs_triton
def test_sweep_checks_every_launch_and_takes_the_fastest_in_interpreter():
    assert_interpreter_checks_pass(__file__, 2 + len(tune.candidate_launches(64, quick=True))
                                   + len(tune.candidate_launches(64, quick=True, mha=True)))


if __name__ == "__main__":
    run_interpreter_checks(check_interpreter_cases)
