"""Engine stages and routing sub-phases of step_details files (schema version 2), for
``tools/analyze_step_details.py``: per step kind, each stage's share of step time, and each
phase's sub-phases as shares of the phase. Version 1 files have neither: empty results.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from routing_replay.step_details import ENGINE_STAGES, ROUTING_SUBPHASES, STEP_KINDS, step_kind

PHASES_WITH_SUBS = {**ENGINE_STAGES, **ROUTING_SUBPHASES}


def describe(values: Sequence[float]) -> dict[str, Optional[float]]:
    """mean, p50, p99 and total of ``values`` (None for an empty sequence, total 0)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return {"mean": None, "p50": None, "p99": None, "total": 0.0}
    return {"mean": float(array.mean()), "p50": float(np.percentile(array, 50)),
            "p99": float(np.percentile(array, 99)), "total": float(array.sum())}


def _share(part: float, whole: float) -> Optional[float]:
    return part / whole if whole > 0 else None


def phase_breakdown(entries: Sequence[dict]) -> dict[str, Any]:
    """For every phase the entries carry (``stage_*`` and ``routing_*`` with sub-phases):
    its time (mean/p50/p99/total, share of step time) and each sub-phase's time and share
    of the phase."""
    step_total = sum(float(e["step_time_ms"]) for e in entries)
    out: dict[str, Any] = {}
    for phase, subs in PHASES_WITH_SUBS.items():
        keys = [f"{phase}_ms", *(f"{phase}_{sub}_ms" for sub in subs)]
        if not entries or not all(k in e for e in entries for k in keys):
            continue  # a version 1 file (routing phase totals only), or an engine without stages
        stats = describe([float(e[keys[0]]) for e in entries])
        item: dict[str, Any] = {**stats, "share_of_step": _share(stats["total"], step_total), "subs": {}}
        for sub, sub_key in zip(subs, keys[1:]):
            sub_stats = describe([float(e[sub_key]) for e in entries])
            item["subs"][sub] = {**sub_stats, "share_of_phase": _share(sub_stats["total"], stats["total"])}
        out[phase] = item
    return out


def breakdown_by_kind(entries: Sequence[dict]) -> dict[str, dict]:
    """``phase_breakdown`` per step kind present and for all steps (empty for v1 files)."""
    groups = {kind: [e for e in entries if step_kind(e) == kind] for kind in STEP_KINDS}
    result = {kind: phase_breakdown(group) for kind, group in groups.items() if group}
    result["all"] = phase_breakdown(entries)
    return {kind: b for kind, b in result.items() if b}


def gpu_idle_share(entries: Sequence[dict]) -> Optional[float]:
    """GPU time between steps over GPU time from the first step's start to the last one's
    end (``gpu_idle_before_ms`` and ``gpu_step_ms``); None without GPU timings."""
    timed = [e for e in entries if e.get("gpu_step_ms") is not None and e.get("gpu_idle_before_ms") is not None]
    idle = sum(float(e["gpu_idle_before_ms"]) for e in timed)
    busy = sum(float(e["gpu_step_ms"]) for e in timed)
    return _share(idle, idle + busy)


def breakdown_rows(breakdown: dict[str, dict], fmt) -> list[list[str]]:
    """Table rows: kind, phase, sub-phase, mean, p50, p99, share (of step for a phase, of
    the phase for a sub-phase)."""
    rows = []
    for kind, phases in breakdown.items():
        for phase, item in phases.items():
            rows.append([kind, phase, "", fmt(item["mean"]), fmt(item["p50"]), fmt(item["p99"]),
                         fmt(item["share_of_step"], "share")])
            for sub, s in item["subs"].items():
                rows.append(["", "", sub, fmt(s["mean"]), fmt(s["p50"]), fmt(s["p99"]),
                             fmt(s["share_of_phase"], "share")])
    return rows


BREAKDOWN_HEADERS = ["kind", "phase", "sub-phase", "mean_ms", "p50_ms", "p99_ms", "share"]


def plot_stages(plt: Any, analysis: dict, path) -> None:
    """Stacked bars: engine stages as shares of step time, per run and step kind."""
    bars = [(f"{r['label']}\n{kind}", phases) for r in analysis["runs"] for kind, phases in r["breakdown"].items()
            if kind != "all"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * max(len(bars), 1)), 5))
    bottoms = np.zeros(len(bars))
    for stage in ENGINE_STAGES:
        shares = np.array([100.0 * (phases.get(stage, {}).get("share_of_step") or 0.0) for _, phases in bars])
        ax.bar(range(len(bars)), shares, bottom=bottoms, label=stage.removeprefix("stage_"))
        bottoms += shares
    ax.set_xticks(range(len(bars)), [name for name, _ in bars])
    ax.set(ylabel="share of step time (%)", title="engine stages by step kind")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_subphases(plt: Any, analysis: dict, path) -> None:
    """One panel per phase with sub-phases: mean ms of each sub-phase, per run (all steps)."""
    phases = [p for p, subs in PHASES_WITH_SUBS.items() if subs]
    fig, axes = plt.subplots(1, len(phases), figsize=(3.2 * len(phases), 4), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        runs = [(r["label"], r["breakdown"].get("all", {}).get(phase)) for r in analysis["runs"]]
        bottoms = np.zeros(len(runs))
        for sub in PHASES_WITH_SUBS[phase]:
            means = np.array([(item or {}).get("subs", {}).get(sub, {}).get("mean") or 0.0 for _, item in runs])
            ax.bar(range(len(runs)), means, bottom=bottoms, label=sub)
            bottoms += means
        ax.set_xticks(range(len(runs)), [label for label, _ in runs])
        ax.set_title(phase, fontsize=9)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("mean host ms per step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
