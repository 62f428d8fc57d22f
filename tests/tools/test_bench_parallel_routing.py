"""The parallel routing benchmark on CPU (gloo, fp32, tiny model): a two-rank TP=2 x EP=2
run measures every mode, writes the issue's top-level fields and finds its tokens and
routing identical to the single-process run it is given as reference; the helpers that
compare runs tell different runs apart."""

from __future__ import annotations

import numpy as np
import orjson

from tests.inference.parallel.harness import run_ranks
from tests.tools.parallel_cli import run_tool_main
from tools import bench_parallel_routing as bench

WORKLOAD = ["--model", "tiny-moe", "--device", "cpu", "--num-requests", "4", "--prompt-len", "12",
            "--output-len", "6", "--repetitions", "2", "--max-step-tokens", "32"]


def test_two_ranks_match_the_single_process_reference(tmp_path):
    ref, par = tmp_path / "single.json", tmp_path / "tp2_ep2.json"
    assert bench.main(WORKLOAD + ["--output", str(ref)]) == 0
    argv = WORKLOAD + ["--tensor-parallel-size", "2", "--expert-parallel-size", "2", "--reference", str(ref),
                       "--output", str(par)]
    ranks = run_ranks(run_tool_main, 2, "tools.bench_parallel_routing", argv, timeout=120)
    assert [int(r["exit"]) for r in ranks] == [0, 0]
    report = orjson.loads(par.read_bytes())
    assert (report["world_size"], report["tensor_parallel_size"], report["expert_parallel_size"]) == (2, 2, 2)
    assert set(report["modes"]) == set(bench.MODES)
    assert all(len(m["repetitions"]) == 2 and m["decode_tokens_per_s_median"] > 0 for m in report["modes"].values())
    assert report["ratio_gpu_vs_off"] > 0 and report["ratio_host_sync_vs_off"] > 0
    assert len(report["request_digests"]) == 4
    assert report["identical_to_single_gpu"] == 1.0
    assert report["scaling_vs_reference"] > 0
    assert report["host_syncs_per_decode_step_recording"] is None      # CPU: nothing to count
    single = orjson.loads(ref.read_bytes())
    assert single["world_size"] == 1 and single["request_digests"] == report["request_digests"]


def test_a_world_that_is_not_one_replica_is_refused(capsys):
    assert bench.main(WORKLOAD + ["--tensor-parallel-size", "2"]) == 2
    assert "must equal --tensor-parallel-size 2" in capsys.readouterr().err


def test_digests_tell_tokens_and_routing_apart():
    routing = np.array([[[1, 2]], [[3, 0]]], dtype=np.uint8)
    base = bench.request_digest([5, 6], routing)
    assert base == bench.request_digest([5, 6], routing.astype(np.int16))   # dtype-independent
    assert base != bench.request_digest([5, 7], routing)
    assert base != bench.request_digest([5, 6], routing[::-1])
    assert bench.identical_share({"a": "x", "b": "y"}, {"a": "x", "b": "z"}) == 0.5
    assert bench.identical_share({"a": "x"}, {}) is None


def test_gpu_idle_share_is_idle_over_idle_plus_busy_decode_time_after_the_first_decode_step():
    from tools.bench_routing import gpu_idle_share
    decode = dict(prefill_requests=0, decode_requests=2)
    entries = [dict(prefill_requests=1, decode_requests=0, gpu_step_ms=50.0, gpu_idle_before_ms=5.0),
               dict(decode, gpu_step_ms=9.0, gpu_idle_before_ms=30.0),     # the first decode: after the prefill
               dict(decode, gpu_step_ms=9.0, gpu_idle_before_ms=1.0), dict(decode, gpu_step_ms=10.0,
                                                                            gpu_idle_before_ms=0.0)]
    assert gpu_idle_share(entries) == 1.0 / 20.0
    assert gpu_idle_share([dict(decode, step_time_ms=3.0)]) is None      # no CUDA timings (CPU)
