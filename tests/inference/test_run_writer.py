"""CheckpointWriter: commits off the caller's thread, on count and on time, in submit
order; a write error stops it cleanly; consolidate_run turns shards into the final files."""

from __future__ import annotations

import errno
import threading
import time

import numpy as np
import pytest

from inference.request import RequestResult
from inference.run_outputs import consolidate_run, result_record
from inference.run_writer import CheckpointError, CheckpointPolicy, CheckpointWriter
from routing_replay import RoutingMeta, load_results, load_routing, run_layout
from routing_replay.run_layout import committed_shards, parse_results_lines, write_manifest

META = RoutingMeta(moe_layer_indices=[0, 1], num_layers=2, num_experts=8, topk=2, block_size=4, dtype="uint8")


def result(i: int, rng: np.random.Generator, failed: bool = False) -> RequestResult:
    if failed:
        return RequestResult.failed(f"r{i}", [1, 2], "too long")
    prompt, output = [3] * (2 + i % 3), [4] * (1 + i % 2)
    rows = len(prompt) + len(output) - 1
    routing = np.argsort(rng.random((rows, 2, 8)), axis=-1)[..., :2].astype(np.uint8)
    return RequestResult(f"r{i}", prompt, output, "length", routing=routing)


@pytest.fixture
def run_dir(tmp_path):
    write_manifest(tmp_path, {"status": "running", "attempt": 1, "num_requests": 7, "record_routing": True,
                              "world_size": 1, "fingerprint": {}})
    from routing_replay.outputs import save_routing_meta
    save_routing_meta(tmp_path, META)
    return tmp_path


def test_commits_every_n_results_in_submit_order(run_dir):
    rng = np.random.default_rng(0)
    results = [result(i, rng, failed=i == 3) for i in range(5)]
    writer = CheckpointWriter(run_dir, attempt=1, rank=0, routing_meta=META, policy=CheckpointPolicy(2, 3600))
    for r in results:
        writer.submit(r)
    writer.close()
    shards = committed_shards(run_dir)
    assert [len(parse_results_lines(s.results.read_bytes(), "x")) for s in shards] == [2, 2, 1]
    assert writer.num_committed == 5
    assert load_results(run_dir) == [result_record(r) for r in results]
    routings, _ = load_routing(run_dir)
    assert set(routings) == {"r0", "r1", "r2", "r4"}
    for r in results:
        if r.routing is not None:
            np.testing.assert_array_equal(routings[r.request_id], r.routing)


def test_commits_after_the_interval_without_more_results(run_dir):
    writer = CheckpointWriter(run_dir, attempt=1, rank=0, routing_meta=META, policy=CheckpointPolicy(1000, 0.05))
    writer.submit(result(0, np.random.default_rng(1)))
    deadline = time.monotonic() + 10
    while not committed_shards(run_dir) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [s.name for s in committed_shards(run_dir)] == ["a001-r0-000001"]
    writer.close()


def test_files_are_written_by_the_writer_thread_only(run_dir, monkeypatch):
    threads = []
    original = run_layout._open_for_write

    def spy(path):
        threads.append(threading.current_thread())
        return original(path)

    monkeypatch.setattr(run_layout, "_open_for_write", spy)
    writer = CheckpointWriter(run_dir, attempt=2, rank=1, routing_meta=META, policy=CheckpointPolicy(1, 3600))
    rng = np.random.default_rng(2)
    for i in range(3):
        writer.submit(result(i, rng))
    writer.flush()
    assert len(threads) == 6 and threading.current_thread() not in threads
    writer.close()


def test_a_write_error_is_reported_and_leaves_valid_files(run_dir, monkeypatch):
    rng = np.random.default_rng(3)
    writer = CheckpointWriter(run_dir, attempt=1, rank=0, routing_meta=META, policy=CheckpointPolicy(1, 3600))
    writer.submit(result(0, rng))
    writer.flush()

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_layout, "_open_for_write", full)
    writer.submit(result(1, rng))
    with pytest.raises(CheckpointError, match=r"a001-r0-000002 .*\[Errno 28\] No space left on device"):
        writer.flush()
    with pytest.raises(CheckpointError):
        writer.submit(result(2, rng))
    with pytest.raises(CheckpointError):
        writer.close()
    assert [r["id"] for r in load_results(run_dir)] == ["r0"] and writer.num_committed == 1
    assert not list(run_dir.rglob("*.tmp"))


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError, match="--checkpoint-every"):
        CheckpointPolicy(0, 1.0)
    with pytest.raises(ValueError, match="--checkpoint-interval"):
        CheckpointPolicy(1, 0.0)


def test_consolidate_writes_input_order_and_needs_every_request(run_dir):
    rng = np.random.default_rng(4)
    results = [result(i, rng) for i in range(4)]
    writer = CheckpointWriter(run_dir, attempt=1, rank=0, routing_meta=META, policy=CheckpointPolicy(3, 3600))
    for r in reversed(results):
        writer.submit(r)
    writer.close()
    with pytest.raises(ValueError, match="1 requests have no committed result"):
        consolidate_run(run_dir, ["r0", "r1", "r2", "r3", "r9"], META)
    files = consolidate_run(run_dir, ["r0", "r1", "r2", "r3"], META)
    assert [f.name for f in files] == ["results.jsonl", "routing.npz"]
    write_manifest(run_dir, {**run_layout.read_manifest(run_dir), "status": "complete"})
    assert [r["id"] for r in load_results(run_dir)] == ["r0", "r1", "r2", "r3"]
    routings, _ = load_routing(run_dir)
    for r in results:
        np.testing.assert_array_equal(routings[r.request_id], r.routing)
