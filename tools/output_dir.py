"""--output-dir before any work: refuse a directory holding another run's files (unless
--overwrite), continue one with --resume, and keep the run manifest (run.json) whose
fingerprint makes --resume refuse a different configuration.

``inspect_output_dir`` only reads (and probes writability); ``--dry-run`` reports its
verdict. ``prepare_output_dir`` (rank 0) makes the directory ready and writes run.json.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import orjson

from inference.config import DTYPES, EngineConfig, ModelConfig
from inference.request import GREEDY_TEMPERATURE
from inference.sampling import SAMPLER_VERSION
from inference.workload import PromptSpec
from routing_replay import RoutingMeta
from routing_replay.outputs import META_FILE, RESULTS_FILE, ROUTING_FILE, load_results, save_routing_meta
from routing_replay.run_dir_schema import STEP_DETAILS_FILE
from routing_replay.run_layout import (CHECKPOINT_DIR, MANIFEST_FILE, TMP_SUFFIX, atomic_write, committed_shards,
                                       read_manifest, shard_name, shard_paths, shard_records, write_manifest)

RUN_FILES = (MANIFEST_FILE, RESULTS_FILE, ROUTING_FILE, META_FILE, STEP_DETAILS_FILE)
LOCK_FILE = ".run.lock"


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``OUT/.run.lock`` held while a process works
    on the run in OUT, so two processes (a requeued job and its still-running original)
    never write one directory. Invariant: held between ``__enter__`` and ``__exit__``; the
    kernel releases it when the holder dies, even by SIGKILL."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / LOCK_FILE
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> "RunLock":
        self._created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ValueError(f"--output-dir {self.path.parent} is in use by {holder} (it holds {self.path}); "
                             f"wait for it to end, or choose another directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
            if self._created and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()   # the run ended before writing anything


def run_fingerprint(args, model_config: ModelConfig, engine_config: EngineConfig, specs: Sequence[PromptSpec],
                    limits: Sequence[int]) -> dict:
    """Everything that decides a request's tokens and routing. Engine sizes (KV blocks,
    max_requests, max_step_tokens, prefix caching, graphs) and the world size are left out:
    a resumed run may change them."""
    workload = hashlib.sha256()
    for spec, limit in zip(specs, limits):
        # A line's own stop strings only when it has some: runs written before them keep their hash.
        own_stop = [list(spec.stop)] if spec.stop is not None else []
        workload.update(orjson.dumps([spec.request_id, spec.prompt_token_ids, limit, spec.routing_start, *own_stop]))
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                "ignore_eos": args.ignore_eos, "logprobs": args.logprobs,
                "prompt_logprobs": args.prompt_logprobs, "logprobs_mode": args.logprobs_mode}
    if args.stop_token_ids:
        sampling["stop_token_ids"] = list(args.stop_token_ids)
    if args.stop:
        sampling["stop"] = list(args.stop)
    if args.include_stop_str_in_output:   # output_text of the requests already on disk would differ
        sampling["include_stop_str_in_output"] = True
    if args.temperature >= GREEDY_TEMPERATURE:   # greedy tokens do not depend on the draws
        sampling["sampler"] = SAMPLER_VERSION
    # RL groups (--samples-per-prompt) change the ids and seeds, hence the workload hash too;
    # named on their own so a refusal says which flag changed (absent for one sample, as in
    # runs written before groups existed).
    groups = {"samples_per_prompt": args.samples_per_prompt} if args.samples_per_prompt > 1 else {}
    return {
        **groups,
        "model": model_config.to_dict(),
        "dtype": DTYPES[engine_config.dtype],
        "device_type": engine_config.device.split(":")[0],
        "seed": args.seed,
        "sampling": sampling,
        "record_routing": engine_config.record_routing,
        "block_size": engine_config.block_size,
        "num_requests": len(specs),
        "workload_sha256": workload.hexdigest(),
    }


def fingerprint_differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every differing field (nested objects one level deep)."""
    diffs = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}" if key != "workload_sha256" else "workload (prompts, ids or limits) differs")
    return diffs


@dataclass(frozen=True)
class OutputDirPlan:
    """What --output-dir holds and what this run does with it.

    Invariant: exactly one of ``problem`` (the run must not start; a usage error) and
    ``action`` ("new", "overwrite", "resume", "reopen" or "done") is set; "resume",
    "reopen" and "done" carry the existing manifest.
    """

    path: Path
    action: str | None
    problem: str | None = None
    manifest: dict | None = None


def _writable_problem(path: Path) -> str | None:
    """None when files can be created in ``path`` (or in the ancestor that will hold it)."""
    probe_dir = path
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        return f"--output-dir {path}: {probe_dir} is a file, not a directory"
    probe = probe_dir / f".write-probe-{os.getpid()}{TMP_SUFFIX}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as exc:
        return f"--output-dir {path}: cannot create files in {probe_dir} ({exc.strerror or exc})"
    return None


def _existing_run_files(path: Path) -> list[str]:
    """Files that make ``path`` hold a run. routing_meta.json alone does not: it is written
    just before run.json, so on its own it is what a run killed while starting leaves."""
    names = [n for n in RUN_FILES if n != META_FILE and (path / n).exists()]
    if (path / CHECKPOINT_DIR).is_dir():
        names.append(CHECKPOINT_DIR + "/")
    names += sorted(p.name + "/" for p in path.glob("rank*") if p.is_dir() and (p / STEP_DETAILS_FILE).exists())
    return names


