"""The tensor/expert-parallel engine under NCCL, one rank per GPU (fp32, CUDA-graph decode
with the collectives captured, asynchronous and synchronous scheduling): the same tokens and
routing as the single-GPU engine through prefix-cache hits, chunked prefill and preemption;
hybrid models (only their MoE layers split) included; then the CLI through torchrun with
TP=2, EP=2 and TP2 x EP2 equal to the single-GPU run.
Skips without 2 (or 4) GPUs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.inference.parallel.engine_checks import EngineCase, run_engine_cases, serve_case
from tests.inference.parallel.harness import run_ranks

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA devices")
ROOT = Path(__file__).resolve().parents[2]
CASES = {
    2: [EngineCase("tiny", 2, 1, True), EngineCase("tiny", 2, 2, False), EngineCase("rich", 2, 2, True),
        EngineCase("oss", 2, 2, True), EngineCase("mla", 2, 1, True, refit=True),
        EngineCase("gdn", 2, 2, True), EngineCase("mamba", 2, 1, True, refit=True)],
    4: [EngineCase("tiny", 2, 2, True, tag="-dp2"), EngineCase("rich", 4, 4, True), EngineCase("sigmoid", 4, 2, False),
        EngineCase("rich", 4, 2, True), EngineCase("gdn", 4, 2, True), EngineCase("mamba", 2, 2, False, tag="-dp2")],
}


def _requests(out: dict, case: str) -> set[str]:
    return {k.split("/")[1] for k in out if k.startswith(case + "/") and k.endswith("/tokens")}


@pytest.mark.parametrize("world_size", [2, 4])
def test_nccl_engine_serves_what_the_single_gpu_engine_serves(world_size):
    if GPUS < world_size:
        pytest.skip(f"needs {world_size} CUDA devices, found {GPUS}")
    results = run_ranks(run_engine_cases, world_size, CASES[world_size], "cuda", backend="nccl", timeout=400)
    for case in CASES[world_size]:
        dp, checked = world_size // case.tp, 0
        single = {d: serve_case(case, None, d, dp, "cuda:0") for d in range(dp)}
        for rank, out in enumerate(results):
            dp_rank, leader = int(out[f"{case.name}/dp_rank"]), bool(out[f"{case.name}/leader"])
            want = single[dp_rank]
            ids = _requests(want, case.name)
            assert ids and _requests(out, case.name) == ids
            for rid in ids:
                key = f"{case.name}/{rid}"
                assert np.array_equal(out[f"{key}/tokens"], want[f"{key}/tokens"]), f"{key} rank {rank}"
                assert (f"{key}/routing" in out) == leader
                if leader:
                    assert np.array_equal(out[f"{key}/routing"], want[f"{key}/routing"]), f"{key} rank {rank}"
                    checked += 1
        assert checked == sum(len(_requests(single[d], case.name)) for d in range(dp))


WORKLOAD = ["--record-routing", "--num-requests", "12", "--prompt-len", "40", "--output-len", "24",
            "--shared-prefix-len", "16", "--ignore-eos", "--block-size", "16", "--num-kv-blocks", "40",
            "--max-step-tokens", "64", "--max-requests", "8", "--dtype", "float32"]


def _run(args: list[str], nproc: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable] if nproc == 0 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc-per-node", str(nproc)]
    return subprocess.run(launcher + [str(ROOT / "tools" / "run_inference.py")] + args, capture_output=True, text=True,
                          timeout=400, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def single_gpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single-gpu")
    proc = _run(WORKLOAD + ["--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("tp,ep,nproc", [(2, 1, 2), (2, 2, 2), (2, 2, 4)])
def test_cli_under_torchrun_equals_the_single_gpu_run(single_gpu_run, tmp_path, tp, ep, nproc):
    if GPUS < nproc:
        pytest.skip(f"needs {nproc} CUDA devices, found {GPUS}")
    from routing_replay import load_results, load_routing
    proc = _run(WORKLOAD + ["--tensor-parallel-size", str(tp), "--expert-parallel-size", str(ep),
                            "--output-dir", str(tmp_path)], nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = load_results(tmp_path), load_results(single_gpu_run)
    assert [r["output_token_ids"] for r in got] == [r["output_token_ids"] for r in want]
    routing, _ = load_routing(tmp_path)
    for key, value in load_routing(single_gpu_run)[0].items():
        assert np.array_equal(routing[key], value), key
