"""Validation of a whole run folder: routing.npz against routing_meta.json and the results,
and the agreement of whichever run files exist (see docs/SCHEMAS.md). A run in progress or
interrupted (checkpoint shards, ``run.json``) is checked by ``routing_replay.shard_schema``.

Like ``routing_replay.schema`` (which checks each file on its own and re-exports this
module's public names), every check returns a list of human-readable problems, [] = valid.
This module never imports ``inference``.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import orjson

from routing_replay.outputs import META_FILE as ROUTING_META_FILE
from routing_replay.outputs import RESULTS_FILE, ROUTING_FILE
from routing_replay.run_layout import MANIFEST_FILE, read_manifest, request_id_from_key
from routing_replay.schema import (
    stated_record_routing,
    validate_results_line,
    validate_routing_meta,
    validate_step_details,
)

STEP_DETAILS_FILE = "step_details.json"
RUN_FILES = (STEP_DETAILS_FILE, RESULTS_FILE, ROUTING_FILE, ROUTING_META_FILE)


# ----------------------------------------------------------------------------- routing.npz
def _routing_array_problems(key: str, array: np.ndarray, meta: dict, label: str = ROUTING_FILE) -> list[str]:
    where = f"{label}[{key!r}]"
    layers, topk = len(meta["moe_layer_indices"]), meta["topk"]
    if array.ndim != 3 or array.shape[1:] != (layers, topk):
        return [f"{where}: shape {array.shape} is not [rows, {layers}, {topk}]"]
    if array.dtype.name != meta["dtype"]:
        return [f"{where}: dtype {array.dtype.name} != routing_meta.dtype {meta['dtype']}"]
    if array.size == 0:
        return []
    problems = []
    if int(array.min()) < 0 or int(array.max()) >= meta["num_experts"]:
        problems.append(f"{where}: expert ids outside [0, {meta['num_experts']})")
    ordered = np.sort(array, axis=-1)
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        problems.append(f"{where}: a token chose the same expert twice in one layer")
    return problems


def _results_vs_npz(shapes: dict[str, tuple], results: list, meta: dict, label: str = ROUTING_FILE) -> list[str]:
    problems = []
    routed = {}
    for result in results:
        if not isinstance(result, dict) or not isinstance(result.get("id"), str):
            continue
        if "routing_shape" in result:
            routed[result["id"]] = result
        elif result.get("finish_reason") != "error":
            problems.append(f"result {result['id']!r} has no routing although routing was recorded")
    problems += [f"{label} has no array for result {key!r}" for key in sorted(routed.keys() - shapes.keys())]
    problems += [f"{label}[{key!r}] has no result with routing" for key in sorted(shapes.keys() - routed.keys())]
    for key in sorted(routed.keys() & shapes.keys()):
        declared = routed[key]["routing_shape"]
        if not isinstance(declared, list) or tuple(declared) != shapes[key]:
            problems.append(f"{label}[{key!r}] shape {list(shapes[key])} != routing_shape {declared}")
        if routed[key].get("routing_dtype") != meta["dtype"]:
            problems.append(f"result {key!r} routing_dtype {routed[key].get('routing_dtype')!r} != {meta['dtype']!r}")
    return problems


def _request_id(key: str, meta: dict) -> str:
    """The request id of an npz key (schema version 2 encodes ids; see run_layout)."""
    if meta.get("schema_version", 1) < 2:
        return key
    try:
        return request_id_from_key(key)
    except UnicodeDecodeError:
        return key   # not an encoded id; reported as a key without a result


def validate_routing_npz(path: str | Path, meta: dict, results: Optional[list[dict]] = None,
                         label: str = ROUTING_FILE) -> list[str]:
    """Problems of routing.npz (or a routing shard, named ``label`` in messages) against
    routing meta and, when given, the results' routing_shape."""
    if validate_routing_meta(meta):
        return [f"cannot check {label}: routing meta is invalid"]
    problems: list[str] = []
    shapes: dict[str, tuple] = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                return [f"{path} is not an .npz archive"]
            for key in archive.files:
                request_id = _request_id(key, meta)
                try:
                    array = archive[key]
                except ValueError as exc:  # object arrays need pickle, which we refuse
                    problems.append(f"{label}[{request_id!r}]: cannot load without pickle ({exc})")
                    continue
                shapes[request_id] = array.shape
                problems += _routing_array_problems(request_id, array, meta, label)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        return [f"cannot read {path}: {exc}"]
    if results is not None:
        problems += _results_vs_npz(shapes, results, meta, label)
    return problems


