"""Per-step timing log: one entry per engine step, a summary, and an orjson writer.

Routing phases (host time, `time.perf_counter`, i.e. the cost of enqueueing the work):
gather (scatter of the step's routing into blocks), store (preemption snapshots toward the
host), reconstruct (block gather + async copy of finished requests), finalize (turning
completed copies into numpy results). Since schema version 2 each phase is also split into
sub-phases (`ROUTING_SUBPHASES`, keys `routing_<phase>_<sub>_ms`) that add up to it, and an
engine may time its own stages (`ENGINE_STAGES`, keys `stage_<stage>[_<sub>]_ms`). Since
version 3 the entries may be only the last ones of a long run (`StepDetailsLog(max_entries)`;
`summary.dropped_entries` counts the others, and the summary covers every step). Readers
accept version 1 files, which have no sub-phases or stages, and version 2 files, which
always hold every entry.
"""

from __future__ import annotations

import os
from collections import deque
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
SCHEMA_VERSION = 3
SUPPORTED_SCHEMA_VERSIONS = (1, 2, 3)


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


class _Totals:
    """Running sums over a group of step entries: step count, step time and each routing
    phase's time. Invariant: equal to the sums over every entry ``add`` was given."""

    def __init__(self) -> None:
        self.steps = 0
        self.step_ms = 0.0
        self.phase_ms = dict.fromkeys(ROUTING_PHASES, 0.0)

    def add(self, entry: Mapping) -> None:
        self.steps += 1
        self.step_ms += float(entry["step_time_ms"])
        for phase in ROUTING_PHASES:
            self.phase_ms[phase] += _phase_ms(entry, phase)

    def summary(self) -> dict:
        """Step count, step time and the four routing phases (the file's group summary)."""
        routing = {phase: {"total_ms": total, "mean_ms": _ratio(total, self.steps), "share": _ratio(total, self.step_ms)}
                   for phase, total in self.phase_ms.items()}
        routing_total = sum(self.phase_ms.values())
        return {
            "steps": self.steps,
            "step_time_ms": {"total": self.step_ms, "mean": _ratio(self.step_ms, self.steps)},
            "routing": routing,
            "routing_total_ms": routing_total,
            "routing_share": _ratio(routing_total, self.step_ms),
        }


class StepDetailsLog:
    """Per-step entries of one engine run, and running totals over all of them.

    Invariant: entries are in strictly increasing `step` order and every entry has all
    STEP_KEYS (extra keys are kept as they are). With ``max_entries`` only the last that
    many entries are kept (an engine serving for days would otherwise hold every step in
    memory); ``summary()`` always covers every recorded step, and ``len()`` counts them.
    """

    def __init__(self, max_entries: int | None = None) -> None:
        if max_entries is not None and (isinstance(max_entries, bool) or not isinstance(max_entries, int)
                                        or max_entries < 1):
            raise ValueError(f"max_entries must be None or an int >= 1, got {max_entries!r}")
        self._entries: deque[dict] = deque(maxlen=max_entries)
        self._recorded = 0
        self._overall = _Totals()
        self._by_kind = {kind: _Totals() for kind in STEP_KINDS}
        self._tokens = 0
        self._decode_tokens_of_decode_steps = 0
        self._kind_tokens = dict.fromkeys(("prefill_tokens", "decode_tokens"), 0)
        self._kind_tokens_complete = dict.fromkeys(("prefill_tokens", "decode_tokens"), True)

    def __len__(self) -> int:
        """Steps recorded, dropped entries included."""
        return self._recorded

    @property
    def num_dropped(self) -> int:
        """The oldest entries no longer kept (``max_entries``)."""
        return self._recorded - len(self._entries)

    @property
    def entries(self) -> list[dict]:
        """A copy of the kept entries, in step order."""
        return [dict(entry) for entry in self._entries]

    @property
    def last_entry(self) -> dict | None:
        """A copy of the latest entry (None before the first)."""
        return dict(self._entries[-1]) if self._entries else None

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
        entry = dict(entry)
        self._entries.append(entry)
        self._recorded += 1
        kind = step_kind(entry)
        self._overall.add(entry)
        self._by_kind[kind].add(entry)
        self._tokens += int(entry["active_tokens"])
        if kind == "decode":
            self._decode_tokens_of_decode_steps += int(entry["active_tokens"])
        for key in self._kind_tokens:
            if key in entry:
                self._kind_tokens[key] += int(entry[key])
            else:
                self._kind_tokens_complete[key] = False

    def summary(self) -> dict:
        """Totals, throughput and routing-phase shares, overall and per step kind, over
        every recorded step (kept or dropped).

        tokens_per_s counts every active token over all step time; decode_tokens_per_s
        counts the tokens of decode-only steps over their step time. prefill_tokens,
        decode_tokens and wall_time_s appear when the entries carry them; dropped_entries
        when the oldest entries were dropped (``max_entries``).
        """
        overall = self._overall.summary()
        summary: dict = {
            "num_steps": self._recorded,
            "total_step_time_ms": overall["step_time_ms"]["total"],
            "total_tokens": self._tokens,
        }
        for key, total in self._kind_tokens.items():
            if self._recorded and self._kind_tokens_complete[key]:
                summary[key] = total
        if self._entries and "time_s" in self._entries[-1]:   # the last kept entry is the last recorded
            summary["wall_time_s"] = float(self._entries[-1]["time_s"])
        summary["tokens_per_s"] = _ratio(self._tokens, overall["step_time_ms"]["total"] / 1000)
        summary["decode_tokens_per_s"] = _ratio(self._decode_tokens_of_decode_steps,
                                                self._by_kind["decode"].step_ms / 1000)
        summary["routing"] = overall["routing"]
        summary["routing_share"] = overall["routing_share"]
        summary["by_kind"] = {kind: totals.summary() for kind, totals in self._by_kind.items()}
        if self.num_dropped:
            summary["dropped_entries"] = self.num_dropped
        return summary

    def write(self, path: str | os.PathLike, meta: Mapping) -> None:
        """Write {"meta", "summary", "step_details"} as JSON (the kept entries); numpy
        scalars are allowed."""
        document = {
            "meta": {**meta, "schema_version": SCHEMA_VERSION, "kind": "step_details"},
            "summary": self.summary(),
            "step_details": list(self._entries),
        }
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY))
