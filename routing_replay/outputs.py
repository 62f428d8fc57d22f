"""routing.npz / routing_meta.json: the on-disk form of recorded routing.

`routing.npz` holds one array per request, keyed by `run_layout.routing_key(request id)`
(the id itself for ids made of [A-Za-z0-9._-]), shaped [rows, num_moe_layers, topk] with
rows = prompt_len + generated_len - 1 (row i is token i). `routing_meta.json` says which
decoder layers those MoE layers are, so consumers can expand to an all-layer layout with
`expand_to_all_layers`. A run still in progress (or interrupted) keeps its routing in
checkpoint shards instead; `load_routing` and `load_results` read either form.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import orjson

from routing_replay.run_layout import (atomic_write, committed_shards, is_consolidated, npz_writer,
                                       parse_results_lines, read_npz, request_id_problem, shard_records)

ROUTING_FILE = "routing.npz"
META_FILE = "routing_meta.json"
RESULTS_FILE = "results.jsonl"
# 2: npz keys are routing_key(id) and routing may live in checkpoint shards; 1: keys are ids.
SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (1, 2)
_ID_DTYPES = ("uint8", "int16", "int32")


def _require_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class RoutingMeta:
    """Describes every array of one routing.npz.

    Invariant: moe_layer_indices is a strictly increasing list of decoder-layer indices in
    [0, num_layers), one per MoE layer; 1 <= topk <= num_experts; `dtype` is an integer
    dtype name that holds every expert id.
    """

    moe_layer_indices: list[int]
    num_layers: int
    num_experts: int
    topk: int
    block_size: int
    dtype: str
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.moe_layer_indices, (list, tuple)):
            raise TypeError("moe_layer_indices must be a list of ints")
        object.__setattr__(self, "moe_layer_indices", list(self.moe_layer_indices))
        _require_int("num_layers", self.num_layers, 1)
        _require_int("num_experts", self.num_experts, 1)
        _require_int("topk", self.topk, 1)
        _require_int("block_size", self.block_size, 1)
        _require_int("schema_version", self.schema_version, 1)
        if self.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
            raise ValueError(f"unsupported schema_version {self.schema_version}, "
                             f"expected one of {SUPPORTED_SCHEMA_VERSIONS}")
        if self.topk > self.num_experts:
            raise ValueError(f"topk={self.topk} exceeds num_experts={self.num_experts}")
        self._check_layers()
        self._check_dtype()

    def _check_layers(self) -> None:
        indices = self.moe_layer_indices
        if not indices:
            raise ValueError("moe_layer_indices must name at least one MoE layer")
        for index in indices:
            _require_int("moe_layer_indices[]", index, 0)
            if index >= self.num_layers:
                raise ValueError(f"MoE layer index {index} outside [0, {self.num_layers})")
        if any(a >= b for a, b in zip(indices, indices[1:])):
            raise ValueError(f"moe_layer_indices must be unique and sorted, got {indices}")

    def _check_dtype(self) -> None:
        if not isinstance(self.dtype, str) or self.dtype not in _ID_DTYPES:
            raise ValueError(f"dtype must be one of {_ID_DTYPES}, got {self.dtype!r}")
        if np.iinfo(self.dtype).max < self.num_experts - 1:
            raise ValueError(f"dtype {self.dtype} cannot hold ids of {self.num_experts} experts")

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_indices)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> RoutingMeta:
        if not isinstance(data, Mapping):
            raise TypeError(f"routing meta must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - {"schema_version"} - data.keys())
        if missing:
            raise ValueError(f"routing meta: missing keys {missing}")
        # Unknown keys are ignored: later schema additions must not break older readers.
        return cls(**{k: v for k, v in data.items() if k in names})

    def check_array(self, key: str, routing: np.ndarray) -> None:
        """Raise ValueError unless `routing` is [rows, num_moe_layers, topk] of `dtype`."""
        if not isinstance(routing, np.ndarray):
            raise TypeError(f"routing of {key!r} must be a numpy array, got {type(routing).__name__}")
        expected_tail = (self.num_moe_layers, self.topk)
        if routing.ndim != 3 or routing.shape[1:] != expected_tail:
            raise ValueError(
                f"routing of {key!r} has shape {routing.shape}, expected [rows, {expected_tail[0]}, {expected_tail[1]}]"
            )
        if routing.dtype != np.dtype(self.dtype):
            raise ValueError(f"routing of {key!r} has dtype {routing.dtype}, expected {self.dtype}")


def check_routings(routings: Mapping[str, np.ndarray], meta: RoutingMeta) -> None:
    """Raise ValueError unless every key is a valid request id and every array fits `meta`."""
    for key, routing in routings.items():
        problem = request_id_problem(key)
        if problem is not None:
            raise ValueError(f"request id {key!r} {problem}")
        meta.check_array(key, routing)


def save_routing(out_dir: str | os.PathLike, routings: Mapping[str, np.ndarray], meta: RoutingMeta) -> None:
    """Write routing.npz and routing_meta.json into `out_dir` (created if needed).

    The npz is what np.savez_compressed writes, built with zipfile directly because
    savez's keyword interface breaks for request ids such as "file" or "allow_pickle".
    Each file is written to a temporary name, fsynced and renamed, so readers never see a
    torn file. The metadata is written at the current schema version.
    """
    check_routings(routings, meta)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / ROUTING_FILE, npz_writer(routings))
    save_routing_meta(out, meta)


def save_routing_meta(out_dir: str | os.PathLike, meta: RoutingMeta) -> None:
    meta = replace(meta, schema_version=SCHEMA_VERSION)
    atomic_write(Path(out_dir) / META_FILE, orjson.dumps(meta.to_dict(), option=orjson.OPT_INDENT_2))


def load_routing_meta(out_dir: str | os.PathLike) -> RoutingMeta:
    meta_path = Path(out_dir) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"no {META_FILE} in {out_dir} (expected files written by save_routing)")
    try:
        return RoutingMeta.from_dict(orjson.loads(meta_path.read_bytes()))
    except (orjson.JSONDecodeError, TypeError, ValueError) as error:
        raise ValueError(f"invalid {meta_path}: {error}") from error


def load_routing(out_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], RoutingMeta]:
    """Every recorded routing of a run directory, keyed by the original request ids: from
    routing.npz once the run is complete (or for a version-1 directory), else from the
    committed checkpoint shards. Every array is checked against the metadata."""
    out = Path(out_dir)
    consolidated = is_consolidated(out)
    routing_path = out / ROUTING_FILE
    if consolidated and not routing_path.is_file():
        raise FileNotFoundError(f"no {ROUTING_FILE} in {out} (expected files written by save_routing)")
    meta = load_routing_meta(out)
    if consolidated:
        routings = read_npz(routing_path, meta.schema_version)
    else:
        routings = {}
        shards = committed_shards(out)
        owner = {request_id: shard.name for request_id, (_, shard) in shard_records(shards).items()}
        for shard in shards:
            if shard.routing is not None:
                arrays = read_npz(shard.routing, meta.schema_version)
                routings.update((k, v) for k, v in arrays.items() if owner.get(k) == shard.name)
    for key, routing in routings.items():
        meta.check_array(key, routing)
    return routings, meta


def load_results(out_dir: str | os.PathLike) -> list[dict]:
    """The result records (results.jsonl lines) of a run directory: results.jsonl in input
    order once the run is complete, else every committed checkpoint record in commit order
    (one per request id; a request that failed and was served again on --resume appears
    with its last record)."""
    out = Path(out_dir)
    if is_consolidated(out):
        path = out / RESULTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {RESULTS_FILE} in {out}")
        return parse_results_lines(path.read_bytes(), str(path))
    return [record for record, _ in shard_records(committed_shards(out)).values()]


def expand_to_all_layers(routing: np.ndarray, meta: RoutingMeta, fill: int = -1) -> np.ndarray:
    """[rows, num_layers, topk] copy of one request's routing; dense layers hold ``fill``.

    ``fill=-1`` (the default) marks layers without routing unambiguously, so the result is
    signed: int16 while expert ids fit, else int32. ``fill=0`` is the layout vLLM and SGLang
    return (their capture buffers start zeroed, only MoE layers write), which consumers that
    need non-negative ids everywhere (SkyRL) require; the result keeps ``meta.dtype``. A
    0-filled array cannot tell a dense layer from expert 0: read it back only with the MoE
    layer indices (``replay_targets`` takes ``moe_layer_indices``).
    """
    if isinstance(fill, bool) or not isinstance(fill, (int, np.integer)) or fill not in (-1, 0):
        raise ValueError(f"fill must be -1 or 0 (other values are valid expert ids), got {fill!r}")
    meta.check_array("routing", routing)
    if fill == 0:
        dtype = np.dtype(meta.dtype)
    else:
        dtype = np.int16 if meta.num_experts - 1 <= np.iinfo(np.int16).max else np.int32
    expanded = np.full((routing.shape[0], meta.num_layers, meta.topk), fill, dtype=dtype)
    expanded[:, meta.moe_layer_indices, :] = routing
    return expanded
