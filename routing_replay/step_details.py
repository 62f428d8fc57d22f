"""Per-step timing log: one entry per engine step, a summary, and an orjson writer.

Routing phases (host time, `time.perf_counter`, i.e. the cost of enqueueing the work):
gather (scatter of the step's routing into blocks), store (preemption snapshots toward the
host), reconstruct (block gather + async copy of finished requests), finalize (turning
completed copies into numpy results). Since schema version 2 each phase is also split into
sub-phases (`ROUTING_SUBPHASES`, keys `routing_<phase>_<sub>_ms`) that add up to it, and an
engine may time its own stages (`ENGINE_STAGES`, keys `stage_<stage>[_<sub>]_ms`). Readers
accept version 1 files, which have neither.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import orjson

STEP_KEYS = (
    "step",
    "prefill_requests",
    "decode_requests",
    "active_tokens",
    "padded_tokens",
    "cuda_graph",
    "step_time_ms",
    "routing_gather_ms",
    "routing_store_ms",
    "routing_reconstruct_ms",
    "routing_finalize_ms",
)
ROUTING_PHASES = ("gather", "store", "reconstruct", "finalize")
# Sub-phases of each routing phase, in the order they run (PhaseTimer keys "routing_<phase>").
ROUTING_SUBPHASES = {
    "routing_gather": ("check", "scatter"),              # index checks; scatter enqueue
    "routing_store": ("plan", "gather", "copy"),         # block ids; index_select + event; D2H enqueue
    "routing_reconstruct": ("plan", "gather", "copy"),
    "routing_finalize": ("poll", "assemble"),            # event queries; numpy merge + trim
}
# An engine's own host stages of one step (optional keys; see docs/SCHEMAS.md).
ENGINE_STAGES = {
    "stage_schedule": (),                                # the scheduler (preemption snapshots inside)
    "stage_prepare": ("inputs", "upload"),               # host staging; H2D copies + device token feed
    "stage_launch": ("forward", "sample", "copy"),       # forward enqueue; sampler; tokens D2H + event
    "stage_complete": ("wait", "update", "routing"),     # token event; scheduler update; reconstruct + finalize
}
STEP_KINDS = ("prefill", "decode", "mixed")
SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (1, 2)


def step_kind(entry: Mapping) -> str:
    """Kind of a step: "prefill" (prefill requests only), "decode" (no prefill requests)
    or "mixed" (both)."""
    if entry["prefill_requests"] == 0:
        return "decode"
    if entry["decode_requests"] == 0:
        return "prefill"
    return "mixed"


def _ratio(numerator: float, denominator: float) -> float | None:
    # None rather than 0 or inf: a rate over no time is undefined, and JSON has no inf.
    return numerator / denominator if denominator > 0 else None


def _phase_ms(entry: Mapping, phase: str) -> float:
    return float(entry[f"routing_{phase}_ms"])


def _group_summary(entries: list[dict]) -> dict:
    """Step count, step time and the four routing phases of a group of entries."""
    steps = len(entries)
    step_total = sum(float(e["step_time_ms"]) for e in entries)
    routing: dict[str, dict] = {}
    for phase in ROUTING_PHASES:
        total = sum(_phase_ms(e, phase) for e in entries)
        routing[phase] = {
            "total_ms": total,
            "mean_ms": _ratio(total, steps),
            "share": _ratio(total, step_total),
        }
    routing_total = sum(p["total_ms"] for p in routing.values())
    return {
        "steps": steps,
        "step_time_ms": {"total": step_total, "mean": _ratio(step_total, steps)},
        "routing": routing,
        "routing_total_ms": routing_total,
        "routing_share": _ratio(routing_total, step_total),
    }


class StepDetailsLog:
    """Per-step entries of one engine run.

    Invariant: entries are in strictly increasing `step` order and every entry has all
    STEP_KEYS (extra keys are kept as they are).
    """

    def __init__(self) -> None:
        self._entries: list[dict] = []

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> list[dict]:
        """A copy of the recorded entries, in step order."""
        return [dict(entry) for entry in self._entries]

    def record(self, entry: Mapping) -> None:
        """Append one step's entry (copied, so later changes by the caller do not leak in)."""
        missing = [key for key in STEP_KEYS if key not in entry]
        if missing:
            raise ValueError(f"step entry is missing keys {missing}")
        step = entry["step"]
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        if self._entries and step <= self._entries[-1]["step"]:
            raise ValueError(f"step {step} recorded after step {self._entries[-1]['step']}")
        self._entries.append(dict(entry))

    def summary(self) -> dict:
        """Totals, throughput and routing-phase shares, overall and per step kind.

        tokens_per_s counts every active token over all step time; decode_tokens_per_s
        counts the tokens of decode-only steps over their step time. prefill_tokens,
        decode_tokens and wall_time_s appear when the entries carry them.
        """
        entries = self._entries
        overall = _group_summary(entries)
        total_tokens = sum(int(e["active_tokens"]) for e in entries)
        decode_steps = [e for e in entries if step_kind(e) == "decode"]
        decode_step_ms = sum(float(e["step_time_ms"]) for e in decode_steps)
        summary: dict = {
            "num_steps": len(entries),
            "total_step_time_ms": overall["step_time_ms"]["total"],
            "total_tokens": total_tokens,
        }
        for key in ("prefill_tokens", "decode_tokens"):
            if entries and all(key in e for e in entries):
                summary[key] = sum(int(e[key]) for e in entries)
        if entries and "time_s" in entries[-1]:
            summary["wall_time_s"] = float(entries[-1]["time_s"])
        summary["tokens_per_s"] = _ratio(total_tokens, overall["step_time_ms"]["total"] / 1000)
        summary["decode_tokens_per_s"] = _ratio(
            sum(int(e["active_tokens"]) for e in decode_steps), decode_step_ms / 1000
        )
        summary["routing"] = overall["routing"]
        summary["routing_share"] = overall["routing_share"]
        summary["by_kind"] = {
            kind: _group_summary([e for e in entries if step_kind(e) == kind]) for kind in STEP_KINDS
        }
        return summary

    def write(self, path: str | os.PathLike, meta: Mapping) -> None:
        """Write {"meta", "summary", "step_details"} as JSON; numpy scalars are allowed."""
        document = {
            "meta": {**meta, "schema_version": SCHEMA_VERSION, "kind": "step_details"},
            "summary": self.summary(),
            "step_details": self._entries,
        }
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY))
