"""Fault injection through the CLI: SIGKILL at random moments followed by --resume, a disk
that fills up part-way, an unwritable directory. After every fault the directory must be
valid, hold every request reported committed, and nothing that differs from an
uninterrupted run; the resumed run must end bit-identical to it (tokens and routing).

Kills go to real child processes of a pre-imported fork server (conftest.py), so 50 kills
cost seconds, not minutes of interpreter start-up."""

from __future__ import annotations

import os
import random
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from routing_replay import load_results, load_routing
from routing_replay.run_dir_schema import validate_run_dir

WORKLOAD = ["--record-routing", "--num-requests", "24", "--prompt-len", "6", "--output-len", "10",
            "--max-requests", "4", "--checkpoint-every", "1", "--log-level", "debug"]
# The sampled runs also use the asynchronous step pipeline (the CPU default is synchronous).
SAMPLED = ["--temperature", "0.9", "--top-p", "0.95", "--seed", "7", "--async-scheduling"]


def committed_ids(stderr: str) -> set[str]:
    """Ids the writer logged as committed ("checkpoint ... committed n results: [ids]")."""
    ids: set[str] = set()
    for line in stderr.splitlines():
        if "checkpoint " in line and " committed " in line:
            ids.update(orjson.loads(line[line.index("results: ") + len("results: "):]))
    return ids


def snapshot(out: Path) -> tuple[dict, dict]:
    """(results by id, routing by id) of what ``out`` holds now, checking it is valid."""
    if not (out / "run.json").exists():
        return {}, {}
    assert validate_run_dir(out) == []
    results = {r["id"]: r for r in load_results(out)}
    routing = load_routing(out)[0] if (out / "routing_meta.json").exists() else {}
    assert set(routing) == {i for i, r in results.items() if r["finish_reason"] != "error"}
    return results, routing


def assert_subset_of_reference(results: dict, routing: dict, reference: tuple[dict, dict]) -> None:
    ref_results, ref_routing = reference
    for request_id, record in results.items():
        expected = ref_results[request_id]
        assert (record["output_token_ids"], record["finish_reason"]) == \
            (expected["output_token_ids"], expected["finish_reason"]), request_id
        np.testing.assert_array_equal(routing[request_id], ref_routing[request_id])


def assert_equal_to_reference(out: Path, ref: Path) -> None:
    ours, theirs = load_results(out), load_results(ref)
    assert [r["id"] for r in ours] == [r["id"] for r in theirs]
    for a, b in zip(ours, theirs):
        assert (a["prompt_token_ids"], a["output_token_ids"], a["finish_reason"]) == \
            (b["prompt_token_ids"], b["output_token_ids"], b["finish_reason"])
    assert (out / "routing.npz").read_bytes() == (ref / "routing.npz").read_bytes()
    assert not (out / "checkpoint").exists()
    assert orjson.loads((out / "run.json").read_bytes())["status"] == "complete"


@pytest.fixture(scope="module")
def references(cli, tmp_path_factory) -> dict:
    """Uninterrupted runs: (directory, its contents, its wall time including start-up)."""
    refs = {}
    for name, extra in (("greedy", []), ("sampled", SAMPLED)):
        out = tmp_path_factory.mktemp(f"ref-{name}")
        start = time.monotonic()
        run = cli.run(WORKLOAD + extra + ["--output-dir", out])
        assert run.status == 0, run.stderr
        refs[name] = (out, snapshot(out), time.monotonic() - start)
    return refs


