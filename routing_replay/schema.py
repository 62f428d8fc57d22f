"""Hand-written validators for the files a recorded run writes (see docs/SCHEMAS.md):
step_details.json, results.jsonl lines and routing_meta.json, each on its own.

Every ``validate_*`` function returns a list of human-readable problems; an empty list means
valid. Readers must tolerate missing optional fields and unknown extra fields, so the
validators check only what the contract promises. This module never imports ``inference``.
routing.npz and whole-run-folder checks live in ``routing_replay.run_dir_schema``; its
public names are re-exported here.
"""
from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import orjson

from routing_replay.outputs import SUPPORTED_SCHEMA_VERSIONS as ROUTING_META_VERSIONS
from routing_replay.phase_timer import phase_keys
from routing_replay.step_details import (ENGINE_STAGES, ROUTING_PHASES, ROUTING_SUBPHASES,
                                         SCHEMA_VERSION, STEP_KINDS, SUPPORTED_SCHEMA_VERSIONS)

ROUTING_DTYPES = ("uint8", "int16", "int32")
FINISH_REASONS = ("stop", "length", "error")
_MAX_PROBLEMS_IN_ERROR = 5

Rule = Callable[[Any], Optional[str]]


class SchemaError(ValueError):
    """A file is not the run file it was read as; the message names the file and its first problems."""


# ----------------------------------------------------------------------------- value rules
def _is_int(value: Any) -> bool:
    # bool is a subclass of int; a JSON true must not pass as a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rule(predicate: Callable[[Any], bool], message: str) -> Rule:
    """A rule returns None for a valid value, else the message."""
    return lambda value: None if predicate(value) else message


_count = _rule(lambda v: _is_int(v) and v >= 0, "must be an int >= 0")
_positive = _rule(lambda v: _is_int(v) and v > 0, "must be an int > 0")
_time = _rule(lambda v: _is_number(v) and v >= 0, "must be a finite number >= 0")
_boolean = _rule(lambda v: isinstance(v, bool), "must be a bool")
_string = _rule(lambda v: isinstance(v, str), "must be a string")
_object = _rule(lambda v: isinstance(v, dict), "must be an object")
_list = _rule(lambda v: isinstance(v, list), "must be a list")
_token_ids = _rule(
    lambda v: isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v), "must be a list of ints >= 0"
)
_shape = _rule(
    lambda v: isinstance(v, list) and len(v) == 3 and all(_is_int(i) and i >= 0 for i in v),
    "must be [rows, num_moe_layers, topk] of ints >= 0",
)


# A spec is a tuple of (keys, rule, required); optional keys may be absent or null.
Spec = tuple[tuple[tuple[str, ...], Rule, bool], ...]
_ENTRY_SPEC: Spec = (
    (("step", "prefill_requests", "decode_requests", "active_tokens", "padded_tokens"), _count, True),
    (("step_time_ms",) + tuple(f"routing_{p}_ms" for p in ROUTING_PHASES), _time, True),
    (("cuda_graph",), _boolean, True),
    (("piecewise_graph",), _boolean, False),
    (("prefill_tokens", "decode_tokens", "finished_requests", "preempted_requests"), _count, False),
    (("time_s", "gpu_forward_ms", "gpu_step_ms", "gpu_idle_before_ms"), _time, False),
    # schema version 2: routing sub-phases and engine stages
    (phase_keys(ROUTING_SUBPHASES, totals=False), _time, False),
    (phase_keys(ENGINE_STAGES), _time, False),
)
_STEP_META_SPEC: Spec = (
    (("schema_version",), _positive, True),
    (("kind",), _string, True),
    (("model", "engine", "versions", "workload"), _object, False),
    (("device", "created"), _string, False),
    (("record_routing",), _boolean, False),
    (("rank",), _count, False),
    (("world_size",), _positive, False),
)
_MODEL_SPEC: Spec = (
    (("num_layers", "hidden_size", "num_experts", "topk"), _positive, False),
    (("name",), _string, False),
)
_ENGINE_SPEC: Spec = (
    (("block_size", "num_kv_blocks", "max_requests", "max_step_tokens", "cuda_graph_max_batch"), _positive, False),
    (("enable_prefix_caching", "chunked_prefill", "record_routing", "cuda_graphs", "padded_decode",
      "async_scheduling", "padded_prefill"), _boolean, False),
    (("dtype", "device", "routing_recorder"), _string, False),
)
_SUMMARY_SPEC: Spec = (
    (("num_steps", "total_tokens", "prefill_tokens", "decode_tokens"), _count, False),
    (("total_step_time_ms", "wall_time_s", "tokens_per_s", "decode_tokens_per_s", "routing_share"), _time, False),
    (("routing", "by_kind"), _object, False),
)
# One group of steps: all of them (top level of summary) or one step kind (summary.by_kind.<kind>).
_GROUP_SPEC: Spec = (
    (("steps",), _count, False),
    (("routing_total_ms", "routing_share"), _time, False),
    (("step_time_ms", "routing"), _object, False),
)
_TOTAL_MEAN_SPEC: Spec = ((("total", "mean"), _time, False),)
_PHASE_SPEC: Spec = ((("total_ms", "mean_ms", "share"), _time, False),)
_RESULT_SPEC: Spec = (
    (("id", "finish_reason"), _string, True),
    (("output_token_ids",), _token_ids, True),
    (("error", "routing_dtype", "prompt_id", "output_text", "stop_string"), _string, False),
    (("routing_shape",), _shape, False),
    (("num_cached_tokens", "num_preemptions", "routing_start", "sample_index"), _count, False),
)
_ROUTING_META_SPEC: Spec = (
    (("schema_version", "num_layers", "num_experts", "topk", "block_size"), _positive, True),
    (("dtype",), _string, True),
)


