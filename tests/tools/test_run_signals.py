"""SIGINT / SIGTERM / SIGKILL sent to the real CLI (``python tools/run_inference.py``, and
under torchrun): valid partial output, the documented exit code and a resume hint, and a
--resume that ends equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from routing_replay import load_results, load_routing
from routing_replay.run_dir_schema import validate_run_dir
from routing_replay.run_layout import read_manifest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "run_inference.py"
WORKLOAD = ["--record-routing", "--num-requests", "40", "--prompt-len", "6", "--output-len", "8",
            "--max-requests", "2", "--checkpoint-every", "1", "--log-level", "debug"]


def start(args: list[str], launcher: list[str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen((launcher or [sys.executable]) + [str(SCRIPT)] + [str(a) for a in args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def wait_for_commits(proc: subprocess.Popen, count: int, timeout: float = 120,
                     ranks: tuple[str, ...] = ()) -> list[str]:
    """Read stderr until ``count`` checkpoints were committed (by each of ``ranks``, e.g.
    "r0", when given: under load one rank may run ahead); the lines read so far."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError("the run ended before it was signalled:\n" + "".join(lines[-20:]))
        lines.append(line)
        commits = [x for x in lines if " committed " in x]
        if all(sum(f"-{rank}-" in x for x in commits) >= count for rank in ranks) and len(commits) >= count:
            return lines
    raise AssertionError("no checkpoint in time")


@pytest.fixture(scope="module")
def reference(cli, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    run = cli.run(WORKLOAD + ["--output-dir", out])
    assert run.status == 0, run.stderr
    return out


def assert_partial_and_resumable(cli, out: Path, reference: Path, extra: tuple = ()) -> None:
    assert validate_run_dir(out) == []
    assert read_manifest(out)["status"] in ("interrupted", "running")
    partial = {r["id"]: r for r in load_results(out)}
    expected = {r["id"]: r for r in load_results(reference)}
    routing, ref_routing = load_routing(out)[0], load_routing(reference)[0]
    assert 0 < len(partial) < len(expected)
    for request_id, record in partial.items():
        assert record["output_token_ids"] == expected[request_id]["output_token_ids"]
        np.testing.assert_array_equal(routing[request_id], ref_routing[request_id])
    resumed = cli.run(WORKLOAD + list(extra) + ["--output-dir", out, "--resume"])
    assert resumed.status == 0, resumed.stderr
    assert [r["output_token_ids"] for r in load_results(out)] == [r["output_token_ids"] for r in load_results(reference)]
    assert (out / "routing.npz").read_bytes() == (reference / "routing.npz").read_bytes()


@pytest.mark.parametrize("sig, code, extra", [(signal.SIGINT, 130, ()), (signal.SIGTERM, 143, ("--async-scheduling",))],
                         ids=["SIGINT", "SIGTERM-async"])
def test_signal_mid_run_saves_and_resumes(cli, reference, tmp_path, sig, code, extra):
    """The reference ran synchronously: the asynchronous pipeline, interrupted and resumed,
    also ends bit-identical to it."""
    out = tmp_path / "out"
    proc = start(WORKLOAD + list(extra) + ["--output-dir", out])
    seen = wait_for_commits(proc, 2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    stderr = "".join(seen) + stderr
    assert proc.returncode == code, stderr[-3000:]
    assert f"interrupted by {sig.name}" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr and "run summary" in stdout
    assert read_manifest(out)["status"] == "interrupted" and (out / "step_details.json").is_file()
    assert_partial_and_resumable(cli, out, reference, extra)


def test_second_sigint_exits_at_once_with_valid_files(cli, reference, tmp_path):
    out = tmp_path / "out"
    proc = start(WORKLOAD + ["--output-dir", out])
    seen = wait_for_commits(proc, 2)
    proc.send_signal(signal.SIGINT)
    while "SIGINT received: stopping" not in seen[-1]:
        seen.append(proc.stderr.readline())
        assert seen[-1], "the run ended without acknowledging SIGINT"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    stderr = "".join(seen) + stderr
    assert proc.returncode == 130 and "Traceback" not in stderr
    # the second signal exits at once, unless the clean stop had already finished
    assert "SIGINT received again: exiting now" in stderr or "interrupted by SIGINT" in stderr
    assert_partial_and_resumable(cli, out, reference)


def test_sigkill_of_the_real_cli(cli, reference, tmp_path):
    out = tmp_path / "out"
    proc = start(WORKLOAD + ["--output-dir", out])
    wait_for_commits(proc, 3)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert read_manifest(out)["status"] == "running"
    assert_partial_and_resumable(cli, out, reference)


def test_sigterm_under_torchrun_every_rank_saves(cli, reference, tmp_path):
    out = tmp_path / "out"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = start(WORKLOAD + ["--output-dir", out], launcher=launcher)
    wait_for_commits(proc, 3, ranks=("r0", "r1"))
    proc.send_signal(signal.SIGTERM)      # torchrun forwards it to both ranks
    _, stderr = proc.communicate(timeout=120)
    assert stderr.count("interrupted by SIGTERM") == 2, stderr[-3000:]
    ranks = {s.name.split("-")[2] for s in (out / "checkpoint").glob("results-*.jsonl")}
    assert ranks == {"r0", "r1"}
    assert (out / "rank0" / "step_details.json").is_file() and (out / "rank1" / "step_details.json").is_file()
    assert_partial_and_resumable(cli, out, reference)
