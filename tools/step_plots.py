"""PNG plots of analysed step_details runs (``tools/analyze_step_details.py --plot-dir``)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from routing_replay.step_details import ROUTING_PHASES
from tools.step_breakdown import plot_stages, plot_subphases

PNG_FILES = ("phase_share.png", "throughput.png", "stages.png", "subphases.png")


class PlottingUnavailable(RuntimeError):
    """--plot-dir was asked for but matplotlib cannot be imported."""


def pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlottingUnavailable(
            "--plot-dir needs matplotlib: pip install -e \".[plot]\" (or pip install \"moe-routing-replay[plot]\")"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label) or "run"


def _plot_steps(plt: Any, run: Any, path: Path) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    steps = [e["step"] for e in run.entries]
    top.plot(steps, [e["step_time_ms"] for e in run.entries], lw=0.8)
    top.set_ylabel("step time (ms)")
    for phase in ROUTING_PHASES:
        bottom.plot(steps, [e[f"routing_{phase}_ms"] for e in run.entries], lw=0.8, label=phase)
    bottom.set(xlabel="step", ylabel="routing host time (ms)")
    bottom.legend(loc="upper right")
    top.set_title(f"{run.label}: step time and routing phases")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_shares(plt: Any, analysis: dict, path: Path) -> None:
    bars = [(f"{r['label']}\n{kind}", s) for r in analysis["runs"] for kind, s in r["phases"]["by_kind"].items()]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(bars)), 5))
    bottoms = np.zeros(len(bars))
    for phase in ROUTING_PHASES:
        shares = np.array([100.0 * (s["phases"][phase]["share"] or 0.0) for _, s in bars])
        ax.bar(range(len(bars)), shares, bottom=bottoms, label=phase)
        bottoms += shares
    ax.set_xticks(range(len(bars)), [name for name, _ in bars])
    ax.set(ylabel="share of step time (%)", title="routing phases by step kind")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_throughput(plt: Any, analysis: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 5))
    for run in analysis["runs"]:
        mids = [(w["start_s"] + w["end_s"]) / 2 for w in run["throughput"]]
        line, = ax.plot(mids, [w["tokens_per_s"] or 0.0 for w in run["throughput"]], marker=".", label=run["label"])
        ax.plot(mids, [w["decode_tokens_per_s"] or 0.0 for w in run["throughput"]], ls="--", color=line.get_color(),
                label=f"{run['label']} (decode tokens)")
    ax.set(xlabel=f"time (s, {analysis['runs'][0]['summary']['time_source']})", ylabel="tokens/s",
           title="throughput over time")
    ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(runs: Sequence[Any], analysis: dict, plot_dir: str | Path) -> list[Path]:
    """PNG files: steps_<label>.png per run, phase_share.png, throughput.png, stages.png,
    subphases.png (the last two are empty panels for version 1 files)."""
    plt = pyplot()
    out = Path(plot_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for run in runs:
        paths.append(out / f"steps_{_slug(run.label)}.png")
        _plot_steps(plt, run, paths[-1])
    _plot_shares(plt, analysis, out / PNG_FILES[0])
    _plot_throughput(plt, analysis, out / PNG_FILES[1])
    plot_stages(plt, analysis, out / PNG_FILES[2])
    plot_subphases(plt, analysis, out / PNG_FILES[3])
    return paths + [out / name for name in PNG_FILES]
