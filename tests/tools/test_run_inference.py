"""The CLI end to end: default preset, prompts files, bad flags, dry run, 2 torchrun ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

from routing_replay import load_routing

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "run_inference.py"


def _run(args: list[str], launcher: list[str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = (launcher or [sys.executable]) + [str(SCRIPT)] + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _results(out: Path) -> list[dict]:
    return [orjson.loads(line) for line in (out / "results.jsonl").read_bytes().splitlines()]


def test_default_preset_with_recording(tmp_path):
    proc = _run(["--record-routing", "--output-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    assert "run summary" in proc.stdout
    results = _results(tmp_path)
    assert len(results) == 8 and all(r["finish_reason"] in ("stop", "length") for r in results)
    routings, meta = load_routing(tmp_path)
    assert meta.moe_layer_indices == [1, 2, 3]
    for r in results:
        rows = len(r["prompt_token_ids"]) + len(r["output_token_ids"]) - 1
        assert r["routing_shape"] == [rows, 3, 2] and r["routing_dtype"] == "uint8"
        assert routings[r["id"]].shape == (rows, 3, 2)
    details = orjson.loads((tmp_path / "step_details.json").read_bytes())
    assert details["meta"]["record_routing"] is True and details["step_details"]


def test_prompts_file_with_a_bad_request(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "ok1", "prompt_token_ids": [5, 6, 7]}\n'
                       '{"id": "oov", "prompt_token_ids": [5, 99999]}\n'
                       '\n{"id": 3, "prompt_token_ids": [8, 9], "max_new_tokens": 2}\n'
                       '{"id": "turn2", "prompt_token_ids": [5, 6, 7, 8, 9], "routing_start": 3}\n')
    out = tmp_path / "out"
    proc = _run(["--prompts-file", str(prompts), "--max-new-tokens", "4", "--record-routing", "--output-dir", str(out)])
    assert proc.returncode == 3, proc.stderr   # some requests failed, everything else written
    by_id = {r["id"]: r for r in _results(out)}
    assert list(by_id) == ["ok1", "oov", "3", "turn2"]
    turn2 = by_id["turn2"]
    assert turn2["routing_start"] == 3
    assert turn2["routing_shape"][0] == 5 + len(turn2["output_token_ids"]) - 1 - 3
    assert by_id["oov"]["finish_reason"] == "error" and "outside the vocabulary" in by_id["oov"]["error"]
    assert "oov" in proc.stderr
    assert len(by_id["3"]["output_token_ids"]) <= 2 and by_id["ok1"]["output_token_ids"]
    routings, _ = load_routing(out)
    assert set(routings) == {"ok1", "3", "turn2"}


@pytest.mark.parametrize("content, message", [
    ('{"id": 1, "prompt_token_ids": [1, 2]\n', "line 1: not valid JSON"),
    ('{"prompt_token_ids": [1, 2]}\n', "line 1: missing key 'id'"),
    ('{"id": 1, "prompt_token_ids": [3]}\n{"id": 1, "prompt_token_ids": [4]}\n', "line 2: duplicate id '1'"),
    ('[1, 2, 3]\n', "expected a JSON object"),
])
def test_malformed_prompts_file(tmp_path, content, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(content)
    proc = _run(["--prompts-file", str(prompts)])
    assert proc.returncode == 2 and message in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "nope"], "invalid choice: 'nope'"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--shared-prefix-len", "40"], "--shared-prefix-len must be in [0, --prompt-len=32]"),
    (["--kv-cache-memory", "lots"], "--kv-cache-memory: cannot read 'lots'"),
    (["--num-kv-blocks", "4", "--kv-cache-memory", "1MiB"], "not both"),
    (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs a CUDA device"),
])
def test_bad_flags_name_the_flag(args, message):
    proc = _run(args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_dry_run_prints_memory_plan(tmp_path):
    proc = _run(["--dry-run", "--record-routing", "--num-kv-blocks", "100", "--output-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    assert "memory plan" in proc.stdout and "routing buffer" in proc.stdout and "101" not in proc.stdout.split("KV cache")[0]
    assert not (tmp_path / "results.jsonl").exists()


def test_help_is_grouped():
    proc = _run(["--help"])
    assert proc.returncode == 0
    for group in ("model:", "workload", "sampling:", "engine:", "routing recording:", "output and logging:"):
        assert group in proc.stdout


def test_two_torchrun_ranks_merge_outputs(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = _run(["--record-routing", "--num-requests", "5", "--shared-prefix-len", "16", "--output-dir", str(tmp_path)],
                launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(tmp_path)
    assert [r["id"] for r in results] == ["0", "1", "2", "3", "4"]
    routings, _ = load_routing(tmp_path)
    assert set(routings) == {r["id"] for r in results}
    assert (tmp_path / "rank1" / "step_details.json").is_file() and (tmp_path / "step_details.json").is_file()
    single = tmp_path / "single"
    proc = _run(["--record-routing", "--num-requests", "5", "--shared-prefix-len", "16", "--output-dir", str(single)])
    assert proc.returncode == 0, proc.stderr
    assert [r["output_token_ids"] for r in _results(single)] == [r["output_token_ids"] for r in results]
    single_routing, _ = load_routing(single)
    for key, value in single_routing.items():
        np.testing.assert_array_equal(value, routings[key])


def test_logprobs_and_weight_version_reach_results_and_routing_meta(tmp_path):
    proc = _run(["--record-routing", "--temperature", "0.8", "--top-k", "40", "--logprobs", "2", "--prompt-logprobs",
                 "--num-requests", "3", "--output-len", "5", "--output-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    from routing_replay.run_dir_schema import validate_run_dir
    assert validate_run_dir(tmp_path) == []
    for r in _results(tmp_path):
        n = len(r["output_token_ids"])
        assert len(r["output_logprobs"]) == n and all(v <= 0 for v in r["output_logprobs"])
        assert len(r["output_top_logprobs"]) == n and all(len(step) == 2 for step in r["output_top_logprobs"])
        assert len(r["prompt_logprobs"]) == len(r["prompt_token_ids"]) and r["prompt_logprobs"][0] is None
        assert r["weight_version"] == 0
    meta = orjson.loads((tmp_path / "routing_meta.json").read_bytes())
    assert meta["weight_version"] == 0


def test_samples_per_prompt_serve_rl_groups_that_compute_their_prompt_once(tmp_path):
    """Each prompt's samples are neighbouring requests ``<id>_<k>``; the samples after the
    first take the prompt's blocks from the prefix cache, yet every sample's tokens and
    routing equal an engine serving that one request alone, without the cache, with the
    seed of its place in the workload."""
    from inference.config import EngineConfig
    from inference.engine import LLMEngine
    from inference.presets import build_model, get_preset
    from inference.request import SamplingParams
    from inference.workload import synthetic_prompts
    from routing_replay.run_dir_schema import validate_run_dir
    flags = ["--record-routing", "--num-requests", "3", "--samples-per-prompt", "4", "--prompt-len", "40",
             "--output-len", "6", "--ignore-eos", "--temperature", "1.0", "--top-p", "0.9", "--block-size", "8",
             "--seed", "3"]
    proc = _run(flags + ["--output-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    assert validate_run_dir(tmp_path) == []
    results = _results(tmp_path)
    assert [r["id"] for r in results] == [f"{p}_{k}" for p in range(3) for k in range(4)]
    assert [(r["prompt_id"], r["sample_index"]) for r in results] == [(str(p), k) for p in range(3) for k in range(4)]
    for r in results:
        # every full block the prompt's last token does not need (it is always computed)
        assert r["num_cached_tokens"] == (0 if r["sample_index"] == 0 else (40 - 1) // 8 * 8), r["id"]
    details = orjson.loads((tmp_path / "step_details.json").read_bytes())
    assert details["meta"]["workload"]["samples_per_prompt"] == 4

    config = get_preset("tiny-moe")
    prompts = synthetic_prompts(num_requests=3, prompt_len=40, vocab_size=config.vocab_size, seed=3)
    engine = LLMEngine(build_model(config, seed=3), EngineConfig(block_size=8, num_kv_blocks=64, seed=3,
                                                                 enable_prefix_caching=False, record_routing=True))
    routings, _ = load_routing(tmp_path)
    for index, r in enumerate(results):
        assert r["prompt_token_ids"] == prompts[int(r["prompt_id"])].prompt_token_ids
        alone = engine.generate([r["prompt_token_ids"]], SamplingParams(
            max_new_tokens=6, ignore_eos=True, temperature=1.0, top_p=0.9, seed=3 * 1_000_003 + index))[0]
        assert alone.output_token_ids == r["output_token_ids"], r["id"]
        np.testing.assert_array_equal(alone.routing, routings[r["id"]])
    assert len({tuple(r["output_token_ids"]) for r in results}) == len(results), "every sample draws its own tokens"


def test_greedy_samples_per_prompt_warn(tmp_path):
    proc = _run(["--num-requests", "1", "--samples-per-prompt", "2", "--output-len", "2", "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    assert "2 identical samples" in proc.stdout + proc.stderr


def test_stop_token_ids_end_requests_even_with_ignore_eos(tmp_path):
    free = tmp_path / "free"
    base = ["--num-requests", "3", "--output-len", "12", "--ignore-eos"]
    assert _run(base + ["--output-dir", str(free)]).returncode == 0
    outputs = [r["output_token_ids"] for r in _results(free)]
    stop = outputs[0][3]
    proc = _run(base + ["--stop-token-ids", f"{stop}", "--output-dir", str(tmp_path / "stopped")])
    assert proc.returncode == 0, proc.stderr
    for r, full in zip(_results(tmp_path / "stopped"), outputs):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert r["output_token_ids"] == full[:cut], r["id"]
        assert r["finish_reason"] == ("stop" if stop in full else "length")
    for bad, message in (("5,x", "comma-separated token ids"), ("-3", ">= 0"), ("100000", "outside the vocabulary")):
        proc = _run(base + ["--stop-token-ids", bad, "--dry-run"])
        assert proc.returncode == 2 and message in proc.stderr, (bad, proc.stderr[-500:])


def test_step_details_keep_the_last_entries_of_a_long_run(tmp_path):
    from routing_replay.run_dir_schema import validate_run_dir
    proc = _run(["--num-requests", "4", "--output-len", "20", "--ignore-eos", "--step-details-max-entries", "5",
                 "--output-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    assert validate_run_dir(tmp_path) == []
    document = orjson.loads((tmp_path / "step_details.json").read_bytes())
    summary, entries = document["summary"], document["step_details"]
    assert len(entries) == 5 and summary["num_steps"] == 5 + summary["dropped_entries"] >= 20
    assert summary["total_tokens"] == 4 * 32 + 4 * 19 and document["meta"]["schema_version"] == 3
    assert [e["step"] for e in entries] == list(range(summary["num_steps"] - 5, summary["num_steps"]))