def kill_and_resume(cli, work: Path, extra: list[str], reference: tuple, num_kills: int, seed: int) -> int:
    """SIGKILL runs of one workload at random moments (uniform over the uninterrupted run's
    duration) until ``num_kills`` kills landed, resuming after each; a run that completes
    before its kill is checked against the reference, and the next kills start a fresh
    directory. Returns the number of completed runs."""
    rng = random.Random(seed)
    ref_dir, ref_snapshot, duration = reference
    kills = completed = cycle = 0
    while kills < num_kills:
        out, logged, on_disk = work / f"run{cycle}", set(), set()
        while True:
            pid = cli.start(WORKLOAD + extra + ["--output-dir", out, "--resume"])
            run = cli.wait(pid, timeout=rng.uniform(0.0, 1.1 * duration))
            if run is None:
                run = cli.kill(pid)
                kills += 1
            logged |= committed_ids(run.stderr)
            assert "Traceback" not in run.stderr, run.stderr
            results, routing = snapshot(out)
            assert logged <= set(results), "a request reported committed is missing"
            assert on_disk <= set(results), "a request on disk was lost"
            on_disk = set(results)
            assert_subset_of_reference(results, routing, ref_snapshot)
            if run.status != -signal.SIGKILL:
                assert run.status == 0, run.stderr
                assert_equal_to_reference(out, ref_dir)
                completed += 1
                break
        cycle += 1
    return completed


@pytest.mark.parametrize("mode, num_kills, seed", [("greedy", 30, 11), ("sampled", 20, 23)])
def test_sigkill_at_random_moments_then_resume(cli, references, tmp_path, mode, num_kills, seed):
    extra = SAMPLED if mode == "sampled" else []
    completed = kill_and_resume(cli, tmp_path, extra, references[mode], num_kills, seed)
    assert completed >= 1   # at least one killed-and-resumed run reached the end


def test_disk_full_part_way_then_resume(cli, references, tmp_path):
    """ENOSPC from the first write after 8 kB: exit 1 with a message, a valid directory
    holding every committed request, and --resume (with space again) completes it."""
    ref_dir, ref_snapshot, _ = references["greedy"]
    out = tmp_path / "out"
    run = cli.run(WORKLOAD + ["--output-dir", out], enospc_after=8_000)
    assert run.status == 1, run.stderr
    assert "No space left on device" in run.stderr and "--resume" in run.stderr
    assert "Traceback" not in run.stderr
    results, routing = snapshot(out)
    assert 0 < len(results) < 24 and committed_ids(run.stderr) == set(results)
    assert_subset_of_reference(results, routing, ref_snapshot)
    assert not list(out.rglob("*.tmp"))
    resumed = cli.run(WORKLOAD + ["--output-dir", out, "--resume"])
    assert resumed.status == 0, resumed.stderr
    assert_equal_to_reference(out, ref_dir)


def test_disk_full_while_consolidating_then_resume(cli, references, tmp_path):
    """Every request is committed, then writing the final routing.npz fails: exit 1, the
    shards stay the run's truth, and --resume only has to consolidate."""
    ref_dir, _, _ = references["greedy"]
    out = tmp_path / "out"
    run = cli.run(WORKLOAD + ["--output-dir", out], enospc_after=0, enospc_only="/routing.npz.tmp")
    assert run.status == 1 and "cannot finish" in run.stderr and "Traceback" not in run.stderr, run.stderr
    results, _ = snapshot(out)
    assert len(results) == 24 and orjson.loads((out / "run.json").read_bytes())["status"] == "running"
    resumed = cli.run(WORKLOAD + ["--output-dir", out, "--resume"])
    assert resumed.status == 0 and "0 finished, 0 failed (24 more were already on disk)" in resumed.stdout
    assert_equal_to_reference(out, ref_dir)


def _make_unwritable(path: Path) -> bool:
    """chmod when not root; as root (permissions do not apply) the immutable attribute."""
    path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if not os.access(path, os.W_OK):
        return True
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        return True
    return False


def _restore(path: Path) -> None:
    if shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(stat.S_IRWXU)


@pytest.mark.parametrize("where", ["existing", "below"])
def test_unwritable_output_dir_fails_before_any_work(cli, tmp_path, where):
    locked = tmp_path / "locked"
    locked.mkdir()
    if not _make_unwritable(locked):
        pytest.skip("cannot make a directory unwritable here (root without chattr)")
    try:
        target = locked if where == "existing" else locked / "new" / "out"
        run = cli.run(WORKLOAD + ["--output-dir", target])
        assert run.status == 2, run.stderr
        assert f"cannot create files in {locked}" in run.stderr and "Traceback" not in run.stderr
        assert "run summary" not in run.stdout
    finally:
        _restore(locked)
    assert list(locked.iterdir()) == []
