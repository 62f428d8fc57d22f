"""The one-run GPU script's plumbing: stage limits kill the whole process group, and the
summary reads whatever the stages left (including nothing)."""

from __future__ import annotations

import json
import sys

from tools import gpu_issue14


def test_a_stage_past_its_limit_is_killed_and_reported(tmp_path):
    stage = gpu_issue14.run_stage("sleepy", [sys.executable, "-c", "import time; print('started', flush=True); "
                                             "time.sleep(60)"], 2, tmp_path)
    assert stage["rc"] == "timeout" and stage["seconds"] < 30
    assert "started" in (tmp_path / "sleepy.log").read_text()


def test_summary_reads_partial_results(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "tests.log").write_text("....\n5 passed, 2 skipped in 3.0s\n")
    tune = tmp_path / "fused_moe_h200.json"
    tune.write_text(json.dumps({"skipped": ["qwen3-30b-a3b T=384"], "rows": [
        {"shape": "olmoe-1b-7b", "tokens": 64, "tuned_ms": 0.2, "heuristic_ms": 0.25, "grouped_mm_ms": 0.5},
        {"shape": "olmoe-1b-7b", "tokens": 1, "error": "RuntimeError: boom"}]}))
    (tmp_path / "bench" / "decode_olmoe_1b_7b_shape_h200.json").write_text(json.dumps({
        "model": "olmoe-1b-7b-shape", "ratio_to_floor": {"64": 1.5, "256": None}, "skipped": ["prefill"],
        "compare": {"grouped_mm": {"ratio_to_floor": {"64": 2.25}}}, "batches": {
            "64": {"breakdown": {"rows": [{"component": "router + top-k", "ms": 0.4, "ratio": 40.0}],
                                 "top_kernels": [{"kernel": "_router_topk_kernel", "calls_per_step": 16,
                                                  "ms_per_step": 0.05, "component": "router + top-k"}]}}},
        "compare_small_ops": {"off": {"ratio_to_floor": {"64": 1.75}, "batches": {"64": {"breakdown": {
            "rows": [{"component": "router + top-k", "ms": 1.7, "ratio": 170.0}]}}}}}}))
    stages = [{"stage": "tests", "rc": 0, "seconds": 3.0, "log": str(tmp_path / "tests.log")},
              {"stage": "tune", "rc": "timeout", "seconds": 170.0, "log": str(tmp_path / "missing.log")}]
    text = gpu_issue14.summary(stages, tmp_path, tune)
    assert "5 passed, 2 skipped" in text and "rc=timeout" in text
    assert "2.50" in text and "RuntimeError: boom" in text          # grouped_mm / tuned at T=64
    assert "x floor 64:1.50" in text and "with grouped_mm: x floor 64:2.25" in text and "skipped: prefill" in text
    assert "small ops off: x floor 64:1.75" in text and "batch 64 small ops off: router + top-k 1.70 ms" in text
    assert "16x _router_topk_kernel [router + top-k]" in text
