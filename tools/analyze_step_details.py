"""Analyze step_details.json files: routing-phase cost by step kind, engine stages and
routing sub-phases (schema version 2), throughput over time, and a side-by-side comparison
of runs (e.g. routing recording on vs off, or synchronous vs asynchronous scheduling).

    python tools/analyze_step_details.py OFF/step_details.json ON/step_details.json \\
        --labels off,on --plot-dir plots --json analysis.json

Percentiles use numpy's default (linear interpolation). Shares are phase time over step time
of the same steps. tokens_per_s and decode_tokens_per_s follow the writer's summary
(routing_replay.step_details): active tokens over step time, and tokens of decode-only steps
over their step time. The time axis is ``time_s`` when every entry has it, else cumulative
step time; a window's tokens are those of the steps that ended in it.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import orjson

if __package__ in (None, ""):  # run as a script: the repository root is not on sys.path yet
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from routing_replay.schema import SchemaError, load_step_details  # noqa: E402
from routing_replay.step_details import ROUTING_PHASES, STEP_KINDS, step_kind  # noqa: E402
from tools.step_breakdown import (BREAKDOWN_HEADERS, breakdown_by_kind, breakdown_rows,  # noqa: E402
                                  describe, gpu_idle_share)
from tools.step_plots import PlottingUnavailable, pyplot, write_plots  # noqa: E402

STEP_MODES = ("graph", "eager")
DEFAULT_NUM_WINDOWS = 20


@dataclass(frozen=True)
class Run:
    """One validated step_details file; ``entries`` are in increasing step order."""

    label: str
    path: Path
    meta: dict
    entries: list[dict]
    dropped: int = 0       # oldest entries the writer did not keep (summary.dropped_entries)


# ----------------------------------------------------------------------------- loading
def _default_label(path: Path) -> str:
    # OUT/step_details.json is the usual layout: the run folder is the telling name.
    if path.stem == "step_details" and path.resolve().parent.name:
        return path.resolve().parent.name
    return path.stem


def default_labels(paths: Sequence[str | Path]) -> list[str]:
    """File stem, or the parent folder's name for files named step_details.json; made unique."""
    labels = [_default_label(Path(p)) for p in paths]
    return [f"{label}#{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def load_runs(paths: Sequence[str | Path], labels: Optional[Sequence[str]] = None) -> list[Run]:
    """Load and validate every file; raises SchemaError (or OSError) naming the bad file."""
    labels = list(labels) if labels is not None else default_labels(paths)
    runs = []
    for path, label in zip(paths, labels, strict=True):
        document = load_step_details(path)
        dropped = (document.get("summary") or {}).get("dropped_entries", 0)
        runs.append(Run(label, Path(path), document.get("meta", {}), document["step_details"], dropped))
    return runs


# ----------------------------------------------------------------------------- statistics
def _ratio(numerator: float, denominator: float) -> Optional[float]:
    # None rather than inf/NaN: JSON has neither, and "undefined" is the honest answer.
    return numerator / denominator if denominator > 0 else None


def group_key(entry: dict) -> str:
    """'<kind>/<mode>', e.g. 'decode/graph'."""
    return f"{step_kind(entry)}/{'graph' if entry['cuda_graph'] else 'eager'}"


def group_stats(entries: Sequence[dict]) -> dict[str, Any]:
    """Step time and per-phase host time (mean, p50, p99, total, share of step time)."""
    step_ms = [float(e["step_time_ms"]) for e in entries]
    step_total = sum(step_ms)
    phases = {}
    for phase in ROUTING_PHASES:
        stats = describe([float(e[f"routing_{phase}_ms"]) for e in entries])
        phases[phase] = {**stats, "share": _ratio(stats["total"], step_total)}
    routing = describe([sum(float(e[f"routing_{p}_ms"]) for p in ROUTING_PHASES) for e in entries])
    return {"steps": len(entries), "step_time_ms": describe(step_ms),
            "routing_ms": {**routing, "share": _ratio(routing["total"], step_total)}, "phases": phases}


def phase_stats(entries: Sequence[dict]) -> dict[str, dict]:
    """group_stats per '<kind>/<mode>' group present, per kind present, and for 'all' steps."""
    keys = [f"{kind}/{mode}" for kind in STEP_KINDS for mode in STEP_MODES]
    by_group = {key: [e for e in entries if group_key(e) == key] for key in keys}
    by_kind = {kind: [e for e in entries if step_kind(e) == kind] for kind in STEP_KINDS}
    return {
        "by_group": {key: group_stats(group) for key, group in by_group.items() if group},
        "by_kind": {kind: group_stats(group) for kind, group in by_kind.items() if group},
        "all": group_stats(entries),
    }


def step_end_times(entries: Sequence[dict]) -> tuple[np.ndarray, str]:
    """End time (s) of every step and its source: 'time_s' or 'cumulative_step_time'."""
    if entries and all(e.get("time_s") is not None for e in entries):
        return np.array([float(e["time_s"]) for e in entries]), "time_s"
    return np.cumsum([float(e["step_time_ms"]) / 1000.0 for e in entries]), "cumulative_step_time"


def _decode_tokens(entry: dict) -> int:
    # Without the optional split, every decoding request contributes exactly one token.
    count = entry.get("decode_tokens")
    return int(count) if count is not None else int(entry["decode_requests"])


def run_summary(entries: Sequence[dict]) -> dict[str, Any]:
    """Totals, throughput, routing share and mean step time per step kind."""
    ends, source = step_end_times(entries)
    stats = phase_stats(entries)
    total_ms = stats["all"]["step_time_ms"]["total"]
    decode_ms = stats["by_kind"]["decode"]["step_time_ms"]["total"] if "decode" in stats["by_kind"] else 0.0
    total_tokens = sum(int(e["active_tokens"]) for e in entries)
    decode_tokens = sum(_decode_tokens(e) for e in entries)
    decode_step_tokens = sum(int(e["active_tokens"]) for e in entries if step_kind(e) == "decode")
    return {
        "num_steps": len(entries),
        "total_step_time_ms": total_ms,
        "wall_time_s": float(ends[-1]) if len(entries) else 0.0,
        "time_source": source,
        "total_tokens": total_tokens,
        "decode_tokens": decode_tokens,
        "prefill_tokens": total_tokens - decode_tokens,
        "tokens_per_s": _ratio(total_tokens, total_ms / 1000.0),
        "decode_tokens_per_s": _ratio(decode_step_tokens, decode_ms / 1000.0),
        "routing_share": stats["all"]["routing_ms"]["share"],
        "gpu_idle_share": gpu_idle_share(entries),
        "mean_step_time_ms": {kind: s["step_time_ms"]["mean"] for kind, s in stats["by_kind"].items()},
        "routing_share_by_kind": {kind: s["routing_ms"]["share"] for kind, s in stats["by_kind"].items()},
    }


def throughput_windows(entries: Sequence[dict], window_steps: Optional[int] = None,
                       window_s: Optional[float] = None) -> list[dict[str, Any]]:
    """Tokens/s per window of ``window_steps`` steps or ``window_s`` seconds (one of them)."""
    if not entries:
        return []
    ends, _ = step_end_times(entries)
    origin = max(0.0, float(ends[0]) - float(entries[0]["step_time_ms"]) / 1000.0)
    if window_s is not None:
        # A step ending exactly on a boundary belongs to the window it closes.
        bins = np.maximum(np.ceil((ends - origin) / window_s).astype(np.int64) - 1, 0)
        bounds = [(origin + b * window_s, min(origin + (b + 1) * window_s, float(ends[-1])))
                  for b in range(int(bins[-1]) + 1)]
    else:
        size = window_steps or max(1, math.ceil(len(entries) / DEFAULT_NUM_WINDOWS))
        bins = np.arange(len(entries)) // size
        last_of = [min((b + 1) * size, len(entries)) - 1 for b in range(int(bins[-1]) + 1)]
        # A window starts where the previous one ended, so host gaps between steps count.
        bounds = [(origin if b == 0 else float(ends[last_of[b - 1]]), float(ends[last]))
                  for b, last in enumerate(last_of)]
    members_of: list[list[dict]] = [[] for _ in bounds]
    for entry, index in zip(entries, bins):
        members_of[index].append(entry)
    windows = []
    for (start, end), members in zip(bounds, members_of):
        tokens = sum(int(e["active_tokens"]) for e in members)
        decode = sum(_decode_tokens(e) for e in members)
        windows.append({"start_s": start, "end_s": end, "steps": len(members), "tokens": tokens,
                        "decode_tokens": decode, "tokens_per_s": _ratio(tokens, end - start),
                        "decode_tokens_per_s": _ratio(decode, end - start)})
    return windows


# (metric name, path of keys into run_summary's result)
COMPARED_METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("decode_tokens_per_s", ("decode_tokens_per_s",)),
    ("tokens_per_s", ("tokens_per_s",)),
    ("routing_share", ("routing_share",)),
    ("gpu_idle_share", ("gpu_idle_share",)),
    *((f"mean_step_time_ms/{kind}", ("mean_step_time_ms", kind)) for kind in STEP_KINDS),
    *((f"routing_share/{kind}", ("routing_share_by_kind", kind)) for kind in STEP_KINDS),
)


