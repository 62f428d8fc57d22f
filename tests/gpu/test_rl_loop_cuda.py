"""tools/rl_loop.py on CUDA: engine with CUDA-graph decode and asynchronous scheduling,
megatron-core trainer on the same GPU; refit in place keeps the same engine and graphs."""

from __future__ import annotations

import orjson
import pytest
import torch

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]


def test_megatron_loop_on_cuda(tmp_path):
    pytest.importorskip("megatron.core")
    from tools.rl_loop import main
    out = tmp_path / "rl.json"
    assert main(["--device", "cuda", "--iterations", "3", "--num-prompts", "4", "--group-size", "4",
                 "--output", str(out)]) == 0
    report = orjson.loads(out.read_bytes())
    rows = report["iterations"]
    assert report["engine_dtype"] == "bfloat16" and len(rows) == 3
    assert [r["weight_version"] for r in rows] == [report["initial_weight_version"] + k for k in range(3)]
    assert len({r["engine_id"] for r in rows}) == 1
    assert rows[0]["graph_runner_id"] is not None and len({r["graph_runner_id"] for r in rows}) == 1
    assert all(r["router_disagreement_with_replay"] == 0 for r in rows)
    assert len({r["engine_bytes"] for r in rows}) == 1
    assert sum(r["logprob_abs_diff_mean_with_replay"] for r in rows) < sum(
        r["logprob_abs_diff_mean_without_replay"] for r in rows)
