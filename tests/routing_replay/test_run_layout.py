"""routing_replay.run_layout and the readers built on it: request-id rules, the npz key
scheme, crash-safe writes, checkpoint shards, and validation of an interrupted run."""

from __future__ import annotations

import errno
import zipfile
from pathlib import Path

import numpy as np
import orjson
import pytest

from routing_replay import RoutingMeta, load_results, load_routing, save_routing
from routing_replay import run_layout
from routing_replay.run_dir_schema import validate_run_dir
from routing_replay.run_layout import (atomic_write, committed_shards, npz_writer, request_id_from_key,
                                       request_id_problem, routing_key, shard_name, shard_paths, write_manifest)

META = RoutingMeta(moe_layer_indices=[1, 2], num_layers=3, num_experts=8, topk=2, block_size=4, dtype="uint8")


def routing(rng: np.random.Generator, rows: int) -> np.ndarray:
    return np.argsort(rng.random((rows, 2, 8)), axis=-1)[..., :2].astype(np.uint8)


def record(request_id: str, rows: int | None, finish_reason: str = "length") -> dict:
    prompt = [5] * 3
    out = {"id": request_id, "prompt_token_ids": prompt, "output_token_ids": [7] * ((rows or 3) - 2),
           "finish_reason": finish_reason}
    if finish_reason == "error":
        return {**out, "output_token_ids": [], "error": "bad"}
    if rows is not None:
        out.update(routing_shape=[rows, 2, 2], routing_dtype="uint8")
    return out


def commit_shard(out: Path, name: str, records: list[dict], routings: dict) -> None:
    results_path, routing_path = shard_paths(out, name)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    if routings:
        atomic_write(routing_path, npz_writer(routings))
    atomic_write(results_path, b"".join(orjson.dumps(r) + b"\n" for r in records))


def in_progress_run(out: Path, status: str = "interrupted") -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, {"status": status, "attempt": 2, "num_requests": 5, "record_routing": True,
                         "world_size": 2, "fingerprint": {}})
    save_routing(out, {}, META)
    (out / "routing.npz").unlink()


# ----------------------------------------------------------------------------- ids and keys
@pytest.mark.parametrize("request_id", ["0", "req-1", "a.b", "../../evil", "/abs", "a/b\\c", "100%", "%41",
                                        "sp ace", "ünï", "日本", "emoji😀", "x" * 256, "..", "."])
def test_routing_key_round_trips_and_is_never_a_path(request_id):
    key = routing_key(request_id)
    assert request_id_from_key(key) == request_id
    assert set(key) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-%")
    assert "/" not in key and "\\" not in key


def test_plain_ids_are_their_own_keys_and_keys_are_injective():
    assert routing_key("req-1.a_B") == "req-1.a_B"
    assert routing_key("%41") != routing_key("A") and routing_key("%41") == "%2541"


@pytest.mark.parametrize("bad, reason", [(None, "must be a string"), (3, "must be a string"), ("", "must not be empty"),
                                         ("a\x00", "control character"), ("a\n", "control character"),
                                         ("\x7f", "control character"), ("\u2029", "control character"),
                                         ("x" * 257, "at most 256")])
def test_request_id_problem(bad, reason):
    assert reason in request_id_problem(bad)


def test_request_id_problem_accepts_printable_ids():
    assert all(request_id_problem(i) is None for i in ("a", "x" * 256, "../../evil", "ünï", "tab-free id"))


def test_save_routing_rejects_bad_ids(tmp_path):
    with pytest.raises(ValueError, match="control character"):
        save_routing(tmp_path, {"a\x00b": np.zeros((1, 2, 2), np.uint8)}, META)
    assert not (tmp_path / "routing.npz").exists()


def test_saved_npz_loads_with_numpy_under_encoded_keys(tmp_path):
    rng = np.random.default_rng(0)
    routings = {"../x": routing(rng, 3), "plain": routing(rng, 2)}
    save_routing(tmp_path, routings, META)
    with np.load(tmp_path / "routing.npz", allow_pickle=False) as archive:
        assert sorted(archive.files) == ["..%2Fx", "plain"]
        np.testing.assert_array_equal(archive["..%2Fx"], routings["../x"])
    loaded, meta = load_routing(tmp_path)
    assert set(loaded) == set(routings) and meta.schema_version == 2
    save_routing(tmp_path / "again", routings, META)   # fixed timestamps: same routing, same bytes
    assert (tmp_path / "again" / "routing.npz").read_bytes() == (tmp_path / "routing.npz").read_bytes()