def _check(obj: dict, key: str, rule: Rule, where: str, problems: list[str], required: bool = True) -> bool:
    """Append a problem if ``obj[key]`` breaks ``rule``; True when the value is present and valid."""
    if key not in obj or (not required and obj[key] is None):
        if required:
            problems.append(f"{where}: missing key {key!r}")
        return False
    error = rule(obj[key])
    if error:
        problems.append(f"{where}.{key} {error}, got {obj[key]!r:.60}")
    return error is None


def _check_spec(obj: dict, spec: Spec, where: str, problems: list[str]) -> set[str]:
    """Check every key of ``spec``; return the keys that are present and valid."""
    return {
        key
        for keys, rule, required in spec
        for key in keys
        if _check(obj, key, rule, where, problems, required)
    }


# ----------------------------------------------------------------------------- step_details
def validate_step_entry(entry: Any, where: str = "entry") -> list[str]:
    """Problems of one step_details entry, checked on its own."""
    if not isinstance(entry, dict):
        return [f"{where} must be an object"]
    problems: list[str] = []
    valid = _check_spec(entry, _ENTRY_SPEC, where, problems)
    active = entry.get("active_tokens")
    if {"active_tokens", "padded_tokens"} <= valid and entry["padded_tokens"] < active:
        problems.append(f"{where}: padded_tokens {entry['padded_tokens']} < active_tokens {active}")
    if {"active_tokens", "prefill_tokens", "decode_tokens"} <= valid:
        split = entry["prefill_tokens"] + entry["decode_tokens"]
        if split != active:
            problems.append(f"{where}: prefill_tokens + decode_tokens = {split} != active_tokens {active}")
    for phase, subs in (*ROUTING_SUBPHASES.items(), *ENGINE_STAGES.items()):
        keys = [f"{phase}_{sub}_ms" for sub in subs]
        if subs and f"{phase}_ms" in valid and all(k in valid for k in keys):
            total = sum(entry[k] for k in keys)
            if abs(total - entry[f"{phase}_ms"]) > 1e-6 * max(1.0, total):
                problems.append(f"{where}: sub-phases of {phase} add up to {total}, not {phase}_ms {entry[f'{phase}_ms']}")
    return problems


def _validate_entries(entries: list, record_routing: Optional[bool]) -> list[str]:
    problems: list[str] = []
    last_step: Optional[int] = None
    last_time: Optional[float] = None
    for index, entry in enumerate(entries):
        where = f"step_details[{index}]"
        entry_problems = validate_step_entry(entry, where)
        problems += entry_problems
        if entry_problems:
            continue
        if last_step is not None and entry["step"] <= last_step:
            problems.append(f"{where}: step {entry['step']} does not increase (previous {last_step})")
        last_step = entry["step"]
        if entry.get("time_s") is not None:
            if last_time is not None and entry["time_s"] < last_time:
                problems.append(f"{where}: time_s {entry['time_s']} decreases (previous {last_time})")
            last_time = entry["time_s"]
        if record_routing is False and any(entry[f"routing_{p}_ms"] for p in ROUTING_PHASES):
            problems.append(f"{where}: routing times must be 0 when record_routing is false")
    return problems


