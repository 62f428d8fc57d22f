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
    assert not any(launch.packed for launch in full)  # MHA: no packed kernel


@pytest.mark.parametrize("group", [2, 8, 128])
def test_grouped_queries_add_packed_candidates_that_hold_the_group(group):
    per_head = tune.candidate_launches(quick=False)
    both = tune.candidate_launches(quick=False, group=group)
    packed = [launch for launch in both if launch.packed]
    assert [launch for launch in both if not launch.packed] == per_head
    assert len(set(both)) == len(both)
    assert packed and all(launch.block_m >= group for launch in packed)
    expected = [m for m in tune.BLOCK_MS if m >= group]
    assert sorted({launch.block_m for launch in packed}) == expected
    assert len(packed) == len(expected) * len(tune.BLOCK_NS) * len(tune.WARPS) * len(tune.STAGES)
    assert tune.candidate_launches(quick=True, group=group, kernels=("packed",)) == \
        [launch for launch in tune.candidate_launches(quick=True, group=group) if launch.packed]


def _row(ms, block_m, ok=True, packed=False):
    return {"ok": ok, "ms": ms,
            "launch": {"block_m": block_m, "block_n": 64, "num_warps": 4, "num_stages": 2, "packed": packed}}


def test_best_launch_skips_wrong_or_failed_rows_and_breaks_ties_towards_smaller_tiles():
    rows = [_row(0.5, 128), _row(0.1, 64, ok=False), _row(None, 64, ok=False), _row(0.5, 64)]
    assert tune.best_launch(rows)["launch"]["block_m"] == 64
    assert tune.best_launch([_row(0.1, 64, ok=False)]) is None


def test_best_launch_per_kernel_and_ties_towards_the_per_head_kernel():
    rows = [_row(0.5, 64, packed=True), _row(0.5, 64), _row(0.7, 64), _row(0.2, 128, packed=True)]
    assert tune.best_launch(rows) is rows[3]
    assert tune.best_launch(rows, packed=False) is rows[1]
    assert tune.best_launch(rows[:3]) is rows[1]
    assert tune.best_launch(rows[1:3], packed=True) is None


def test_unknown_models_or_layouts_are_refused():
    with pytest.raises(SystemExit):
        tune.parse_args(["--models", "qwen3-30b-a3b,nope"])
    with pytest.raises(SystemExit):
        tune.parse_args(["--layouts", "1x1"])
    with pytest.raises(SystemExit):
        tune.parse_args(["--kernels", "packed,fast"])
    assert tune.parse_args(["--kernels", "packed"]).kernels == ["packed"]


def check_interpreter_cases() -> int:
    tune.MODELS["tiny"] = (4, 2, 16)
    tune.LAYOUTS["tiny"] = ([20, 5], [20, 37])
    clock = itertools.count(1)
    # A fake clock: later launches look faster, so the sweep must pick its last one (a
    # packed launch: they come after the per-head ones).
    fake = lambda call, reps: (call(), 10.0 / next(clock))[1]  # noqa: E731
    result = tune.sweep_shape(tune.Shape("tiny", "tiny"), torch.float32, reps=1, quick=True, matmul_flops=1e12,
                              device="cpu", timer=fake)
    rows = result["rows"]
    launches = tune.candidate_launches(quick=True, group=2)
    assert len(rows) == 1 + len(launches) and {launch.packed for launch in launches} == {False, True}
    assert all(r["ok"] and r["rel_err"] <= 1e-4 for r in rows), [r for r in rows if not r["ok"]]
    assert result["best"] is rows[-1] and result["speedup"] > 1 and result["best_packed"] is rows[-1]
    last_per_head = max(i for i, launch in enumerate(launches, start=1) if not launch.packed)
    assert result["best_per_head"] is rows[last_per_head] and result["packed_speedup"] > 1
    assert result["default_packed"] is False and result["default_launch"]["block_m"] == 32  # fp32: per-head
    assert result["flops"] > 0 and all(r["tflops"] > 0 and r["fraction_of_matmul_rate"] > 0 for r in rows)
    line = tune.format_table([result]).splitlines()[-1]
    assert line.startswith("tiny tiny") and "packed m=" in line
    return len(rows)


@needs_triton
def test_sweep_checks_every_launch_and_takes_the_fastest_in_interpreter():
    assert_interpreter_checks_pass(__file__, 1 + len(tune.candidate_launches(quick=True, group=2)))


if __name__ == "__main__":
    run_interpreter_checks(check_interpreter_cases)
