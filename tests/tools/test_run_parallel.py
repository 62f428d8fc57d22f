"""The CLI with tensor and expert parallelism (gloo, fp32): --tensor-parallel-size 2,
--expert-parallel-size 2 and TP x DP give the single-process run's tokens and routing,
through prefix caching, chunked prefill and preemption, with synchronous and asynchronous
scheduling; a signal on one rank stops its replica together and --resume completes the run;
bad layouts are refused before anything is allocated; --dry-run prints every rank's plan.

The multi-rank runs go through ``main`` in forked gloo ranks (``parallel_cli``), as
torchrun's processes run it; one run goes through torchrun itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

from routing_replay import load_results, load_routing
from routing_replay.run_dir_schema import validate_run_dir
from routing_replay.run_layout import committed_shards, read_manifest, shard_records
from tests.inference.parallel.harness import run_ranks
from tests.tools.parallel_cli import run_cli

ROOT = Path(__file__).resolve().parents[2]
# 6 requests with a 12-token common prefix (prefix-cache hits), prompts longer than the step
# budget (chunked prefill), a KV cache too small for 4 running requests (preemption).
WORKLOAD = ["--record-routing", "--num-requests", "6", "--prompt-len", "20", "--output-len", "8",
            "--shared-prefix-len", "12", "--ignore-eos", "--block-size", "4", "--num-kv-blocks", "14",
            "--max-step-tokens", "16", "--max-requests", "4", "--checkpoint-every", "1",
            "--replica-check-interval", "2"]
ASYNC, SYNC = ["--async-scheduling"], ["--no-async-scheduling"]


def _layout(tp: int, ep: int) -> list[str]:
    return ["--tensor-parallel-size", str(tp), "--expert-parallel-size", str(ep)]


@pytest.fixture(scope="module")
def single(cli, tmp_path_factory):
    """The single-process runs, per scheduling mode."""
    runs = {}
    for name, mode in (("async", ASYNC), ("sync", SYNC)):
        out = tmp_path_factory.mktemp(f"single-{name}")
        run = cli.run(WORKLOAD + mode + ["--output-dir", out])
        assert run.status == 0, run.stderr
        runs[name] = out
    return runs


def assert_same_run(out: Path, reference: Path, same_schedule: bool = True) -> None:
    """Tokens and routing equal the reference; log-probs within fp32 reordering error; with
    the same scheduling mode the schedule-dependent fields (prefix hits, preemptions) too."""
    assert validate_run_dir(out) == []
    got, want = load_results(out), load_results(reference)
    assert [r["id"] for r in got] == [r["id"] for r in want]
    routing, _ = load_routing(out)
    want_routing, _ = load_routing(reference)
    assert set(routing) == set(want_routing) == {r["id"] for r in want}
    for a, b in zip(got, want):
        assert a["output_token_ids"] == b["output_token_ids"], a["id"]
        np.testing.assert_allclose(a["output_logprobs"], b["output_logprobs"], atol=1e-4)
        assert np.array_equal(routing[a["id"]], want_routing[a["id"]]), a["id"]
        if same_schedule:
            assert (a["num_cached_tokens"], a["num_preemptions"]) == (b["num_cached_tokens"], b["num_preemptions"])


def test_reference_workload_hits_the_prefix_cache_and_preempts(single):
    for out in single.values():
        results = load_results(out)
        assert sum(r["num_cached_tokens"] for r in results) > 0
        assert sum(r["num_preemptions"] for r in results) > 0


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-2ranks")
    argvs = {"tp2-sync": WORKLOAD + SYNC + _layout(2, 1), "tp2-ep2-async": WORKLOAD + ASYNC + _layout(2, 2),
             "interrupted": WORKLOAD + ASYNC + _layout(2, 2), "world-mismatch": WORKLOAD + _layout(4, 1)}
    argvs = {k: v + ["--output-dir", str(root / k)] for k, v in argvs.items()}
    argvs["resumed"] = argvs["interrupted"] + ["--resume"]
    names = list(argvs)
    results = run_ranks(run_cli, 2, list(argvs.values()), 1, names.index("interrupted"), 14, timeout=240)
    return root, {name: [int(r[f"exit{i}"]) for r in results] for i, name in enumerate(names)}, results, names


@pytest.mark.parametrize("name,mode", [("tp2-sync", "sync"), ("tp2-ep2-async", "async")])
def test_two_ranks_equal_the_single_process_run(two_ranks, single, name, mode):
    root, codes, _, _ = two_ranks
    assert codes[name] == [0, 0]
    assert_same_run(root / name, single[mode])
    manifest = read_manifest(root / name)
    assert (manifest["world_size"], manifest["tensor_parallel_size"]) == (1, 2)
    details = orjson.loads((root / name / "step_details.json").read_bytes())
    assert details["meta"]["tensor_parallel_size"] == 2 and not (root / name / "rank1").exists()


def test_a_signal_on_one_rank_stops_its_replica_and_resume_completes(two_ranks, single):
    root, codes, results, names = two_ranks
    assert codes["interrupted"] == [143, 143], "both ranks stop together, on the signal one of them received"
    assert codes["resumed"] == [0, 0]
    out = root / "interrupted"                    # --resume continued the interrupted run in place
    assert_same_run(out, single["async"], same_schedule=False)
    assert read_manifest(out)["attempt"] == 2
    meta = orjson.loads((out / "step_details.json").read_bytes())["meta"]
    assert 0 < meta["resumed_requests"] < 6, "the interrupted attempt committed some requests, not all"


def test_world_not_divisible_is_refused_on_every_rank(two_ranks):
    root, codes, _, _ = two_ranks
    assert codes["world-mismatch"] == [2, 2]
    assert not (root / "world-mismatch").exists()


def test_four_ranks_tp_x_dp_and_replicated_kv_heads(tmp_path, single):
    argvs = {"tp2-ep2-dp2": WORKLOAD + ASYNC + _layout(2, 2), "tp4-ep2": WORKLOAD + SYNC + _layout(4, 2)}
    results = run_ranks(run_cli, 4, [v + ["--output-dir", str(tmp_path / k)] for k, v in argvs.items()],
                        timeout=240)
    assert [int(r["exit0"]) for r in results] == [0] * 4 and [int(r["exit1"]) for r in results] == [0] * 4
    # Two replicas split the requests: the schedule differs from one engine's, tokens do not.
    assert_same_run(tmp_path / "tp2-ep2-dp2", single["async"], same_schedule=False)
    assert (tmp_path / "tp2-ep2-dp2" / "rank1" / "step_details.json").is_file()
    assert not (tmp_path / "tp2-ep2-dp2" / "rank2").exists()
    assert_same_run(tmp_path / "tp4-ep2", single["sync"])


def test_torchrun_two_ranks_tensor_and_expert_parallel(tmp_path, single):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tools" / "run_inference.py")] + WORKLOAD + SYNC + _layout(2, 2) + ["--output-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run summary" in proc.stdout
    assert_same_run(tmp_path, single["sync"])


@pytest.mark.parametrize("args, messages", [
    (_layout(2, 1), ["world size 1 is not divisible by --tensor-parallel-size 2"]),
    (_layout(8, 1) + ["--dry-run"], ["--tensor-parallel-size 8 does not divide the 4 attention heads"]),
    (_layout(3, 3), ["world size 1 is not divisible", "does not divide the 4 attention heads",
                     "--expert-parallel-size 3 does not divide the 8 experts"]),
    (_layout(2, 4) + ["--dry-run"], ["--expert-parallel-size 4 must divide --tensor-parallel-size 2"]),
    (_layout(0, 1), ["--tensor-parallel-size must be >= 1"]),
])
def test_bad_layouts_are_refused_before_anything_is_allocated(cli, tmp_path, args, messages):
    out = tmp_path / "out"
    run = cli.run(args + ["--output-dir", out])
    assert run.status == 2, run.stderr
    for message in messages:
        assert message in run.stderr, run.stderr
    assert not out.exists()


def test_dry_run_prints_every_ranks_memory_plan(cli):
    run = cli.run(["--dry-run", "--record-routing", "--num-kv-blocks", "100"] + _layout(4, 2))
    assert run.status == 0, run.stderr
    assert "memory plan (rank 0)" in run.stdout and "per-rank plan" in run.stdout
    assert "ranks 0,1,2,3: weights" in run.stdout          # tiny-moe splits evenly over 4 ranks
    assert "world 4 = 1 data-parallel replica(s) x tensor-parallel 4" in run.stdout
    single = cli.run(["--dry-run", "--record-routing", "--num-kv-blocks", "100"])
    weights = [line for line in run.stdout.splitlines() if line.strip().startswith("weights")]
    single_weights = [line for line in single.stdout.splitlines() if line.strip().startswith("weights")]
    assert weights and single_weights and weights != single_weights


def test_dry_run_of_a_hybrid_plans_replicated_blocks_and_refuses_bad_expert_layouts(cli):
    """tp = 8 is past the 4 attention heads: a hybrid replicates its attention, so it plans;
    every rank holds the whole KV cache and state, so only the weights shrink."""
    args = ["--dry-run", "--record-routing", "--num-kv-blocks", "100", "--model", "tiny-hybrid-gdn"]
    run = cli.run(args + _layout(8, 4))
    assert run.status == 0, run.stderr
    assert "only the MoE layers split, attention, recurrent layers, dense MLPs and their state replicated" in run.stdout
    plan = [line for line in run.stdout.splitlines() if line.strip().startswith("ranks 0,1,2,3,4,5,6,7: weights")]
    single = cli.run(args)
    rows = {line.split()[0]: line for line in single.stdout.splitlines() if line.startswith("  ")}
    assert len(plan) == 1 and "recurrent state" in plan[0]
    kv, weights = rows["KV"].split()[2:4], rows["weights"].split()[1:3]
    assert f"KV cache {' '.join(kv)}," in plan[0] and f"weights {' '.join(weights)}," not in plan[0]
    refused = cli.run(args + _layout(6, 3))
    assert refused.status == 2 and "--expert-parallel-size 3 does not divide the 8 experts" in refused.stderr


def test_data_parallel_replicas_keep_each_rl_group_together(tmp_path, cli):
    """Two replicas, groups of two samples: each group is served by one replica, so the
    second sample of every prompt hits the first one's blocks (split round robin by
    request, as before, no sample would); tokens and routing equal one process's run."""
    argv = ["--record-routing", "--num-requests", "5", "--samples-per-prompt", "2", "--prompt-len", "20",
            "--output-len", "5", "--ignore-eos", "--temperature", "1.0", "--block-size", "4"]
    single = tmp_path / "single"
    assert cli.run(argv + ["--output-dir", single]).status == 0
    results = run_ranks(run_cli, 2, [argv + ["--output-dir", str(tmp_path / "dp2")]], timeout=240)
    assert [int(r["exit0"]) for r in results] == [0, 0]
    assert_same_run(tmp_path / "dp2", single, same_schedule=False)
    got = load_results(tmp_path / "dp2")
    assert [r["id"] for r in got] == [f"{p}_{k}" for p in range(5) for k in range(2)]
    assert all(r["num_cached_tokens"] == 16 for r in got if r["sample_index"] == 1)
    details = [orjson.loads((tmp_path / "dp2" / f"rank{rank}" / "step_details.json").read_bytes())
               for rank in range(2)]
    assert [d["summary"]["prefill_tokens"] for d in details] == [3 * (20 + 4), 2 * (20 + 4)]