def _validate_step_meta(meta: Any) -> list[str]:
    if not isinstance(meta, dict):
        return ["meta must be an object"]
    problems: list[str] = []
    valid = _check_spec(meta, _STEP_META_SPEC, "meta", problems)
    if "schema_version" in valid and meta["schema_version"] not in SUPPORTED_SCHEMA_VERSIONS:
        problems.append(f"meta.schema_version {meta['schema_version']} is not supported "
                        f"(expected one of {SUPPORTED_SCHEMA_VERSIONS}; this writer writes {SCHEMA_VERSION})")
    if "kind" in valid and meta["kind"] != "step_details":
        problems.append(f"meta.kind must be 'step_details', got {meta['kind']!r}")
    if "created" in valid:
        try:
            datetime.fromisoformat(meta["created"])
        except ValueError:
            problems.append(f"meta.created is not an ISO time string: {meta['created']!r:.60}")
    if "model" in valid:
        model = meta["model"]
        _check_spec(model, _MODEL_SPEC, "meta.model", problems)
        if "moe_layer_indices" in model:
            problems += _layer_index_problems(model["moe_layer_indices"], model.get("num_layers"), "meta.model")
    if "engine" in valid:
        _check_spec(meta["engine"], _ENGINE_SPEC, "meta.engine", problems)
    return problems


def _routing_phase_problems(routing: dict, where: str) -> list[str]:
    # Phases and kinds the reader does not know are extra fields, so they are not problems.
    problems: list[str] = []
    for phase in ROUTING_PHASES:
        if _check(routing, phase, _object, where, problems, required=False):
            _check_spec(routing[phase], _PHASE_SPEC, f"{where}.{phase}", problems)
    return problems


def _validate_summary(summary: Any, entries: Any) -> list[str]:
    if not isinstance(summary, dict):
        return ["summary must be an object"]
    problems: list[str] = []
    valid = _check_spec(summary, _SUMMARY_SPEC, "summary", problems)
    dropped = summary.get("dropped_entries", 0)
    if not _is_int(dropped) or dropped < 0:
        problems.append(f"summary.dropped_entries must be an int >= 0, got {dropped!r:.60}")
    elif "num_steps" in valid and isinstance(entries, list) and summary["num_steps"] != len(entries) + dropped:
        kept = f"{len(entries)} entries" + (f" + {dropped} dropped" if dropped else "")
        problems.append(f"summary.num_steps {summary['num_steps']} != {kept}")
    if "routing" in valid:
        problems += _routing_phase_problems(summary["routing"], "summary.routing")
    for kind in STEP_KINDS if "by_kind" in valid else ():
        where = f"summary.by_kind.{kind}"
        if not _check(summary["by_kind"], kind, _object, "summary.by_kind", problems, required=False):
            continue
        group_valid = _check_spec(summary["by_kind"][kind], _GROUP_SPEC, where, problems)
        if "step_time_ms" in group_valid:
            _check_spec(summary["by_kind"][kind]["step_time_ms"], _TOTAL_MEAN_SPEC, f"{where}.step_time_ms", problems)
        if "routing" in group_valid:
            problems += _routing_phase_problems(summary["by_kind"][kind]["routing"], f"{where}.routing")
    return problems


def stated_record_routing(step_obj: Any) -> Optional[bool]:
    """meta.engine.record_routing (else meta.record_routing) of a parsed step_details.json
    when stated as a bool, else None."""
    meta = step_obj.get("meta") if isinstance(step_obj, dict) else None
    if not isinstance(meta, dict):
        return None
    engine = meta.get("engine") if isinstance(meta.get("engine"), dict) else {}
    flag = engine.get("record_routing", meta.get("record_routing"))
    return flag if isinstance(flag, bool) else None


def validate_step_details(obj: Any) -> list[str]:
    """Problems of a parsed step_details.json document; [] when valid."""
    if not isinstance(obj, dict):
        return ["top level must be a JSON object"]
    problems = [f"missing key {key!r}" for key in ("meta", "step_details") if key not in obj]
    if "meta" in obj:
        problems += _validate_step_meta(obj["meta"])
    entries = obj.get("step_details")
    if isinstance(entries, list):
        problems += _validate_entries(entries, stated_record_routing(obj))
    elif "step_details" in obj:
        problems.append("step_details must be a list")
    if obj.get("summary") is not None:
        problems += _validate_summary(obj["summary"], entries)
    return problems


