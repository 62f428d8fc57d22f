"""The prefill attention tuner's logic on CPU: the causal FLOP count against a dense count,
the candidates, the choice of the best launch, and one whole sweep through the Triton
interpreter with a fake clock (every launch it times must be correct, and it must pick the
fastest)."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.inference.kernels.harness import assert_interpreter_checks_pass, needs_triton, run_interpreter_checks
from tools import tune_prefill_attention as tune


def test_attention_flops_count_every_visible_key_once():
    q_lens, seq_lens, heads, head_dim = [3, 5], [3, 9], 2, 8
    visible = 0
    for q_len, seq_len in zip(q_lens, seq_lens):
        ctx = seq_len - q_len
        mask = torch.arange(seq_len)[None, :] <= (ctx + torch.arange(q_len))[:, None]
        visible += int(mask.sum())
    assert tune.attention_flops(q_lens, seq_lens, heads, head_dim) == 4 * visible * heads * head_dim


def test_candidates_cover_tiles_warps_and_stages():
    full, quick = tune.candidate_launches(quick=False), tune.candidate_launches(quick=True)
    assert len(full) == len(tune.BLOCK_MS) * len(tune.BLOCK_NS) * len(tune.WARPS) * len(tune.STAGES)
    assert len(set(full)) == len(full) and set(quick) <= set(full) and len(quick) < len(full)
    assert all(launch.block_m and launch.block_n and launch.num_warps for launch in full)


def _row(ms, block_m, ok=True):
    return {"ok": ok, "ms": ms, "launch": {"block_m": block_m, "block_n": 64, "num_warps": 4, "num_stages": 2}}


def test_best_launch_skips_wrong_or_failed_rows_and_breaks_ties_towards_smaller_tiles():
    rows = [_row(0.5, 128), _row(0.1, 64, ok=False), _row(None, 64, ok=False), _row(0.5, 64)]
    assert tune.best_launch(rows)["launch"]["block_m"] == 64
    assert tune.best_launch([_row(0.1, 64, ok=False)]) is None


def test_unknown_models_or_layouts_are_refused():
    with pytest.raises(SystemExit):
        tune.parse_args(["--models", "qwen3-30b-a3b,nope"])
    with pytest.raises(SystemExit):
        tune.parse_args(["--layouts", "1x1"])


def check_interpreter_cases() -> int:
    tune.MODELS["tiny"] = (4, 2, 16)
    tune.LAYOUTS["tiny"] = ([20, 5], [20, 37])
    clock = itertools.count(1)
    # A fake clock: later launches look faster, so the sweep must pick its last one.
    fake = lambda call, reps: (call(), 10.0 / next(clock))[1]  # noqa: E731
    result = tune.sweep_shape(tune.Shape("tiny", "tiny"), torch.float32, reps=1, quick=True, matmul_flops=1e12,
                              device="cpu", timer=fake)
    rows = result["rows"]
    assert len(rows) == 1 + len(tune.candidate_launches(quick=True))
    assert all(r["ok"] and r["rel_err"] <= 1e-4 for r in rows), [r for r in rows if not r["ok"]]
    assert result["best"] is rows[-1] and result["speedup"] > 1
    assert result["flops"] > 0 and all(r["tflops"] > 0 and r["fraction_of_matmul_rate"] > 0 for r in rows)
    return len(rows)


@needs_triton
def test_sweep_checks_every_launch_and_takes_the_fastest_in_interpreter():
    assert_interpreter_checks_pass(__file__, 1 + len(tune.candidate_launches(quick=True)))


if __name__ == "__main__":
    run_interpreter_checks(check_interpreter_cases)
