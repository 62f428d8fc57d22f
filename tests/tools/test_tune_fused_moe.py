"""The tuner's search on CPU: Triton interpreter kernels, a fake clock instead of CUDA
graphs, tiny shapes. Checks that every candidate it times is correct, that it takes the
fastest, and that it writes files the kernels' config lookup reads back."""

from __future__ import annotations

import itertools

import torch

from inference.kernels import fused_moe_configs as cfgs
from tests.inference.kernels.harness import (
    assert_interpreter_checks_pass,
    needs_triton,
    run_interpreter_checks,
)
from tools import tune_fused_moe as tune

SHAPE = (6, 3, 40, 24)   # E, topk, H, I: odd sizes, E not a power of two


def check_interpreter_cases() -> int:
    tune.TILES = {16: [(16, 16, 4, 2, 1), (32, 16, 4, 2, 1)], 32: [(16, 32, 4, 2, 1)]}
    tune.SHAPES = {"tiny": SHAPE}
    clock = itertools.count(1)
    # A fake clock: later candidates look faster, so the search must pick the last valid one.
    tune.graph_ms = lambda fn, num_tokens: (fn(), 100.0 / next(clock))[1]
    e, _, h, i = SHAPE
    weights = ((torch.randn(e, 2 * i, h) * h ** -0.5).bfloat16(), (torch.randn(e, h, i) * i ** -0.5).bfloat16())
    rows = [tune.tune_bucket("tiny", SHAPE, 9, weights, smem=160 * 1024, failed={(16, cfgs.GemmTiles(32, 16), "down")})]
    row = rows[0]
    assert row["tuned_rel_err"] <= tune.REL_TOL and row["problems"] == []
    # block_m 16 then 32 are tried; on the fake clock the last end-to-end timing (block_m 32) wins.
    assert row["config"] == cfgs.FusedMoEConfig(32, cfgs.GemmTiles(16, 32, 1, 4, 2), cfgs.GemmTiles(16, 32, 1, 4, 2)).to_dict()
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        written = tune.write_configs(rows, Path(tmp), "Fake_GPU", {"device": "Fake GPU"})
        assert len(written) == 1
        entry = cfgs.tuned_entry(8, e, h, i, torch.bfloat16, "Fake_GPU", Path(tmp))
        assert entry is not None and entry.config.to_dict() == row["config"]
    return len(rows)


@needs_triton
def test_tuner_search_in_interpreter():
    assert_interpreter_checks_pass(__file__, 1)


def test_block_m_candidates_grow_with_tokens_per_expert():
    assert tune.block_m_candidates(1, 8, 64) == [16]
    assert 128 in tune.block_m_candidates(8192, 8, 64)
    for bm in tune.TILES:
        assert tune.tile_candidates(bm, 2, 227 * 1024), bm   # every block_m has tiles that fit an H200


if __name__ == "__main__":
    run_interpreter_checks(check_interpreter_cases)
