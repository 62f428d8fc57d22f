"""The layout of a run directory (schema version 2) and the crash-safe file primitives that
write it. docs/SCHEMAS.md describes the layout; this module is its one reader.

A run directory is in one of two states, told apart by ``run.json``:

- consolidated (``status == "complete"``, or no ``run.json``: a version-1 directory):
  ``results.jsonl`` and ``routing.npz`` hold every request;
- in progress (``status`` ``"running"`` or ``"interrupted"``): committed checkpoint shards
  under ``checkpoint/`` hold every request that finished before the last checkpoint.

A shard is a pair ``results-<name>.jsonl`` (the commit record, renamed into place last) and
``routing-<name>.npz``. Every file is written to a ``.tmp`` name, fsynced and renamed, so no
reader ever sees a torn file; a routing shard without its results file (a crash between the
two renames) and ``.tmp`` files are leftovers that readers ignore.

Request ids are never file or member paths: an npz member is ``routing_key(id) + ".npy"``,
an injective percent-encoding that keeps ``[A-Za-z0-9._-]`` and encodes every other UTF-8
byte as ``%XX``.
"""

from __future__ import annotations

import os
import re
import unicodedata
import urllib.parse
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Union

import numpy as np
import orjson

MANIFEST_FILE = "run.json"
CHECKPOINT_DIR = "checkpoint"
LAYOUT_VERSION = 2
MANIFEST_KIND = "run_manifest"
RUN_STATUSES = ("running", "interrupted", "complete")
MAX_REQUEST_ID_CHARS = 256
TMP_SUFFIX = ".tmp"

_SAFE_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_SHARD_RE = re.compile(r"^results-(a(\d+)-r(\d+)-(\d+))\.jsonl$")
# A fixed member timestamp: the same routing gives the same bytes, run after run.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)

Payload = Union[bytes, Callable[[BinaryIO], None]]


# ----------------------------------------------------------------------------- request ids
def request_id_problem(request_id: object) -> str | None:
    """Why ``request_id`` cannot name a request (None when it can): a non-empty string of at
    most 256 characters without control characters or line breaks."""
    if not isinstance(request_id, str):
        return f"must be a string, got {type(request_id).__name__}"
    if not request_id:
        return "must not be empty"
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        return f"has {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS} are allowed"
    for char in request_id:
        if unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp"):
            return f"contains the control character {char!r}"
    return None


def routing_key(request_id: str) -> str:
    """The npz member stem of a request: the id itself when it is made of ``[A-Za-z0-9._-]``,
    else its percent-encoding (so keys never contain a path separator)."""
    return "".join(c if c in _SAFE_KEY_CHARS else urllib.parse.quote(c, safe="") for c in request_id)


def request_id_from_key(key: str) -> str:
    """Inverse of ``routing_key``."""
    return urllib.parse.unquote(key, errors="strict")


# ----------------------------------------------------------------------------- crash-safe writes
def _open_for_write(path: Path) -> BinaryIO:
    # The one place files are created, so fault-injection tests can replace it.
    return open(path, "wb")


def fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, payload: Payload, *, sync_dir: bool = True) -> None:
    """Write ``payload`` (bytes, or a function writing into a binary file) to ``path`` so a
    reader sees either the old file or the complete new one: tmp name, fsync, rename. On any
    error the tmp file is removed and the error propagates; ``path`` is untouched."""
    target = Path(path)
    tmp = target.with_name(target.name + TMP_SUFFIX)
    try:
        with _open_for_write(tmp) as handle:
            if isinstance(payload, bytes):
                handle.write(payload)
            else:
                payload(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(target.parent)


def npz_writer(routings: Mapping[str, np.ndarray]) -> Callable[[BinaryIO], None]:
    """A payload for ``atomic_write``: the ``np.savez_compressed`` layout, one member per
    request named ``routing_key(id) + ".npy"``, with fixed timestamps."""

    def write(handle: BinaryIO) -> None:
        with zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
            for request_id, routing in routings.items():
                info = zipfile.ZipInfo(routing_key(request_id) + ".npy", date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                with archive.open(info, mode="w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.ascontiguousarray(routing), allow_pickle=False)

    return write


def read_npz(path: Path, key_version: int) -> dict[str, np.ndarray]:
    """Arrays of one routing npz keyed by request id (version-1 files keyed ids directly)."""
    routings: dict[str, np.ndarray] = {}
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            request_id = key if key_version < 2 else request_id_from_key(key)
            routings[request_id] = archive[key]
    return routings


# ----------------------------------------------------------------------------- manifest
def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The parsed ``run.json``, or None for a directory without one (version 1)."""
    path = Path(out_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
        raise ValueError(f"{path}: not a run manifest (kind must be {MANIFEST_KIND!r})")
    return manifest


def write_manifest(out_dir: str | os.PathLike, manifest: Mapping) -> None:
    document = {"schema_version": LAYOUT_VERSION, "kind": MANIFEST_KIND,
                **{k: v for k, v in manifest.items() if k not in ("schema_version", "kind")}}
    atomic_write(Path(out_dir) / MANIFEST_FILE, orjson.dumps(document, option=orjson.OPT_INDENT_2))


def is_consolidated(out_dir: str | os.PathLike) -> bool:
    """True when results.jsonl / routing.npz are the run's files (complete or version 1)."""
    manifest = read_manifest(out_dir)
    return manifest is None or manifest.get("status") == "complete"


# ----------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class Shard:
    """One committed checkpoint of one writer.

    Invariant: ``results`` exists (its rename committed the shard); ``routing`` is the
    shard's routing file when one was written, holding exactly the arrays of the results
    records that declare ``routing_shape``.
    """

    name: str
    attempt: int
    rank: int
    seq: int
    results: Path
    routing: Path | None


def shard_name(attempt: int, rank: int, seq: int) -> str:
    return f"a{attempt:03d}-r{rank}-{seq:06d}"


def shard_paths(out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """(results file, routing file) of shard ``name``."""
    base = Path(out_dir) / CHECKPOINT_DIR
    return base / f"results-{name}.jsonl", base / f"routing-{name}.npz"


def committed_shards(out_dir: str | os.PathLike) -> list[Shard]:
    """Committed shards in commit order: by attempt, then rank, then sequence number."""
    base = Path(out_dir) / CHECKPOINT_DIR
    if not base.is_dir():
        return []
    shards = []
    for path in base.iterdir():
        match = _SHARD_RE.match(path.name)
        if match is None:
            continue
        name = match.group(1)
        routing = shard_paths(out_dir, name)[1]
        shards.append(Shard(name, int(match.group(2)), int(match.group(3)), int(match.group(4)), path,
                            routing if routing.is_file() else None))
    return sorted(shards, key=lambda s: (s.attempt, s.rank, s.seq))


def parse_results_lines(data: bytes, where: str) -> list[dict]:
    """Objects of a results file; blank lines are skipped. Raises ValueError naming the line."""
    records = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{where}:{number}: not valid JSON ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise ValueError(f"{where}:{number}: not a result object with a string 'id'")
        records.append(record)
    return records


def shard_records(shards: list[Shard]) -> dict[str, tuple[dict, Shard]]:
    """Every committed result record by id, with the shard holding it. Records are read in
    commit order and a later record of an id replaces an earlier one (a request that failed
    is served again on --resume; a finished one never is)."""
    records: dict[str, tuple[dict, Shard]] = {}
    for shard in shards:
        for record in parse_results_lines(shard.results.read_bytes(), str(shard.results)):
            records.pop(record["id"], None)   # re-insert: dict order becomes commit order
            records[record["id"]] = (record, shard)
    return records
