"""The shape loop shared by the kernel tuners (tools/tune_paged_decode.py,
tools/tune_prefill_attention.py): sweep each shape within a time budget, print its row as
it finishes, and rewrite the JSON report after every shape so a run cut short keeps what
it measured."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import orjson
import torch


def run_sweeps(shapes: Iterable, sweep: Callable[[object], dict], format_table: Callable[[list[dict]], str],
               time_budget: float, output: Path | None, report_fields: dict) -> tuple[list[dict], list[dict]]:
    """``sweep(shape)`` for every shape until ``time_budget`` seconds have passed (later
    shapes are listed as skipped); returns (results, skipped). The report holds the device,
    torch version and date, ``report_fields``, the skipped shapes and the results."""
    start, results, skipped = time.perf_counter(), [], []
    for shape in shapes:
        if time.perf_counter() - start > time_budget:
            skipped.append(asdict(shape))
            continue
        results.append(sweep(shape))
        print(format_table(results[-1:]).splitlines()[-1], flush=True)
        if output:
            report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                      "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), **report_fields,
                      "skipped": skipped, "results": results}
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return results, skipped


def add_sweep_args(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """The options every tuner takes: dtype, timing repetitions, the quick sweep, the time
    budget and the JSON report path."""
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--time-budget", type=float, default=400.0, help="seconds; later shapes are skipped past it")
    parser.add_argument("--output", type=Path, default=None)