# ----------------------------------------------------------------------------- a whole run dir
def read_json_file(path: Path, problems: list[str]) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        problems.append(f"{path.name}: cannot read JSON ({exc})")
        return None


def read_results_file(path: Path, problems: list[str], label: str | None = None) -> list[dict]:
    """Parsed lines of a results file; every problem (named ``label:line``) goes to ``problems``."""
    label = label or path.name
    results: list[dict] = []
    seen: set[Any] = set()
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            problems.append(f"{label}:{number}: not valid JSON ({exc})")
            continue
        problems += [f"{label}:{number}: {p}" for p in validate_results_line(obj)]
        if isinstance(obj, dict):
            if obj.get("id") in seen:
                problems.append(f"{label}:{number}: duplicate id {obj['id']!r}")
            seen.add(obj.get("id"))
            results.append(obj)
    return results


def model_vs_routing_meta(step_obj: Any, routing_meta: dict) -> list[str]:
    meta = step_obj.get("meta") if isinstance(step_obj, dict) else None
    model = meta.get("model") if isinstance(meta, dict) else None
    if not isinstance(model, dict):
        return []
    return [
        f"step_details meta.model.{key} {model[key]!r} != routing_meta.{key} {routing_meta[key]!r}"
        for key in ("num_layers", "num_experts", "topk", "moe_layer_indices")
        if key in model and model[key] != routing_meta.get(key)
    ]


def validate_run_dir(out_dir: str | Path) -> list[str]:
    """Problems of whichever run files exist in ``out_dir`` and of their mutual consistency:
    the consolidated files of a complete (or version-1) run, or the manifest and committed
    checkpoint shards of a run in progress or interrupted."""
    out = Path(out_dir)
    try:
        manifest = read_manifest(out)
    except ValueError as exc:
        return [str(exc)]
    if manifest is not None and manifest.get("status") != "complete":
        from routing_replay.shard_schema import validate_checkpointed_run
        return validate_checkpointed_run(out, manifest)
    present = {name: (out / name).is_file() for name in RUN_FILES}
    if not any(present.values()):
        return [f"{out}: none of {', '.join(RUN_FILES)} found"]
    problems: list[str] = []
    if manifest is not None:
        from routing_replay.shard_schema import validate_manifest
        problems += [f"{MANIFEST_FILE}: {p}" for p in validate_manifest(manifest)]
    step_obj = read_json_file(out / STEP_DETAILS_FILE, problems) if present[STEP_DETAILS_FILE] else None
    if step_obj is not None:
        problems += [f"{STEP_DETAILS_FILE}: {p}" for p in validate_step_details(step_obj)]
    results = read_results_file(out / RESULTS_FILE, problems) if present[RESULTS_FILE] else None
    if manifest is not None:
        problems += _complete_run_problems(manifest, present, results)
    routing_meta = read_json_file(out / ROUTING_META_FILE, problems) if present[ROUTING_META_FILE] else None
    meta_problems = validate_routing_meta(routing_meta) if routing_meta is not None else []
    problems += [f"{ROUTING_META_FILE}: {p}" for p in meta_problems]
    meta_ok = routing_meta is not None and not meta_problems
    if present[ROUTING_FILE] != present[ROUTING_META_FILE]:
        have, lack = (ROUTING_FILE, ROUTING_META_FILE) if present[ROUTING_FILE] else (ROUTING_META_FILE, ROUTING_FILE)
        problems.append(f"{have} present without {lack}")
    if present[ROUTING_FILE] and meta_ok:
        problems += validate_routing_npz(out / ROUTING_FILE, routing_meta, results)
        problems += model_vs_routing_meta(step_obj, routing_meta)
    if not present[ROUTING_FILE] and results and any("routing_shape" in r for r in results):
        problems.append(f"{RESULTS_FILE} declares routing_shape but {ROUTING_FILE} is missing")
    if stated_record_routing(step_obj) is True and results and not present[ROUTING_FILE]:
        problems.append(f"meta.engine.record_routing is true but {ROUTING_FILE} is missing")
    return problems


def _complete_run_problems(manifest: dict, present: dict, results: Optional[list[dict]]) -> list[str]:
    """A complete run has results.jsonl with one line per request of the workload."""
    if results is None:
        return [f"{MANIFEST_FILE} says the run is complete but {RESULTS_FILE} is missing"]
    expected = manifest.get("num_requests")
    if isinstance(expected, int) and len(results) != expected:
        return [f"{RESULTS_FILE} has {len(results)} results, {MANIFEST_FILE} num_requests is {expected}"]
    return []