def compare_runs(summaries: Sequence[dict]) -> list[dict[str, Any]]:
    """Each COMPARED_METRICS value per run and its ratio to the first run (None if undefined)."""
    rows = []
    for name, path in COMPARED_METRICS:
        values = []
        for summary in summaries:
            value: Any = summary
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            values.append(value)
        base = values[0]
        ratios = [v / base if v is not None and base else None for v in values]
        rows.append({"metric": name, "values": values, "ratios": ratios})
    return rows


def analyze(runs: Sequence[Run], window_steps: Optional[int] = None,
            window_s: Optional[float] = None) -> dict[str, Any]:
    """Every number the report, the plots and --json show."""
    analysis: dict[str, Any] = {"runs": []}
    for run in runs:
        analysis["runs"].append({
            "label": run.label, "path": str(run.path), "dropped_entries": run.dropped,
            "summary": run_summary(run.entries),
            "phases": phase_stats(run.entries), "breakdown": breakdown_by_kind(run.entries),
            "throughput": throughput_windows(run.entries, window_steps, window_s),
        })
    if len(runs) > 1:
        analysis["comparison"] = {"baseline": runs[0].label,
                                  "metrics": compare_runs([r["summary"] for r in analysis["runs"]])}
    return analysis


# ----------------------------------------------------------------------------- text report
def _fmt(value: Any, style: str = "num") -> str:
    if value is None:
        return "-"
    if style == "share":
        return f"{100.0 * value:.2f}%"
    if style == "ratio":
        return f"{value:.3f}x"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: Sequence[int] = (0,)) -> str:
    """Fixed-width table: columns in ``left`` left-aligned (text), the others right-aligned."""
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        cells = [str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _phase_rows(name: str, stats: dict) -> list[list[str]]:
    parts = [("step", stats["step_time_ms"], None)]
    parts += [(phase, stats["phases"][phase], stats["phases"][phase]["share"]) for phase in ROUTING_PHASES]
    parts.append(("routing", stats["routing_ms"], stats["routing_ms"]["share"]))
    return [[name if i == 0 else "", str(stats["steps"]) if i == 0 else "", part,
             _fmt(s["mean"]), _fmt(s["p50"]), _fmt(s["p99"]), _fmt(share, "share")]
            for i, (part, s, share) in enumerate(parts)]


def render_report(analysis: dict) -> str:
    """Plain-text tables: per-phase host time, summary and throughput per run, then comparison."""
    blocks = []
    for run in analysis["runs"]:
        phases, summary = run["phases"], run["summary"]
        rows = [r for key, stats in phases["by_group"].items() for r in _phase_rows(key, stats)]
        rows += _phase_rows("all", phases["all"])
        headers = ["group", "steps", "phase", "mean_ms", "p50_ms", "p99_ms", "share"]
        kept = (f"; the writer kept only the last entries: these tables leave out the first "
                f"{run['dropped_entries']} steps" if run.get("dropped_entries") else "")
        blocks.append(f"== {run['label']} ({run['path']}): host time per step, by step kind{kept}\n"
                      + format_table(headers, rows, left=(0, 2)))
        keys = ("num_steps", "total_tokens", "decode_tokens", "wall_time_s", "tokens_per_s", "decode_tokens_per_s")
        summary_rows = [[k, _fmt(summary[k])] for k in keys]
        summary_rows.append(["routing_share", _fmt(summary["routing_share"], "share")])
        summary_rows.append(["gpu_idle_share", _fmt(summary["gpu_idle_share"], "share")])
        blocks.append(format_table(["summary", "value"], summary_rows))
        if run["breakdown"]:
            blocks.append("engine stages (share of step) and sub-phases (share of their phase)\n"
                          + format_table(BREAKDOWN_HEADERS, breakdown_rows(run["breakdown"], _fmt), left=(0, 1, 2)))
        windows = [[str(i), _fmt(w["start_s"]), _fmt(w["end_s"]), str(w["steps"]), str(w["tokens"]),
                    _fmt(w["tokens_per_s"]), _fmt(w["decode_tokens_per_s"])] for i, w in enumerate(run["throughput"])]
        headers = ["window", "start_s", "end_s", "steps", "tokens", "tok/s", "decode_tok/s"]
        blocks.append(f"throughput over time ({summary['time_source']})\n" + format_table(headers, windows))
    if "comparison" in analysis:
        labels = [run["label"] for run in analysis["runs"]]
        headers = ["metric", *labels, *[f"{label}/{labels[0]}" for label in labels[1:]]]
        rows = [[m["metric"], *[_fmt(v, "share" if "share" in m["metric"] else "num") for v in m["values"]],
                 *[_fmt(r, "ratio") for r in m["ratios"][1:]]] for m in analysis["comparison"]["metrics"]]
        blocks.append(f"== comparison (ratios to {labels[0]})\n" + format_table(headers, rows))
    return "\n\n".join(blocks)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="exit status: 0 tables written; 2 usage error, a missing or invalid input "
                                            "file, or --plot-dir without matplotlib (nothing analysed)")
    parser.add_argument("files", nargs="+", type=Path, help="step_details.json files (first = baseline)")
    parser.add_argument("--labels", help="comma-separated run names (default: file stem or parent folder)")
    window = parser.add_mutually_exclusive_group()
    window.add_argument("--window-steps", type=int,
                        help=f"throughput window in steps (default: about {DEFAULT_NUM_WINDOWS} windows per run)")
    window.add_argument("--window-s", type=float, help="throughput window in seconds")
    parser.add_argument("--plot-dir", type=Path, help="write PNG plots here (needs matplotlib)")
    parser.add_argument("--json", help="write every computed number here ('-': stdout, tables suppressed)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit code 0 on success, 2 for an unreadable or invalid input file, 1 if plotting is unavailable."""
    parser = build_parser()
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else default_labels(args.files)
    if len(labels) != len(args.files):
        parser.error(f"--labels names {len(labels)} runs but {len(args.files)} files were given")
    if (args.window_steps is not None and args.window_steps < 1) or (args.window_s is not None and args.window_s <= 0):
        parser.error("throughput windows must be positive")
    try:
        if args.plot_dir:
            pyplot()  # fail before the work, not after it
    except PlottingUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        runs = load_runs(args.files, labels)
    except (SchemaError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    analysis = analyze(runs, args.window_steps, args.window_s)
    if args.json != "-":
        print(render_report(analysis))
    if args.json == "-":
        sys.stdout.write(orjson.dumps(analysis, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif args.json:
        Path(args.json).write_bytes(orjson.dumps(analysis, option=orjson.OPT_INDENT_2) + b"\n")
    if args.plot_dir:
        for path in write_plots(runs, analysis, args.plot_dir):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
