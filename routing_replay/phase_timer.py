"""Host time of one engine step, by phase and sub-phase (``time.perf_counter``).

A phase's time is never measured on its own: it is the sum of its sub-phases, which are
contiguous laps of one stopwatch. So the sub-phases of a phase always add up to the phase,
and a step_details reader can see which sub-step dominates. A phase declared without
sub-phases is timed with laps under the sub-phase name ``""``.

    timer = PhaseTimer()
    t = timer.now()
    ...                                           # plan the copy
    t = timer.lap("routing_reconstruct", "plan", t)
    ...                                           # enqueue the gather
    t = timer.lap("routing_reconstruct", "gather", t)

Entry keys: ``<phase>_ms`` and ``<phase>_<sub>_ms`` (for example
``routing_reconstruct_ms`` and ``routing_reconstruct_gather_ms``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence


class PhaseTimer:
    """Accumulates host milliseconds per (phase, sub-phase) for one step.

    Invariant: ``phase_ms(p) == sum(sub_ms(p, s) for every sub-phase s of p)``.
    """

    __slots__ = ("_ms",)

    def __init__(self) -> None:
        self._ms: dict[tuple[str, str], float] = {}

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    def lap(self, phase: str, sub: str, since: float) -> float:
        """Add the time since ``since`` to ``phase``/``sub``; returns the current time, the
        start of the next lap."""
        now = time.perf_counter()
        key = (phase, sub)
        self._ms[key] = self._ms.get(key, 0.0) + (now - since) * 1e3
        return now

    def add(self, phase: str, sub: str, ms: float) -> None:
        key = (phase, sub)
        self._ms[key] = self._ms.get(key, 0.0) + ms

    def merge(self, other: "PhaseTimer") -> None:
        for (phase, sub), ms in other._ms.items():
            self.add(phase, sub, ms)

    def sub_ms(self, phase: str, sub: str) -> float:
        return self._ms.get((phase, sub), 0.0)

    def phase_ms(self, phase: str) -> float:
        return sum(ms for (p, _), ms in self._ms.items() if p == phase)

    def entry(self, phases: Mapping[str, Sequence[str]]) -> dict[str, float]:
        """step_details keys for ``phases`` (phase -> its sub-phases), zeros included, so
        every entry of a log has the same keys. Raises if a lap used an undeclared name."""
        unknown = [k for k in self._ms if k[0] not in phases or k[1] not in (phases[k[0]] or ("",))]
        if unknown:
            raise KeyError(f"timed sub-phases not declared: {sorted(unknown)}")
        out: dict[str, float] = {}
        for phase, subs in phases.items():
            values = [self._ms.get((phase, sub), 0.0) for sub in subs or ("",)]
            out[f"{phase}_ms"] = sum(values)
            out.update({f"{phase}_{sub}_ms": v for sub, v in zip(subs, values)})
        return out


def phase_keys(phases: Mapping[str, Iterable[str]], *, totals: bool = True, subs: bool = True) -> tuple[str, ...]:
    """The ``<phase>_ms`` (``totals``) and ``<phase>_<sub>_ms`` (``subs``) keys that
    ``PhaseTimer.entry`` writes for ``phases``."""
    keys: list[str] = []
    for phase, names in phases.items():
        if totals:
            keys.append(f"{phase}_ms")
        if subs:
            keys.extend(f"{phase}_{sub}_ms" for sub in names)
    return tuple(keys)