def inspect_output_dir(path: str | Path, *, resume: bool, overwrite: bool, fingerprint: dict) -> OutputDirPlan:
    """Decide, without changing anything, whether and how this run may use ``path``."""
    path = Path(path)
    problem = _writable_problem(path)
    if problem:
        return OutputDirPlan(path, None, problem)
    existing = _existing_run_files(path) if path.is_dir() else []
    if not existing:
        return OutputDirPlan(path, "new")
    if overwrite:
        return OutputDirPlan(path, "overwrite")
    if not resume:
        return OutputDirPlan(path, None, (
            f"--output-dir {path} holds files of another run ({', '.join(existing)}); pass --resume to "
            f"continue that run, --overwrite to replace it, or choose another directory"))
    try:
        manifest = read_manifest(path)
    except ValueError as exc:
        return OutputDirPlan(path, None, f"--resume: {exc}; use --overwrite to replace the run")
    if manifest is None:
        return OutputDirPlan(path, None, (
            f"--resume: {path} has no {MANIFEST_FILE} (a run written before resumable runs, or cut short while "
            f"being overwritten), so it cannot be continued; use --overwrite to replace it"))
    diffs = fingerprint_differences(manifest.get("fingerprint", {}), fingerprint)
    if diffs:
        return OutputDirPlan(path, None, (
            f"--resume: {path} was written by a different configuration ({'; '.join(diffs)}); resume with the "
            f"original flags, or use --overwrite or another --output-dir"))
    if manifest.get("status") != "complete":
        return OutputDirPlan(path, "resume", manifest=manifest)
    failed = any(r.get("finish_reason") == "error" for r in load_results(path))
    return OutputDirPlan(path, "reopen" if failed else "done", manifest=manifest)


def _remove_run_files(path: Path) -> None:
    """Delete this program's files only (never anything else the user keeps there). The
    manifest goes first, so a cut-short overwrite never looks like a resumable run."""
    (path / MANIFEST_FILE).unlink(missing_ok=True)
    for name in RUN_FILES[1:]:
        (path / name).unlink(missing_ok=True)
    shutil.rmtree(path / CHECKPOINT_DIR, ignore_errors=True)
    for rank_dir in path.glob("rank*"):
        if rank_dir.is_dir():
            (rank_dir / STEP_DETAILS_FILE).unlink(missing_ok=True)
    for leftover in path.glob("*" + TMP_SUFFIX):
        leftover.unlink(missing_ok=True)


def _remove_crash_leftovers(path: Path) -> None:
    """``*.tmp`` files and routing shards whose results file never got renamed into place."""
    base = path / CHECKPOINT_DIR
    for leftover in list(path.glob("*" + TMP_SUFFIX)) + list(base.glob("*" + TMP_SUFFIX)):
        leftover.unlink(missing_ok=True)
    committed = {s.name for s in committed_shards(path)}
    for routing in base.glob("routing-*.npz"):
        if routing.name[len("routing-"):-len(".npz")] not in committed:
            routing.unlink(missing_ok=True)


def _reopen_complete_run(path: Path) -> None:
    """A complete run with failed requests becomes a run in progress whose consolidated files
    are shard 0, so --resume can serve the failed requests again. Each step leaves a valid
    directory: the shard copies are committed before run.json's status changes."""
    results_shard, routing_shard = shard_paths(path, shard_name(0, 0, 0))
    results_shard.parent.mkdir(exist_ok=True)
    if (path / ROUTING_FILE).is_file():
        atomic_write(routing_shard, (path / ROUTING_FILE).read_bytes())
    atomic_write(results_shard, (path / RESULTS_FILE).read_bytes())


def prepare_output_dir(plan: OutputDirPlan, manifest_fields: dict, routing_meta: RoutingMeta | None) -> int:
    """Rank 0: make ``plan.path`` ready for this run, write run.json (status "running") and,
    when routing is recorded, routing_meta.json; returns this run's attempt number (1 for a
    new run)."""
    path = plan.path
    path.mkdir(parents=True, exist_ok=True)
    if plan.action == "overwrite":
        _remove_run_files(path)
    attempt = 1
    if plan.action in ("resume", "reopen"):
        _remove_crash_leftovers(path)
        if plan.action == "reopen":
            _reopen_complete_run(path)
        attempt = int(plan.manifest.get("attempt", 0)) + 1
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    created = plan.manifest.get("created", now) if plan.manifest else now
    if routing_meta is not None:
        save_routing_meta(path, routing_meta)
    write_manifest(path, {**manifest_fields, "status": "running", "attempt": attempt, "created": created,
                          "updated": now, "command": sys.argv})
    if plan.action == "reopen":
        (path / RESULTS_FILE).unlink(missing_ok=True)
        (path / ROUTING_FILE).unlink(missing_ok=True)
    return attempt


def finish_complete_run(path: str | Path) -> None:
    """Remove what a complete run no longer needs (shards the consolidation made redundant,
    crash leftovers); run.json already says "complete", so readers never use them."""
    path = Path(path)
    shutil.rmtree(path / CHECKPOINT_DIR, ignore_errors=True)
    for leftover in path.glob("*" + TMP_SUFFIX):
        leftover.unlink(missing_ok=True)


def set_status(path: str | Path, status: str) -> None:
    """Rewrite run.json's status (the commit point of a consolidation)."""
    manifest = read_manifest(path) or {}
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_manifest(path, {**manifest, "status": status, "updated": now})


def finished_ids(path: str | Path, before_attempt: int) -> set[str]:
    """Ids with a committed non-error result from attempts before ``before_attempt``: the
    requests --resume skips (a failed request is served again)."""
    records = shard_records([s for s in committed_shards(path) if s.attempt < before_attempt])
    return {i for i, (record, _) in records.items() if record.get("finish_reason") != "error"}
