"""Writing a run's files: results.jsonl, routing.npz + routing_meta.json, step_details.json.

With several data-parallel ranks each rank writes its shard under ``OUT/rank{r}/`` and
rank 0 merges results and routing into ``OUT/``; per-rank step_details stay in the shard
folders and rank 0's is also ``OUT/step_details.json``.
"""

from __future__ import annotations

import datetime
import platform
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import orjson
import torch

from inference.engine import LLMEngine
from inference.request import RequestResult
from routing_replay import RoutingMeta, load_routing, numpy_dtype, save_routing
from routing_replay.run_dir_schema import RESULTS_FILE, STEP_DETAILS_FILE


def result_record(result: RequestResult) -> dict:
    """One line of results.jsonl (schema in docs/SCHEMAS.md)."""
    record = {"id": result.request_id, "prompt_token_ids": result.prompt_token_ids,
              "output_token_ids": result.output_token_ids, "finish_reason": result.finish_reason,
              "num_cached_tokens": result.num_cached_tokens, "num_preemptions": result.num_preemptions}
    if result.error is not None:
        record["error"] = result.error
    if result.routing is not None:
        record["routing_shape"] = list(result.routing.shape)
        record["routing_dtype"] = str(result.routing.dtype)
        if result.routing_start:
            record["routing_start"] = result.routing_start
    return record


def routing_meta(engine: LLMEngine) -> RoutingMeta:
    mc = engine.model_config
    return RoutingMeta(moe_layer_indices=list(mc.moe_layer_indices), num_layers=mc.num_layers,
                       num_experts=mc.num_experts, topk=mc.topk, block_size=engine.config.block_size,
                       dtype=str(np.dtype(numpy_dtype(engine.recorder.dtype))))


def run_meta(engine: LLMEngine, extra: dict | None = None) -> dict:
    """The ``meta`` object of step_details.json: model, engine, device, versions."""
    device = engine.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
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


def write_run_outputs(out_dir: str | Path, results: Sequence[RequestResult], engine: LLMEngine,
                      meta_extra: dict | None = None) -> list[Path]:
    """Write every file of one process's run into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = b"".join(orjson.dumps(result_record(r)) + b"\n" for r in results)
    (out / RESULTS_FILE).write_bytes(lines)
    written = [out / RESULTS_FILE]
    if engine.recorder is not None:
        routings = {r.request_id: r.routing for r in results if r.routing is not None}
        save_routing(out, routings, routing_meta(engine))
        written += [out / "routing.npz", out / "routing_meta.json"]
    engine.step_log.write(out / STEP_DETAILS_FILE, run_meta(engine, meta_extra))
    written.append(out / STEP_DETAILS_FILE)
    return written


def merge_rank_outputs(out_dir: str | Path, world_size: int, order: Sequence[str]) -> list[Path]:
    """Rank 0: merge ``OUT/rank{r}/`` shards into ``OUT/``; results follow ``order`` (the
    request ids in input order). Shard results and routing are removed after merging."""
    out = Path(out_dir)
    by_id: dict[str, bytes] = {}
    routings: dict[str, np.ndarray] = {}
    meta = None
    for rank in range(world_size):
        shard = out / f"rank{rank}"
        for line in (shard / RESULTS_FILE).read_bytes().splitlines():
            if line.strip():
                by_id[orjson.loads(line)["id"]] = line
        if (shard / "routing.npz").is_file():
            shard_routing, meta = load_routing(shard)
            routings.update(shard_routing)
    (out / RESULTS_FILE).write_bytes(b"".join(by_id[i] + b"\n" for i in order if i in by_id))
    written = [out / RESULTS_FILE]
    if meta is not None:
        save_routing(out, routings, meta)
        written += [out / "routing.npz", out / "routing_meta.json"]
    shutil.copyfile(out / "rank0" / STEP_DETAILS_FILE, out / STEP_DETAILS_FILE)
    written.append(out / STEP_DETAILS_FILE)
    for rank in range(world_size):
        for name in (RESULTS_FILE, "routing.npz", "routing_meta.json"):
            (out / f"rank{rank}" / name).unlink(missing_ok=True)
    return written