def test_an_interrupted_grouped_run_resumes_with_another_number_of_replicas(tmp_path, cli):
    """Replica 1 of 2 is stopped (SIGTERM after 7 steps) with one of its groups half on disk;
    one process resumes the run: the rest of that group and the unserved groups are served
    and the consolidated run equals one process's, group fields included, in input order."""
    argv = ["--record-routing", "--num-requests", "4", "--samples-per-prompt", "3", "--prompt-len", "12",
            "--output-len", "6", "--ignore-eos", "--temperature", "1.0", "--block-size", "4", "--max-requests", "2",
            "--checkpoint-every", "1", "--no-async-scheduling"]
    single, out = tmp_path / "single", tmp_path / "out"
    assert cli.run(argv + ["--output-dir", single]).status == 0
    results = run_ranks(run_cli, 2, [argv + ["--output-dir", str(out)]], 1, 0, 7, timeout=240)
    assert [int(r["exit0"]) for r in results] == [0, 143]
    done = set(shard_records(committed_shards(out)))
    assert {f"{p}_{k}" for p in (0, 2) for k in range(3)} <= done, "replica 0 served its groups 0 and 2"
    split = [p for p in (1, 3) if 0 < sum(f"{p}_{k}" in done for k in range(3)) < 3]
    assert split, f"a group of replica 1 must be half on disk: {sorted(done)}"
    resumed = cli.run(argv + ["--output-dir", out, "--resume"])
    assert resumed.status == 0, resumed.stderr
    assert_same_run(out, single, same_schedule=False)
    got = load_results(out)
    assert [(r["id"], r["prompt_id"], r["sample_index"]) for r in got] == [
        (f"{p}_{k}", str(p), k) for p in range(4) for k in range(3)]
    assert read_manifest(out)["attempt"] == 2
