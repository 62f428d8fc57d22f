"""Writing a run's files: results.jsonl, routing.npz + routing_meta.json, step_details.json.

During a run, ``inference.run_writer.CheckpointWriter`` commits finished requests as
checkpoint shards; at the end of a complete run rank 0 consolidates every rank's shards into
``OUT/results.jsonl`` (input order) and ``OUT/routing.npz`` (``consolidate_run``). With
several data-parallel ranks, each rank's step_details stays in ``OUT/rank{r}/`` and rank 0's
is also ``OUT/step_details.json``. Every file is written to a tmp name, fsynced and renamed.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import orjson
import torch

from inference.config import ModelConfig
from inference.engine import LLMEngine
from inference.request import RequestResult
from routing_replay import RoutingMeta, StepDetailsLog, numpy_dtype, routing_dtype, save_routing
from routing_replay.outputs import RESULTS_FILE, ROUTING_FILE, check_routings
from routing_replay.run_dir_schema import STEP_DETAILS_FILE
from routing_replay.run_layout import (TMP_SUFFIX, atomic_write, committed_shards, fsync_dir, npz_writer, read_npz,
                                       shard_records)
def result_record(result: RequestResult, extra: Mapping[str, Any] | None = None) -> dict:
    """One line of results.jsonl (schema in docs/SCHEMAS.md); ``extra`` fields (the
    caller's, e.g. an RL group's ``prompt_id`` and ``sample_index``) come last."""
    record = {"id": result.request_id, "prompt_token_ids": result.prompt_token_ids,
              "output_token_ids": result.output_token_ids, "finish_reason": result.finish_reason,
              "num_cached_tokens": result.num_cached_tokens, "num_preemptions": result.num_preemptions}
    if result.finish_reason != "error":
        record["stop_string"] = result.stop_string
    if result.error is not None:
        record["error"] = result.error
    if result.routing is not None:
        record["routing_shape"] = list(result.routing.shape)
        record["routing_dtype"] = str(result.routing.dtype)
        if result.routing_start:
            record["routing_start"] = result.routing_start
    if result.output_logprobs is not None:
        record["output_logprobs"] = result.output_logprobs
    if result.output_top_logprobs is not None:
        record["output_top_logprobs"] = [[[token, value] for token, value in step] for step in result.output_top_logprobs]
    if result.prompt_logprobs is not None:
        record["prompt_logprobs"] = result.prompt_logprobs
    if result.weight_version is not None:
        record["weight_version"] = result.weight_version
    if extra:
        record.update(extra)
    return record


def routing_meta_for(mc: ModelConfig, block_size: int, weight_version: int | str | None = 0) -> RoutingMeta:
    """routing_meta.json of a run of model ``mc`` (known before any weights are built)."""
    return RoutingMeta(moe_layer_indices=list(mc.moe_layer_indices), num_layers=mc.num_layers,
                       num_experts=mc.num_experts, topk=mc.topk, block_size=block_size,
                       dtype=str(np.dtype(numpy_dtype(routing_dtype(mc.num_experts)))),
                       weight_version=weight_version)


def routing_meta(engine: LLMEngine) -> RoutingMeta:
    return routing_meta_for(engine.model_config, engine.config.block_size, engine.weight_version)


def run_meta(engine: LLMEngine, extra: dict | None = None) -> dict:
    """The ``meta`` object of step_details.json: model, engine, device, versions."""
    device = engine.device
    # platform.machine(), not processor(): on Linux that forks `uname -p` inside the run.
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine() or "cpu"
    return {
        "model": engine.model_config.to_dict(),
        "engine": engine.config.to_dict(),
        "device": f"{device.type}: {name}",
        "record_routing": engine.recorder is not None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "orjson": orjson.__version__, "package": _package_version()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }


def _package_version() -> str:
    try:
        from importlib.metadata import version
        return version("moe-routing-replay")
    except Exception:  # not installed (run from a checkout)
        return "unknown"


def write_step_details(log: StepDetailsLog, path: str | Path, meta: dict) -> None:
    """``StepDetailsLog.write`` to a tmp name, then fsync and rename (never a torn file)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + TMP_SUFFIX)
    log.write(tmp, meta)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)


def write_run_outputs(out_dir: str | Path, results: Sequence[RequestResult], engine: LLMEngine,
                      meta_extra: dict | None = None) -> list[Path]:
    """Write a whole run served in one go (a library caller's results) into ``out_dir``, in
    the consolidated layout; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if engine.recorder is not None:
        routings = {r.request_id: r.routing for r in results if r.routing is not None}
        save_routing(out, routings, routing_meta(engine))
        written += [out / ROUTING_FILE, out / "routing_meta.json"]
    lines = b"".join(orjson.dumps(result_record(r)) + b"\n" for r in results)
    atomic_write(out / RESULTS_FILE, lines)
    write_step_details(engine.step_log, out / STEP_DETAILS_FILE, run_meta(engine, meta_extra))
    return [out / RESULTS_FILE] + written + [out / STEP_DETAILS_FILE]


def consolidate_run(out_dir: str | Path, order: Sequence[str], meta: RoutingMeta | None) -> list[Path]:
    """Rank 0, once every request of the run has a committed record: write every rank's
    committed shards as ``results.jsonl`` (lines in ``order``, the input order) and, when
    routing is recorded, ``routing.npz`` (members in the same order). The shards are left
    in place: the caller commits by setting run.json's status to "complete", then removes
    them. Returns the paths written."""
    out = Path(out_dir)
    records = shard_records(committed_shards(out))
    missing = [i for i in order if i not in records]
    if missing:
        raise ValueError(f"cannot consolidate {out}: {len(missing)} requests have no committed result "
                         f"(first: {missing[0]!r})")
    written = []
    if meta is not None:
        routings = _committed_routing(records, order)
        check_routings(routings, meta)
        atomic_write(out / ROUTING_FILE, npz_writer(routings))
        written.append(out / ROUTING_FILE)
    atomic_write(out / RESULTS_FILE, b"".join(orjson.dumps(records[i][0]) + b"\n" for i in order))
    return [out / RESULTS_FILE] + written


def _committed_routing(records: dict, order: Sequence[str]) -> dict[str, np.ndarray]:
    """Routing of the winning record of every id in ``order`` that declares routing."""
    by_shard: dict[Path, dict[str, np.ndarray]] = {}
    routings: dict[str, np.ndarray] = {}
    for request_id in order:
        record, shard = records[request_id]
        if "routing_shape" not in record:
            continue
        if shard.routing is None:
            raise ValueError(f"shard {shard.name} declares routing for {request_id!r} but has no routing file")
        if shard.routing not in by_shard:
            by_shard[shard.routing] = read_npz(shard.routing, key_version=2)
        routings[request_id] = by_shard[shard.routing][request_id]
    return routings
