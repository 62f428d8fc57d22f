"""The tuner's small-batch half: the crossover decision (a pure function), the per-shape
``small_batch`` object, the work order, and on CPU (Triton interpreter, a fake clock) a
small-bucket search whose result is merged into an existing tuned file."""

from __future__ import annotations

import itertools
import json

import torch

from inference.kernels import fused_moe as fm
from inference.kernels import fused_moe_configs as cfgs
from tests.inference.kernels.harness import assert_interpreter_checks_pass, needs_triton, run_interpreter_checks
from tools import fused_moe_small_tuning as small
from tools import tune_fused_moe as tune

SHAPE = (5, 2, 24, 20)   # E, topk, H, I: not multiples of the tiles


def test_threshold_is_the_last_win_before_the_first_loss():
    choose = small.choose_small_batch_max_tokens
    assert choose({1: (0.5, 1.0), 2: (0.6, 1.0), 4: (0.9, 1.0), 8: (0.8, 1.0)}) == 8
    assert choose({8: (1.5, 1.0), 1: (0.5, 1.0), 2: (0.6, 1.0), 4: (0.9, 1.0)}) == 4   # order of keys is irrelevant
    assert choose({1: (0.5, 1.0), 2: (1.1, 1.0), 4: (0.5, 1.0)}) == 1   # a later win does not extend it
    assert choose({1: (1.2, 1.0), 2: (0.5, 1.0)}) == 0
    assert choose({1: (1.0, 1.0)}) == 0                                # a tie goes to the aligned path
    assert choose({1: (0.5, 1.0), 2: (None, 1.0), 4: (0.5, 1.0)}) == 1  # a failed measurement stops the scan
    assert choose({1: (0.5, None)}) == 0
    assert choose({}) == 0
    assert choose({1: (0.95, 1.0)}, margin=0.9) == 0 and choose({1: (0.85, 1.0)}, margin=0.9) == 1


def config_dict(n1=16, k1=16, n2=8, k2=16):
    return cfgs.SmallMoEConfig(cfgs.GemvTiles(n1, k1), cfgs.GemvTiles(n2, k2)).to_dict()


def test_small_batch_field_skips_invalid_rows_and_records_timings():
    rows = [{"shape": "s", "tokens": 1, "small_config": config_dict(), "small_ms": 0.1, "aligned_ms": 0.2,
             "small_rel_err": 1e-3},
            {"shape": "s", "tokens": 2, "small_config": config_dict(32), "small_ms": 0.1, "aligned_ms": 0.3,
             "small_rel_err": 0.5},                                       # wrong results: not trusted
            {"shape": "s", "tokens": 4, "small_config": config_dict(), "small_ms": 0.1, "aligned_ms": 0.4,
             "small_rel_err": 1e-3}]
    field = small.small_batch_field(rows, {"date": "d", "command": "c"}, rel_tol=2e-2)
    assert field["max_tokens"] == 1 and set(field["configs"]) == {"1", "4"}
    assert field["configs"]["4"]["aligned_ms"] == 0.4 and field["date"] == "d"
    data = cfgs.parse_small_batch(json.dumps({"small_batch": field}))
    assert data.max_tokens == 1 and data.config_for(1).to_dict() == config_dict()
    assert small.small_batch_field([{"shape": "s", "tokens": 1, "error": "boom"}], {}, 2e-2) is None


def test_work_list_puts_small_buckets_next_to_their_aligned_bucket():
    assert tune.work_list([64, 1, 16], [1, 2], small_only=False) == [
        ("small", 2), ("aligned", 64), ("aligned", 1), ("small", 1), ("aligned", 16)]
    assert tune.work_list([64, 1], [1, 2], small_only=True) == [("small", 1), ("small", 2)]
    assert tune.work_list([64], [], small_only=False) == [("aligned", 64)]


def check_interpreter_cases() -> int:
    small.GATE_UP_TILES = [(16, 16, 4, 2), (8, 32, 4, 2)]
    small.DOWN_TILES = [(8, 16, 4, 2), (4, 32, 4, 2)]
    tune.SHAPES = {"tiny": SHAPE}
    aligned_calls = []
    real_align = fm.align_pairs
    fm.align_pairs = lambda *a, **kw: (aligned_calls.append(1), real_align(*a, **kw))[1]
    clock = itertools.count(1)

    def fake_ms(fn, num_tokens):
        """Aligned path 1.0 ms; small path faster than that up to 2 tokens, slower above,
        and a little faster on every call (so the search must keep the latest candidate)."""
        before = len(aligned_calls)
        fn()
        if len(aligned_calls) > before:
            return 1.0
        return (0.5 if num_tokens <= 2 else 2.0) / (1 + 0.01 * next(clock))

    tune.graph_ms = fake_ms
    e, _, h, i = SHAPE
    weights = ((torch.randn(e, 2 * i, h) * h ** -0.5).bfloat16(), (torch.randn(e, h, i) * i ** -0.5).bfloat16())
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        rows = [tune.tune_small("tiny", SHAPE, t, weights, [], Path(tmp)) for t in (1, 3)]
        for row in rows:
            assert row["problems"] == [] and row["small_rel_err"] <= tune.REL_TOL and row["aligned_ms"] == 1.0
            assert row["small_config"] == config_dict(8, 32, 4, 32), row["small_config"]   # the last candidates
        aligned_file = {"meta": {"device": "Fake GPU"}, "configs": {"1": cfgs.default_config(1, 3, e, torch.bfloat16)
                                                                    .to_dict()}}
        name = cfgs.config_file_name(e, h, i, torch.bfloat16, "Fake_GPU")
        (Path(tmp) / name).write_text(json.dumps(aligned_file))
        written = tune.write_configs([], Path(tmp), "Fake_GPU", {"date": "today"}, rows)
        assert written == [str(Path(tmp) / name)]
        merged = json.loads((Path(tmp) / name).read_text())
        assert merged["configs"] == aligned_file["configs"] and merged["meta"] == aligned_file["meta"]
        data = cfgs.small_batch_data(e, h, i, torch.bfloat16, "Fake_GPU", Path(tmp))
        assert data.max_tokens == 1 and data.config_for(1).to_dict() == rows[0]["small_config"]
    return len(rows)


@needs_triton
def test_small_bucket_search_in_interpreter():
    assert_interpreter_checks_pass(__file__, 2)


if __name__ == "__main__":
    run_interpreter_checks(check_interpreter_cases)
