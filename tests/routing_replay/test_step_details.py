import json

import numpy as np
import pytest

from routing_replay import STEP_KEYS, StepDetailsLog, step_kind

PHASES = ("gather", "store", "reconstruct", "finalize")


def random_entries(seed: int, num_steps: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    entries = []
    for step in range(num_steps):
        prefill, decode = int(rng.integers(0, 3)), int(rng.integers(0, 4))
        prefill_tokens = prefill * int(rng.integers(1, 50))
        entry = {
            "step": step,
            "prefill_requests": prefill,
            "decode_requests": decode,
            "active_tokens": prefill_tokens + decode,
            "padded_tokens": prefill_tokens + decode + int(rng.integers(0, 4)),
            "cuda_graph": prefill == 0,
            "step_time_ms": float(rng.uniform(1.0, 20.0)),
            "prefill_tokens": prefill_tokens,
            "decode_tokens": decode,
            "time_s": 0.01 * (step + 1),
        }
        for phase in PHASES:
            entry[f"routing_{phase}_ms"] = float(rng.uniform(0.0, 0.5))
        entries.append(entry)
    return entries


def filled_log(entries) -> StepDetailsLog:
    log = StepDetailsLog()
    for entry in entries:
        log.record(entry)
    return log


@pytest.mark.parametrize("missing", STEP_KEYS)
def test_record_requires_every_step_key(missing):
    entry = random_entries(0, 1)[0]
    del entry[missing]
    with pytest.raises(ValueError, match=missing):
        StepDetailsLog().record(entry)


def test_record_keeps_step_order_and_extra_keys():
    entries = random_entries(0, 3)
    log = filled_log(entries[:2])
    with pytest.raises(ValueError):
        log.record(entries[0])
    entries[2]["my_extra"] = "kept"
    log.record(entries[2])
    entries[2]["step_time_ms"] = -1.0  # later edits by the caller must not leak into the log
    assert log.entries[2]["my_extra"] == "kept"
    assert log.entries[2]["step_time_ms"] >= 1.0
    assert [e["step"] for e in log.entries] == [0, 1, 2]


@pytest.mark.parametrize("prefill,decode,kind", [
    (2, 0, "prefill"), (0, 5, "decode"), (1, 3, "mixed"), (0, 0, "decode")])
def test_step_kind(prefill, decode, kind):
    assert step_kind({"prefill_requests": prefill, "decode_requests": decode}) == kind


@pytest.mark.parametrize("seed", range(3))
def test_summary_matches_entries(seed):
    entries = random_entries(seed, 40)
    summary = filled_log(entries).summary()
    step_ms = sum(e["step_time_ms"] for e in entries)
    tokens = sum(e["active_tokens"] for e in entries)
    assert summary["num_steps"] == 40
    assert summary["total_step_time_ms"] == pytest.approx(step_ms)
    assert summary["total_tokens"] == tokens
    assert summary["prefill_tokens"] == sum(e["prefill_tokens"] for e in entries)
    assert summary["decode_tokens"] == sum(e["decode_tokens"] for e in entries)
    assert summary["wall_time_s"] == pytest.approx(entries[-1]["time_s"])
    assert summary["tokens_per_s"] == pytest.approx(tokens / (step_ms / 1000))
    decode_only = [e for e in entries if e["prefill_requests"] == 0]
    assert summary["decode_tokens_per_s"] == pytest.approx(
        sum(e["decode_tokens"] for e in decode_only) / (sum(e["step_time_ms"] for e in decode_only) / 1000))
    routing_ms = sum(e[f"routing_{p}_ms"] for e in entries for p in PHASES)
    assert summary["routing_share"] == pytest.approx(routing_ms / step_ms)
    assert sum(k["steps"] for k in summary["by_kind"].values()) == 40
    for kind, group in summary["by_kind"].items():
        members = [e for e in entries if step_kind(e) == kind]
        assert group["steps"] == len(members)
        group_ms = sum(e["step_time_ms"] for e in members)
        assert group["step_time_ms"]["total"] == pytest.approx(group_ms)
        for phase in PHASES:
            total = sum(e[f"routing_{phase}_ms"] for e in members)
            stats = group["routing"][phase]
            assert stats["total_ms"] == pytest.approx(total)
            if members:
                assert stats["mean_ms"] == pytest.approx(total / len(members))
                assert stats["share"] == pytest.approx(total / group_ms)


def test_summary_of_empty_log_has_no_rates():
    summary = StepDetailsLog().summary()
    assert summary["num_steps"] == 0 and summary["total_tokens"] == 0
    assert summary["tokens_per_s"] is None and summary["routing_share"] is None
    assert "wall_time_s" not in summary


def test_summary_omits_token_split_when_entries_lack_it():
    entries = random_entries(0, 5)
    for entry in entries:
        del entry["prefill_tokens"], entry["decode_tokens"], entry["time_s"]
    summary = filled_log(entries).summary()
    assert "prefill_tokens" not in summary and "wall_time_s" not in summary


def test_write_produces_json(tmp_path):
    entries = random_entries(2, 6)
    entries[0]["numpy_scalar"] = np.int64(7)
    entries[0]["numpy_float"] = np.float32(0.5)
    log = filled_log(entries)
    path = tmp_path / "nested" / "step_details.json"
    log.write(path, {"model": "tiny-moe", "kind": "overridden"})
    data = json.loads(path.read_text())
    assert data["meta"] == {"model": "tiny-moe", "kind": "step_details", "schema_version": 3}
    assert data["summary"]["num_steps"] == 6
    assert data["summary"]["total_step_time_ms"] == pytest.approx(sum(e["step_time_ms"] for e in entries))
    assert [e["step"] for e in data["step_details"]] == list(range(6))
    assert data["step_details"][0]["numpy_scalar"] == 7
    assert all(set(STEP_KEYS) <= set(e) for e in data["step_details"])


def test_a_bounded_log_keeps_the_last_entries_and_summarises_every_step(tmp_path):
    """The summary of a log keeping only its last entries equals the summary of an
    unbounded log of the same steps (every step counted), but for the dropped count; the
    file holds the kept entries and validates."""
    from routing_replay.schema import validate_step_details
    entries = random_entries(11, 40)
    full, bounded = filled_log(entries), StepDetailsLog(max_entries=7)
    for entry in entries:
        bounded.record(entry)
    assert len(bounded) == len(full) == 40 and bounded.num_dropped == 33
    assert bounded.entries == entries[-7:] and bounded.last_entry == entries[-1]
    summary = bounded.summary()
    assert summary.pop("dropped_entries") == 33 and "dropped_entries" not in full.summary()
    assert summary == full.summary()
    with pytest.raises(ValueError, match="strictly|after"):
        bounded.record(entries[-1])
    path = tmp_path / "step_details.json"
    bounded.write(path, {})
    document = json.loads(path.read_text())
    assert len(document["step_details"]) == 7 and document["summary"]["num_steps"] == 40
    assert validate_step_details(document) == []
    document["summary"]["dropped_entries"] = 32
    assert any("num_steps 40 != 7 entries + 32 dropped" in p for p in validate_step_details(document))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_a_bad_bound_is_refused(bad):
    with pytest.raises(ValueError, match="max_entries"):
        StepDetailsLog(max_entries=bad)
