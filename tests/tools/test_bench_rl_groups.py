"""tools/bench_rl_groups.py on CPU: with the prefix cache, a group's copies admitted in the
first step compute only their last partial block, and the outputs equal the uncached run."""

from __future__ import annotations

import json

from tools import bench_rl_groups


def test_cpu_groups_compute_each_prompt_once(tmp_path, capsys):
    out = tmp_path / "groups.json"
    assert bench_rl_groups.main(["--model", "tiny-moe", "--device", "cpu", "--num-prompts", "2", "--group-size", "3",
                                 "--prompt-len", "40", "--output-len", "3", "--block-size", "16",
                                 "--repetitions", "1", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    cached, uncached = report["medians"]["cached"], report["medians"]["uncached"]
    assert uncached["prompt_tokens_computed"] == 6 * 40 and uncached["cached_tokens"] == 0
    # each prompt once, then its 2 copies from the 32 cached tokens ((40 - 1) // 16 full blocks) on
    assert cached["prompt_tokens_computed"] == 2 * 40 + 4 * (40 - 32) and cached["cached_tokens"] == 4 * 32
    assert cached["prefill_steps"] == 1
    assert report["identical_tokens"] and report["identical_routing"]
    assert "uncached / cached" in capsys.readouterr().out
