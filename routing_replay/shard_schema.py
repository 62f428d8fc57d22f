"""Validation of a run directory that is still in progress or was interrupted: ``run.json``
and the committed checkpoint shards (layout in ``routing_replay.run_layout``).

Like ``routing_replay.run_dir_schema``, every check returns a list of problems ([] = valid).
Leftovers of a crash (``*.tmp`` files, a routing shard whose results file was never renamed
into place) are not problems: readers ignore them and ``--resume`` removes them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from routing_replay.outputs import META_FILE as ROUTING_META_FILE
from routing_replay.run_dir_schema import (
    STEP_DETAILS_FILE,
    model_vs_routing_meta,
    read_json_file,
    read_results_file,
    validate_routing_npz,
)
from routing_replay.run_layout import (CHECKPOINT_DIR, LAYOUT_VERSION, MANIFEST_FILE, MANIFEST_KIND, RUN_STATUSES,
                                       Shard, committed_shards)
from routing_replay.schema import validate_routing_meta, validate_step_details


def _is_count(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def validate_manifest(manifest: Any) -> list[str]:
    """Problems of a parsed run.json."""
    if not isinstance(manifest, dict):
        return ["must be a JSON object"]
    problems = []
    if manifest.get("schema_version") != LAYOUT_VERSION:
        problems.append(f"schema_version {manifest.get('schema_version')!r} is not supported (expected {LAYOUT_VERSION})")
    if manifest.get("kind") != MANIFEST_KIND:
        problems.append(f"kind must be {MANIFEST_KIND!r}")
    if manifest.get("status") not in RUN_STATUSES:
        problems.append(f"status must be one of {RUN_STATUSES}, got {manifest.get('status')!r}")
    for key, minimum in (("attempt", 1), ("num_requests", 0), ("world_size", 1)):
        if not _is_count(manifest.get(key), minimum):
            problems.append(f"{key} must be an int >= {minimum}, got {manifest.get(key)!r}")
    if not isinstance(manifest.get("record_routing"), bool):
        problems.append("record_routing must be a bool")
    if not isinstance(manifest.get("fingerprint"), dict):
        problems.append("fingerprint must be an object")
    return problems


def _shard_problems(shard: Shard, routing_meta: dict | None, record_routing: bool) -> tuple[list[dict], list[str]]:
    label = f"{CHECKPOINT_DIR}/{shard.results.name}"
    problems: list[str] = []
    results = read_results_file(shard.results, problems, label)
    declares = [r for r in results if "routing_shape" in r]
    if shard.routing is not None and routing_meta is not None:
        problems += validate_routing_npz(shard.routing, routing_meta, results, f"{CHECKPOINT_DIR}/{shard.routing.name}")
    elif declares:
        problems.append(f"{label} declares routing_shape but its routing shard is missing")
    elif record_routing:
        problems += [f"{label}: result {r.get('id')!r} has no routing although routing was recorded"
                     for r in results if r.get("finish_reason") != "error"]
    return results, problems


def _cross_shard_problems(per_shard: list[tuple[Shard, list[dict]]]) -> list[str]:
    """A finished (non-error) request is never served again, so it is the last record of its id."""
    problems = []
    finished_in: dict[str, str] = {}
    for shard, results in per_shard:
        for record in results:
            request_id = record.get("id")
            if request_id in finished_in:
                problems.append(f"request {request_id!r} finished in shard {finished_in[request_id]} and appears "
                                f"again in shard {shard.name} (files of two runs mixed?)")
            if record.get("finish_reason") != "error":
                finished_in[request_id] = shard.name
    return problems


def validate_checkpointed_run(out_dir: str | Path, manifest: Any) -> list[str]:
    """Problems of a run directory whose run.json status is not "complete"."""
    out = Path(out_dir)
    problems = [f"{MANIFEST_FILE}: {p}" for p in validate_manifest(manifest)]
    if problems:
        return problems
    record_routing = manifest["record_routing"]
    step_obj = read_json_file(out / STEP_DETAILS_FILE, problems) if (out / STEP_DETAILS_FILE).is_file() else None
    if step_obj is not None:
        problems += [f"{STEP_DETAILS_FILE}: {p}" for p in validate_step_details(step_obj)]
    routing_meta = read_json_file(out / ROUTING_META_FILE, problems) if (out / ROUTING_META_FILE).is_file() else None
    if routing_meta is not None:
        meta_problems = validate_routing_meta(routing_meta)
        problems += [f"{ROUTING_META_FILE}: {p}" for p in meta_problems]
        if meta_problems:
            routing_meta = None
        else:
            problems += model_vs_routing_meta(step_obj, routing_meta)
    elif record_routing:
        problems.append(f"{MANIFEST_FILE} says routing is recorded but {ROUTING_META_FILE} is missing")
    shards = committed_shards(out)
    per_shard = []
    for shard in shards:
        if shard.attempt > manifest["attempt"]:
            problems.append(f"shard {shard.name} is from attempt {shard.attempt}, after the manifest's {manifest['attempt']}")
        results, shard_problems = _shard_problems(shard, routing_meta, record_routing)
        problems += shard_problems
        per_shard.append((shard, results))
    problems += _cross_shard_problems(per_shard)
    distinct = {r.get("id") for _, results in per_shard for r in results}
    if len(distinct) > manifest["num_requests"]:
        problems.append(f"checkpoints hold {len(distinct)} requests, {MANIFEST_FILE} num_requests is {manifest['num_requests']}")
    return problems