def load_step_details(path: str | Path) -> dict:
    """Read and validate a step_details.json file; raise SchemaError naming the file when invalid.

    OSError (missing or unreadable file) propagates unchanged.
    """
    path = Path(path)
    not_step_details = f"{path} is not a step_details file"
    try:
        obj = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise SchemaError(f"{not_step_details}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise SchemaError(f"{not_step_details}: top level is a {type(obj).__name__}, not an object")
    if "step_details" not in obj:
        raise SchemaError(f"{not_step_details}: missing key 'step_details'")
    kind = obj["meta"].get("kind") if isinstance(obj.get("meta"), dict) else None
    if kind is not None and kind != "step_details":
        raise SchemaError(f"{not_step_details}: meta.kind is {kind!r}")
    problems = validate_step_details(obj)
    if problems:
        more = len(problems) - _MAX_PROBLEMS_IN_ERROR
        shown = "; ".join(problems[:_MAX_PROBLEMS_IN_ERROR]) + (f" (and {more} more)" if more > 0 else "")
        raise SchemaError(f"{path} is not a valid step_details file: {shown}")
    return obj


# ----------------------------------------------------------------------------- results.jsonl
def _prompt_problems(obj: dict, valid: set[str], problems: list[str]) -> None:
    """Check prompt_token_ids; add it to ``valid`` when it is a usable list of token ids."""
    if obj.get("finish_reason") == "error":
        # A rejected request echoes its prompt as given: that prompt may be why it was rejected.
        _check(obj, "prompt_token_ids", _list, "result", problems)
        return
    if _check(obj, "prompt_token_ids", _token_ids, "result", problems):
        valid.add("prompt_token_ids")
        if not obj["prompt_token_ids"]:
            problems.append("result.prompt_token_ids must not be empty")


def _routing_rows_problems(obj: dict, valid: set[str]) -> list[str]:
    needed = {"routing_shape", "prompt_token_ids", "output_token_ids"}
    if not needed <= valid:
        return []
    start = obj["routing_start"] if "routing_start" in valid else 0
    if start > len(obj["prompt_token_ids"]):
        return [f"result.routing_start {start} > len(prompt) {len(obj['prompt_token_ids'])}"]
    expected = len(obj["prompt_token_ids"]) + len(obj["output_token_ids"]) - 1 - start
    if obj["routing_shape"][0] == expected:
        return []
    minus_start = f" - routing_start {start}" if start else ""
    return [f"result {obj.get('id')!r}: routing rows {obj['routing_shape'][0]} != "
            f"len(prompt) + len(output) - 1{minus_start} = {expected}"]


def validate_results_line(obj: Any) -> list[str]:
    """Problems of one parsed results.jsonl line; [] when valid."""
    if not isinstance(obj, dict):
        return ["result must be an object"]
    problems: list[str] = []
    valid = _check_spec(obj, _RESULT_SPEC, "result", problems)
    _prompt_problems(obj, valid, problems)
    if "id" in valid and not obj["id"]:
        problems.append("result.id must not be empty")
    if "finish_reason" in valid and obj["finish_reason"] not in FINISH_REASONS:
        problems.append(f"result.finish_reason must be one of {FINISH_REASONS}, got {obj['finish_reason']!r}")
    if ("routing_shape" in obj) != ("routing_dtype" in obj):
        problems.append("result: routing_shape and routing_dtype must be present together")
    if obj.get("stop_string") is not None and obj.get("finish_reason") != "stop":
        problems.append(f"result: stop_string without finish_reason \"stop\" (got {obj.get('finish_reason')!r})")
    if "stop_string" in valid and not obj["stop_string"]:
        problems.append("result.stop_string must not be empty")
    if "routing_start" in obj and "routing_shape" not in obj:
        problems.append("result: routing_start without routing_shape")
    if (obj.get("prompt_id") is None) != (obj.get("sample_index") is None):
        problems.append("result: prompt_id and sample_index must be present together (a sample of an RL group)")
    elif {"id", "prompt_id", "sample_index"} <= valid and obj["id"] != f"{obj['prompt_id']}_{obj['sample_index']}":
        problems.append(f"result.id {obj['id']!r:.60} must be prompt_id + '_' + sample_index "
                        f"({obj['prompt_id']!r:.60}, {obj['sample_index']})")
    if "routing_dtype" in valid and obj["routing_dtype"] not in ROUTING_DTYPES:
        problems.append(f"result.routing_dtype must be one of {ROUTING_DTYPES}, got {obj['routing_dtype']!r}")
    if "finish_reason" in valid and obj["finish_reason"] != "error":
        problems += _routing_rows_problems(obj, valid)
    problems += _logprob_problems(obj, valid)
    return problems


def _is_logprob(value: Any) -> bool:
    return _is_number(value) and value <= 0


def _logprob_problems(obj: dict, valid: set[str]) -> list[str]:
    """output_logprobs / output_top_logprobs: one entry per output token; prompt_logprobs:
    one per prompt token, null first; log-probs are finite numbers <= 0."""
    problems: list[str] = []
    outputs = obj.get("output_token_ids") if "output_token_ids" in valid else None
    lps = obj.get("output_logprobs")
    if lps is not None:
        if not isinstance(lps, list) or not all(_is_logprob(v) for v in lps):
            problems.append("result.output_logprobs must be a list of finite numbers <= 0")
        elif outputs is not None and len(lps) != len(outputs):
            problems.append(f"result.output_logprobs has {len(lps)} values for {len(outputs)} output tokens")
    top = obj.get("output_top_logprobs")
    if top is not None:
        pair = lambda p: isinstance(p, list) and len(p) == 2 and _is_int(p[0]) and p[0] >= 0 and _is_logprob(p[1])  # noqa: E731
        if not isinstance(top, list) or not all(isinstance(step, list) and all(pair(p) for p in step) for step in top):
            problems.append("result.output_top_logprobs must be a list (per output token) of [token, logprob] pairs")
        elif outputs is not None and len(top) != len(outputs):
            problems.append(f"result.output_top_logprobs has {len(top)} entries for {len(outputs)} output tokens")
    prompt_lps, prompt = obj.get("prompt_logprobs"), obj.get("prompt_token_ids")
    if prompt_lps is not None:
        if (not isinstance(prompt_lps, list) or not prompt_lps or prompt_lps[0] is not None
                or not all(_is_logprob(v) for v in prompt_lps[1:])):
            problems.append("result.prompt_logprobs must be [null, logprob, ...] (finite numbers <= 0)")
        elif isinstance(prompt, list) and len(prompt_lps) != len(prompt):
            problems.append(f"result.prompt_logprobs has {len(prompt_lps)} entries for {len(prompt)} prompt tokens")
    version = obj.get("weight_version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, (int, str))):
        problems.append(f"result.weight_version must be an int or a string, got {version!r:.60}")
    return problems


# ----------------------------------------------------------------------------- routing_meta.json
def _layer_index_problems(indices: Any, num_layers: Any, where: str) -> list[str]:
    if not (isinstance(indices, list) and indices and all(_is_int(i) and i >= 0 for i in indices)):
        return [f"{where}.moe_layer_indices must be a non-empty list of ints >= 0"]
    problems = []
    if any(b <= a for a, b in zip(indices, indices[1:])):
        problems.append(f"{where}.moe_layer_indices must be sorted and unique, got {indices}")
    if _is_int(num_layers) and indices[-1] >= num_layers:
        problems.append(f"{where}.moe_layer_indices {indices[-1]} >= num_layers {num_layers}")
    return problems


def validate_routing_meta(obj: Any) -> list[str]:
    """Problems of a parsed routing_meta.json; [] when valid."""
    if not isinstance(obj, dict):
        return ["routing_meta must be an object"]
    problems: list[str] = []
    valid = _check_spec(obj, _ROUTING_META_SPEC, "routing_meta", problems)
    if "schema_version" in valid and obj["schema_version"] not in ROUTING_META_VERSIONS:
        problems.append(f"routing_meta.schema_version {obj['schema_version']} is not supported "
                        f"(expected one of {ROUTING_META_VERSIONS})")
    if "moe_layer_indices" not in obj:
        problems.append("routing_meta: missing key 'moe_layer_indices'")
    else:
        problems += _layer_index_problems(obj["moe_layer_indices"], obj.get("num_layers"), "routing_meta")
    if {"topk", "num_experts"} <= valid and obj["topk"] > obj["num_experts"]:
        problems.append(f"routing_meta.topk {obj['topk']} > num_experts {obj['num_experts']}")
    if "dtype" in valid and obj["dtype"] not in ROUTING_DTYPES:
        problems.append(f"routing_meta.dtype must be one of {ROUTING_DTYPES}, got {obj['dtype']!r}")
    elif {"dtype", "num_experts"} <= valid and obj["num_experts"] - 1 > np.iinfo(np.dtype(obj["dtype"])).max:
        problems.append(f"routing_meta.dtype {obj['dtype']} cannot hold expert id {obj['num_experts'] - 1}")
    return problems


# ----------------------------------------------------------------------------- re-exports
_RUN_DIR_NAMES = ("RESULTS_FILE", "RUN_FILES", "STEP_DETAILS_FILE", "validate_routing_npz", "validate_run_dir")


def __getattr__(name: str) -> Any:
    # Resolved on first use, not imported at the top: run_dir_schema imports this module, so
    # an eager import would fail whenever run_dir_schema is imported first.
    if name in _RUN_DIR_NAMES:
        from routing_replay import run_dir_schema

        return getattr(run_dir_schema, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