def test_version_1_directory_stays_readable(tmp_path):
    """A version-1 routing.npz keyed raw ids (np.savez) with schema_version 1 metadata."""
    rng = np.random.default_rng(1)
    arrays = {"a.b": routing(rng, 4), "req-2": routing(rng, 3)}
    np.savez(tmp_path / "routing.npz", **arrays)
    (tmp_path / "routing_meta.json").write_bytes(orjson.dumps({**META.to_dict(), "schema_version": 1}))
    (tmp_path / "results.jsonl").write_bytes(b"".join(orjson.dumps(record(i, len(a))) + b"\n" for i, a in arrays.items()))
    loaded, meta = load_routing(tmp_path)
    assert meta.schema_version == 1 and set(loaded) == set(arrays)
    assert [r["id"] for r in load_results(tmp_path)] == ["a.b", "req-2"]
    assert validate_run_dir(tmp_path) == []


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_write_failure_leaves_the_old_file_and_no_tmp(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    atomic_write(target, b"old")

    class Full:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    original = run_layout._open_for_write
    monkeypatch.setattr(run_layout, "_open_for_write", lambda path: Full(original(path)))
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


# ----------------------------------------------------------------------------- shards
def test_shards_are_read_in_commit_order_and_leftovers_ignored(tmp_path):
    rng = np.random.default_rng(2)
    out = tmp_path / "run"
    in_progress_run(out)
    r = {i: routing(rng, 4) for i in ("a", "b", "c")}
    commit_shard(out, shard_name(1, 1, 1), [record("b", 4)], {"b": r["b"]})
    commit_shard(out, shard_name(1, 0, 1), [record("a", 4), record("x", None, "error")], {"a": r["a"]})
    commit_shard(out, shard_name(2, 0, 1), [record("x", 4)], {"x": r["c"]})    # x failed, then served again
    # crash leftovers: a routing shard whose results never got renamed into place, a tmp file
    atomic_write(shard_paths(out, shard_name(2, 0, 2))[1], npz_writer({"ghost": r["c"]}))
    (out / "checkpoint" / "results-a002-r0-000003.jsonl.tmp").write_bytes(b'{"id": "torn"')
    assert [s.name for s in committed_shards(out)] == ["a001-r0-000001", "a001-r1-000001", "a002-r0-000001"]
    results = load_results(out)
    assert [x["id"] for x in results] == ["a", "b", "x"] and results[2]["finish_reason"] == "length"
    loaded, _ = load_routing(out)
    assert set(loaded) == {"a", "b", "x"}
    np.testing.assert_array_equal(loaded["x"], r["c"])
    assert validate_run_dir(out) == []


def test_an_interrupted_run_with_no_shard_yet_is_valid_and_empty(tmp_path):
    in_progress_run(tmp_path / "run", status="running")
    assert validate_run_dir(tmp_path / "run") == []
    assert load_results(tmp_path / "run") == [] and load_routing(tmp_path / "run")[0] == {}


def test_stale_consolidated_files_are_ignored_while_in_progress(tmp_path):
    rng = np.random.default_rng(3)
    out = tmp_path / "run"
    in_progress_run(out)
    (out / "results.jsonl").write_bytes(orjson.dumps(record("old", 2)) + b"\n")
    commit_shard(out, shard_name(1, 0, 1), [record("a", 4)], {"a": routing(rng, 4)})
    assert [x["id"] for x in load_results(out)] == ["a"] and set(load_routing(out)[0]) == {"a"}


@pytest.mark.parametrize("damage, expected", [
    ("finished twice", "finished in shard a001-r0-000001 and appears again"),
    ("rows", "shape [4, 2, 2] != routing_shape [5, 2, 2]"),
    ("missing routing shard", "declares routing_shape but its routing shard is missing"),
    ("no routing although recorded", "has no routing although routing was recorded"),
    ("bad json", "not valid JSON"),
    ("manifest", "status must be one of"),
])
def test_validation_of_an_interrupted_run_names_the_problem(tmp_path, damage, expected):
    rng = np.random.default_rng(4)
    out = tmp_path / "run"
    in_progress_run(out)
    commit_shard(out, shard_name(1, 0, 1), [record("a", 4)], {"a": routing(rng, 4)})
    assert validate_run_dir(out) == []
    second = shard_name(1, 0, 2)
    if damage == "finished twice":
        commit_shard(out, second, [record("a", 4)], {"a": routing(rng, 4)})
    elif damage == "rows":
        commit_shard(out, second, [record("b", 5)], {"b": routing(rng, 4)})
    elif damage == "missing routing shard":
        commit_shard(out, second, [record("b", 4)], {})
    elif damage == "no routing although recorded":
        commit_shard(out, second, [record("b", None)], {})
    elif damage == "bad json":
        shard_paths(out, second)[0].write_bytes(b"{not json\n")
    else:
        write_manifest(out, {"status": "paused", "attempt": 1, "num_requests": 5, "record_routing": True,
                             "world_size": 1, "fingerprint": {}})
    problems = validate_run_dir(out)
    assert any(expected in p for p in problems), problems


def test_npz_members_are_deflated_with_fixed_metadata(tmp_path):
    atomic_write(tmp_path / "r.npz", npz_writer({"a": np.zeros((2, 2, 2), np.uint8)}))
    info = zipfile.ZipFile(tmp_path / "r.npz").infolist()[0]
    assert info.filename == "a.npy" and info.compress_type == zipfile.ZIP_DEFLATED and info.date_time == (1980, 1, 1, 0, 0, 0)
