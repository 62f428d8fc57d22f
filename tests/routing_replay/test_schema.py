"""routing_replay.schema: the validators accept what a run writes and name what is broken."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import orjson
import pytest

from routing_replay import StepDetailsLog
from routing_replay.phase_timer import phase_keys
from routing_replay.step_details import ENGINE_STAGES, ROUTING_SUBPHASES
from routing_replay.schema import (
    SchemaError,
    load_step_details,
    validate_results_line,
    validate_routing_meta,
    validate_routing_npz,
    validate_run_dir,
    validate_step_details,
)

REPO = Path(__file__).resolve().parents[2]
RUN_INFERENCE = REPO / "tools" / "run_inference.py"
NUM_LAYERS, MOE_LAYERS, NUM_EXPERTS, TOPK = 4, [1, 2, 3], 8, 2


# ----------------------------------------------------------------------------- a synthetic run
def make_step_details(rng: np.random.Generator, num_steps: int = 12, record_routing: bool = True) -> dict:
    entries, clock = [], 0.0
    for step in range(num_steps):
        prefill = int(rng.integers(1, 3)) if step < 4 else 0
        decode = int(rng.integers(1, 6)) if step >= 2 else 0
        prefill_tokens = prefill * int(rng.integers(4, 20))
        active = prefill_tokens + decode
        step_ms = float(rng.uniform(1.0, 9.0))
        clock += step_ms / 1000.0
        phases = rng.uniform(0.0, 0.2, size=4) if record_routing else np.zeros(4)
        entries.append({
            "step": step, "prefill_requests": prefill, "decode_requests": decode, "active_tokens": active,
            "padded_tokens": active + (3 if prefill == 0 else 0), "cuda_graph": prefill == 0,
            "step_time_ms": step_ms, "routing_gather_ms": float(phases[0]), "routing_store_ms": float(phases[1]),
            "routing_reconstruct_ms": float(phases[2]), "routing_finalize_ms": float(phases[3]),
            "prefill_tokens": prefill_tokens, "decode_tokens": decode, "finished_requests": int(step % 5 == 4),
            "preempted_requests": 0, "time_s": clock, "gpu_forward_ms": None,
        })
    meta = {
        "schema_version": 1, "kind": "step_details", "device": "cpu",
        "model": {"name": "tiny-moe", "num_layers": NUM_LAYERS, "hidden_size": 64, "num_experts": NUM_EXPERTS,
                  "topk": TOPK, "moe_layer_indices": MOE_LAYERS},
        "engine": {"block_size": 16, "num_kv_blocks": 64, "max_requests": 8, "max_step_tokens": 256,
                   "enable_prefix_caching": True, "cuda_graphs": True, "record_routing": record_routing,
                   "dtype": "float32"},
        "versions": {"python": "3.11", "torch": "2.13", "numpy": "2.4", "orjson": "3.8", "package": "0.1.0"},
        "created": "2025-01-01T12:00:00+00:00",
    }
    return {"meta": meta, "summary": {"num_steps": num_steps}, "step_details": entries}


def random_routing(rng: np.random.Generator, rows: int) -> np.ndarray:
    # argsort of random scores gives distinct experts per (token, layer), as a router does.
    scores = rng.random((rows, len(MOE_LAYERS), NUM_EXPERTS))
    return np.argsort(-scores, axis=-1)[..., :TOPK].astype(np.uint8)


def write_run(out: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    results, routings = [], {}
    for index in range(4):
        prompt = rng.integers(0, 500, size=int(rng.integers(3, 12))).tolist()
        output = rng.integers(0, 500, size=int(rng.integers(1, 6))).tolist()
        result = {"id": f"req-{index}", "prompt_token_ids": prompt, "output_token_ids": output,
                  "finish_reason": "length" if index % 2 else "stop", "num_cached_tokens": 0, "num_preemptions": 0}
        routing = random_routing(rng, len(prompt) + len(output) - 1)
        routings[result["id"]] = routing
        results.append({**result, "routing_shape": list(routing.shape), "routing_dtype": "uint8"})
    results.append({"id": "req-bad", "prompt_token_ids": [5, 6], "output_token_ids": [], "finish_reason": "error",
                    "error": "prompt too long"})
    (out / "results.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in results))
    np.savez(out / "routing.npz", **routings)
    meta = {"schema_version": 1, "moe_layer_indices": MOE_LAYERS, "num_layers": NUM_LAYERS,
            "num_experts": NUM_EXPERTS, "topk": TOPK, "block_size": 16, "dtype": "uint8"}
    (out / "routing_meta.json").write_bytes(orjson.dumps(meta))
    (out / "step_details.json").write_bytes(orjson.dumps(make_step_details(rng)))


def read_json(path: Path) -> dict:
    return orjson.loads(path.read_bytes())


def read_results(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def write_results(path: Path, results: list[dict]) -> None:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in results))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    write_run(tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def doc() -> dict:
    return make_step_details(np.random.default_rng(1))


# ----------------------------------------------------------------------------- step_details
def test_valid_run_dir_has_no_problems(run_dir: Path) -> None:
    assert validate_run_dir(run_dir) == []


def test_step_details_tolerates_missing_optional_and_extra_fields(doc: dict) -> None:
    optional = ("prefill_tokens", "decode_tokens", "finished_requests", "preempted_requests", "time_s",
                "gpu_forward_ms")
    for entry in doc["step_details"]:
        for key in optional:
            entry.pop(key)
        entry["future_field"] = [1, 2]
    del doc["summary"]
    for key in ("model", "engine", "device", "versions", "created"):
        doc["meta"].pop(key)
    doc["meta"]["unknown"] = {"x": 1}
    doc["extra_top_level"] = True
    assert validate_step_details(doc) == []


def _entry(index: int, **changes: object) -> Callable[[dict], None]:
    def mutate(document: dict) -> None:
        document["step_details"][index].update(changes)
    return mutate


def _drop_entry_key(key: str) -> Callable[[dict], None]:
    return lambda document: document["step_details"][3].pop(key)


CORRUPTIONS = {
    "missing step_time_ms": (_drop_entry_key("step_time_ms"), "missing key 'step_time_ms'"),
    "missing cuda_graph": (_drop_entry_key("cuda_graph"), "missing key 'cuda_graph'"),
    "cuda_graph not bool": (_entry(2, cuda_graph="yes"), "cuda_graph must be a bool"),
    "float token count": (_entry(2, active_tokens=3.5, padded_tokens=4), "active_tokens must be an int"),
    "bool as count": (_entry(1, decode_requests=True), "decode_requests must be an int"),
    "negative time": (_entry(5, routing_store_ms=-0.1), "routing_store_ms must be a finite number >= 0"),
    "negative step time": (_entry(0, step_time_ms=-1.0), "step_time_ms must be a finite number >= 0"),
    "string time": (_entry(0, step_time_ms="3"), "step_time_ms must be a finite number"),
    "padded < active": (_entry(6, active_tokens=9, padded_tokens=8, prefill_tokens=0, decode_tokens=9),
                        "padded_tokens 8 < active_tokens 9"),
    "step repeats": (_entry(4, step=3), "does not increase"),
    "time goes back": (_entry(7, time_s=0.0), "time_s 0.0 decreases"),
    "token split": (_entry(8, prefill_tokens=1), "prefill_tokens + decode_tokens"),
    "wrong kind": (lambda d: d["meta"].update(kind="results"), "meta.kind must be 'step_details'"),
    "future version": (lambda d: d["meta"].update(schema_version=4), "schema_version 4 is not supported"),
    "sub-phases": (_entry(9, routing_reconstruct_ms=1.0, routing_reconstruct_plan_ms=0.25,
                          routing_reconstruct_gather_ms=0.25, routing_reconstruct_copy_ms=0.25),
                   "sub-phases of routing_reconstruct add up to 0.75"),
    "no entries": (lambda d: d.pop("step_details"), "missing key 'step_details'"),
    "entries not list": (lambda d: d.update(step_details={}), "step_details must be a list"),
    "bad created": (lambda d: d["meta"].update(created="yesterday"), "meta.created"),
    "summary count": (lambda d: d.update(summary={"num_steps": 3}), "summary.num_steps 3 != 12"),
    "negative gpu time": (_entry(2, gpu_forward_ms=-1.0), "gpu_forward_ms must be a finite number >= 0"),
    "summary phase share": (
        lambda d: d.update(summary={"by_kind": {"decode": {"routing": {"gather": {"share": -0.5}}}}}),
        "summary.by_kind.decode.routing.gather.share must be a finite number >= 0"),
    "summary kind mean": (lambda d: d.update(summary={"by_kind": {"mixed": {"step_time_ms": {"mean": "x"}}}}),
                          "summary.by_kind.mixed.step_time_ms.mean must be a finite number"),
    "summary routing": (lambda d: d.update(summary={"routing": {"store": []}}),
                        "summary.routing.store must be an object"),
    "routing off but timed": (lambda d: d["meta"]["engine"].update(record_routing=False),
                              "record_routing is false"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_step_details_corruption_is_named(doc: dict, name: str) -> None:
    assert validate_step_details(copy.deepcopy(doc)) == []
    mutate, expected = CORRUPTIONS[name]
    mutate(doc)
    problems = validate_step_details(doc)
    assert any(expected in p for p in problems), problems


def test_writer_summary_is_valid(doc: dict) -> None:
    log = StepDetailsLog()
    for entry in doc["step_details"]:
        log.record(entry)
    doc["summary"] = log.summary()
    assert validate_step_details(doc) == []
    # No steps: means, shares and rates are null, which the validator accepts.
    empty = {"meta": doc["meta"], "summary": StepDetailsLog().summary(), "step_details": []}
    assert empty["summary"]["tokens_per_s"] is None
    assert validate_step_details(empty) == []


def test_corrupted_step_details_fails_the_run_dir(run_dir: Path) -> None:
    document = read_json(run_dir / "step_details.json")
    document["step_details"][1]["padded_tokens"] = -1
    (run_dir / "step_details.json").write_bytes(orjson.dumps(document))
    problems = validate_run_dir(run_dir)
    assert any(p.startswith("step_details.json:") and "padded_tokens" in p for p in problems), problems


def test_load_step_details_returns_valid_document(tmp_path: Path, doc: dict) -> None:
    path = tmp_path / "step_details.json"
    path.write_bytes(orjson.dumps(doc))
    assert load_step_details(path)["step_details"] == doc["step_details"]


def test_load_step_details_names_a_foreign_file(run_dir: Path) -> None:
    path = run_dir / "routing_meta.json"
    with pytest.raises(SchemaError, match="missing key 'step_details'") as info:
        load_step_details(path)
    assert str(info.value).startswith(f"{path} is not a step_details file")


@pytest.mark.parametrize("content,expected", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "top level is a list"),
    (b'{"meta": {"kind": "routing_meta"}, "step_details": []}', "meta.kind is 'routing_meta'"),
    (b'{"meta": {"schema_version": 1, "kind": "step_details"}, "step_details": [{"step": 0}]}',
     "is not a valid step_details file"),
])
def test_load_step_details_rejects_invalid_content(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(SchemaError, match=expected) as info:
        load_step_details(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


# ----------------------------------------------------------------------------- results.jsonl
def test_results_lines_of_a_run_are_valid(run_dir: Path) -> None:
    for result in read_results(run_dir / "results.jsonl"):
        assert validate_results_line(result) == []


@pytest.mark.parametrize("change,expected", [
    ({"output_token_ids": [1, 2, 3, 4, 5, 6, 7]}, "routing rows"),
    ({"finish_reason": "done"}, "finish_reason must be one of"),
    ({"prompt_token_ids": []}, "prompt_token_ids must not be empty"),
    ({"prompt_token_ids": [1, -2]}, "prompt_token_ids must be a list of ints >= 0"),
    ({"routing_shape": [4, 3]}, "routing_shape must be [rows, num_moe_layers, topk]"),
    ({"routing_dtype": "float32"}, "routing_dtype must be one of"),
    ({"id": 7}, "result.id must be a string"),
    ({"num_preemptions": -1}, "num_preemptions must be an int >= 0"),
    ({"routing_start": 2}, "len(prompt) + len(output) - 1 - routing_start 2 = 2"),
    ({"routing_start": 4, "routing_shape": [0, 3, 2]}, "routing_start 4 > len(prompt) 3"),
    ({"routing_start": -1}, "routing_start must be an int >= 0"),
    ({"prompt_id": "p"}, "prompt_id and sample_index must be present together"),
    ({"sample_index": 0}, "prompt_id and sample_index must be present together"),
    ({"prompt_id": 3, "sample_index": 0}, "prompt_id must be a string"),
    ({"prompt_id": "p", "sample_index": -1}, "sample_index must be an int >= 0"),
    ({"prompt_id": "b", "sample_index": 0}, "must be prompt_id + '_' + sample_index"),
    ({"stop_string": 3}, "stop_string must be a string"),
    ({"stop_string": ""}, "stop_string must not be empty"),
    ({"stop_string": "</a>", "finish_reason": "length"}, "stop_string without finish_reason \"stop\""),
])
def test_results_line_problems(change: dict, expected: str) -> None:
    line = {"id": "a", "prompt_token_ids": [1, 2, 3], "output_token_ids": [4, 5], "finish_reason": "stop",
            "routing_shape": [4, 3, 2], "routing_dtype": "uint8"}
    assert validate_results_line(line) == []
    problems = validate_results_line({**line, **change})
    assert any(expected in p for p in problems), problems


def test_results_line_with_a_stop_string() -> None:
    line = {"id": "a", "prompt_token_ids": [1], "output_token_ids": [2], "finish_reason": "stop"}
    assert validate_results_line({**line, "stop_string": "</answer>"}) == []
    assert validate_results_line({**line, "finish_reason": "length", "stop_string": None}) == []


def test_results_line_of_a_sample() -> None:
    line = {"id": "p_1", "prompt_token_ids": [1], "output_token_ids": [2], "finish_reason": "stop",
            "prompt_id": "p", "sample_index": 1}
    assert validate_results_line(line) == []


def test_results_line_needs_shape_and_dtype_together() -> None:
    line = {"id": "a", "prompt_token_ids": [1], "output_token_ids": [2], "finish_reason": "stop",
            "routing_shape": [1, 3, 2]}
    assert any("present together" in p for p in validate_results_line(line))


def test_results_line_with_routing_start() -> None:
    # Suffix routing: rows start at token routing_start, so 3 + 2 - 1 - 2 = 2 rows.
    line = {"id": "a", "prompt_token_ids": [1, 2, 3], "output_token_ids": [4, 5], "finish_reason": "stop",
            "routing_shape": [2, 3, 2], "routing_dtype": "uint8", "routing_start": 2}
    assert validate_results_line(line) == []
    unrouted = {k: v for k, v in line.items() if k not in ("routing_shape", "routing_dtype")}
    assert any("routing_start without routing_shape" in p for p in validate_results_line(unrouted))


def test_error_result_echoes_any_prompt() -> None:
    # The engine rejects empty prompts and bad token ids, and the failed result echoes them.
    for prompt in ([], [-1, 7], ["x"]):
        line = {"id": "a", "prompt_token_ids": prompt, "output_token_ids": [], "finish_reason": "error",
                "error": "bad prompt"}
        assert validate_results_line(line) == []
    line["prompt_token_ids"] = "not a list"
    assert any("prompt_token_ids must be a list" in p for p in validate_results_line(line))


def test_error_result_may_lack_routing_and_rows() -> None:
    line = {"id": "a", "prompt_token_ids": [1, 2], "output_token_ids": [], "finish_reason": "error",
            "error": "preempted too often", "routing_shape": [0, 3, 2], "routing_dtype": "uint8"}
    assert validate_results_line(line) == []
    assert validate_results_line({k: v for k, v in line.items() if not k.startswith("routing")}) == []


# ----------------------------------------------------------------------------- routing meta + npz
@pytest.mark.parametrize("change,expected", [
    ({"moe_layer_indices": [2, 1, 3]}, "sorted and unique"),
    ({"moe_layer_indices": [1, 1]}, "sorted and unique"),
    ({"moe_layer_indices": [1, 4]}, "moe_layer_indices 4 >= num_layers 4"),
    ({"moe_layer_indices": []}, "non-empty list"),
    ({"topk": 9}, "topk 9 > num_experts 8"),
    ({"num_experts": 300}, "uint8 cannot hold expert id 299"),
    ({"dtype": "int64"}, "dtype must be one of"),
    ({"schema_version": 3}, "schema_version 3 is not supported"),
    ({"block_size": 0}, "block_size must be an int > 0"),
])
def test_routing_meta_problems(run_dir: Path, change: dict, expected: str) -> None:
    meta = read_json(run_dir / "routing_meta.json")
    assert validate_routing_meta(meta) == []
    problems = validate_routing_meta({**meta, **change})
    assert any(expected in p for p in problems), problems


def _rewrite_npz(run_dir: Path, mutate: Callable[[dict], None]) -> None:
    with np.load(run_dir / "routing.npz", allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    mutate(arrays)
    np.savez(run_dir / "routing.npz", **arrays)


def _set_expert(arrays: dict, value: int) -> None:
    arrays["req-0"][0, 0, 0] = value


NPZ_CORRUPTIONS = {
    "rows short": (lambda a: a.update({"req-1": a["req-1"][:-1]}), "shape [", "!= routing_shape"),
    "missing key": (lambda a: a.pop("req-2"), "no array for result 'req-2'", None),
    "extra key": (lambda a: a.update(ghost=a["req-0"]), "'ghost'] has no result", None),
    "layer count": (lambda a: a.update({"req-0": a["req-0"][:, :2]}), "is not [rows, 3, 2]", None),
    "dtype": (lambda a: a.update({"req-0": a["req-0"].astype(np.int32)}), "dtype int32 != routing_meta.dtype", None),
    "expert id": (lambda a: _set_expert(a, NUM_EXPERTS), "expert ids outside [0, 8)", None),
    "same expert twice": (lambda a: a["req-3"].__setitem__((1, 2), [5, 5]), "same expert twice", None),
}


@pytest.mark.parametrize("name", sorted(NPZ_CORRUPTIONS))
def test_routing_npz_problems(run_dir: Path, name: str) -> None:
    mutate, expected, also = NPZ_CORRUPTIONS[name]
    meta = read_json(run_dir / "routing_meta.json")
    results = read_results(run_dir / "results.jsonl")
    assert validate_routing_npz(run_dir / "routing.npz", meta, results) == []
    _rewrite_npz(run_dir, mutate)
    problems = validate_routing_npz(run_dir / "routing.npz", meta, results)
    assert any(expected in p and (also is None or also in p) for p in problems), problems
    assert validate_run_dir(run_dir) != []


def test_routing_npz_refuses_pickled_arrays(run_dir: Path) -> None:
    np.savez(run_dir / "routing.npz", **{"req-0": np.array([{"a": 1}], dtype=object)})
    problems = validate_routing_npz(run_dir / "routing.npz", read_json(run_dir / "routing_meta.json"))
    assert any("cannot load without pickle" in p for p in problems), problems


def test_routing_npz_that_is_not_an_archive(run_dir: Path) -> None:
    (run_dir / "routing.npz").write_bytes(b"garbage")
    problems = validate_routing_npz(run_dir / "routing.npz", read_json(run_dir / "routing_meta.json"))
    assert len(problems) == 1 and "cannot read" in problems[0]


# ----------------------------------------------------------------------------- run dir consistency
def test_run_dir_rows_mismatch(run_dir: Path) -> None:
    results = read_results(run_dir / "results.jsonl")
    results[0]["output_token_ids"].append(7)  # one more token, but routing_shape and npz unchanged
    write_results(run_dir / "results.jsonl", results)
    problems = validate_run_dir(run_dir)
    assert any(p.startswith("results.jsonl:1:") and "routing rows" in p for p in problems), problems


def test_run_dir_result_without_routing(run_dir: Path) -> None:
    results = read_results(run_dir / "results.jsonl")
    for key in ("routing_shape", "routing_dtype"):
        results[2].pop(key)
    write_results(run_dir / "results.jsonl", results)
    problems = validate_run_dir(run_dir)
    assert any("'req-2' has no routing although routing was recorded" in p for p in problems), problems


def test_run_dir_duplicate_ids(run_dir: Path) -> None:
    results = read_results(run_dir / "results.jsonl")
    write_results(run_dir / "results.jsonl", results + [results[0]])
    assert any("duplicate id 'req-0'" in p for p in validate_run_dir(run_dir))


def test_run_dir_missing_routing_files(run_dir: Path) -> None:
    (run_dir / "routing.npz").unlink()
    problems = validate_run_dir(run_dir)
    assert "routing_meta.json present without routing.npz" in problems
    assert any("declares routing_shape but routing.npz is missing" in p for p in problems)
    assert any("record_routing is true" in p for p in problems)


def test_run_dir_model_disagrees_with_routing_meta(run_dir: Path) -> None:
    document = read_json(run_dir / "step_details.json")
    document["meta"]["model"]["moe_layer_indices"] = [0, 2, 3]
    (run_dir / "step_details.json").write_bytes(orjson.dumps(document))
    assert any("moe_layer_indices" in p for p in validate_run_dir(run_dir))


def test_run_dir_with_some_files_only(run_dir: Path) -> None:
    for name in ("routing.npz", "routing_meta.json", "results.jsonl"):
        (run_dir / name).unlink()
    assert validate_run_dir(run_dir) == []
    (run_dir / "step_details.json").unlink()
    assert "none of" in validate_run_dir(run_dir)[0]


# ----------------------------------------------------------------------------- a real run
@pytest.mark.parametrize("record", [True, False], ids=["recording", "not-recording"])
def test_real_cpu_run_is_valid(tmp_path: Path, record: bool) -> None:
    out = tmp_path / "out"
    command = [sys.executable, str(RUN_INFERENCE), "--num-requests", "4", "--prompt-len", "8",
               "--output-len", "4", "--output-dir", str(out)] + (["--record-routing"] if record else [])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert validate_run_dir(out) == []
    assert (out / "routing.npz").exists() == record
    document = load_step_details(out / "step_details.json")
    assert document["meta"]["schema_version"] == 3 and len(document["step_details"]) > 0
    keys = phase_keys(ENGINE_STAGES) + phase_keys(ROUTING_SUBPHASES)
    for entry in document["step_details"]:
        assert all(key in entry for key in keys), sorted(set(keys) - set(entry))
        assert entry["stage_launch_ms"] > 0 or entry["active_tokens"] == 0


@pytest.mark.parametrize("change, expected", [
    ({"output_logprobs": [-0.5]}, "output_logprobs has 1 values for 2 output tokens"),
    ({"output_logprobs": [-0.5, 0.25]}, "finite numbers <= 0"),
    ({"output_top_logprobs": [[[3, -0.1]], [[4, "x"]]]}, "[token, logprob] pairs"),
    ({"prompt_logprobs": [-1.0, -2.0]}, "[null, logprob, ...]"),
    ({"prompt_logprobs": [None]}, "prompt_logprobs has 1 entries for 2 prompt tokens"),
    ({"weight_version": True}, "weight_version must be an int or a string"),
])
def test_results_line_logprob_problems(change: dict, expected: str) -> None:
    line = {"id": "a", "prompt_token_ids": [1, 2], "output_token_ids": [3, 4], "finish_reason": "length",
            "output_logprobs": [-0.5, -1.5], "output_top_logprobs": [[[3, -0.5]], [[4, -1.5]]],
            "prompt_logprobs": [None, -2.0], "weight_version": "step-3"}
    assert validate_results_line(line) == []
    problems = validate_results_line({**line, **change})
    assert any(expected in p for p in problems), problems
