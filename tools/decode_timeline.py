"""Where a real decode step's GPU time goes between kernels: the engine's own steps (graph
replays, input uploads, sampling, routing capture, host scheduling in between) under
torch.profiler, not an eager replica.

``decode_timeline(engine, prompts, steps)`` brings a batch to steady decode, profiles
``steps`` engine steps, drains the batch, and reports per step: the GPU's busy time (the
union of its kernel and copy intervals), its idle time inside the profiled window, the
host-to-device / device-to-host copies, and the largest idle gaps with the device work on
either side. A step whose GPU idles is waiting on the host: that share is what faster
kernels cannot recover (``tools/bench_decode.py --timeline-batches``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference.request import SamplingParams
from routing_replay import step_kind

WARM_STEPS = 3          # decode steps at the full batch before the profiled window
GAPS_SHOWN = 5


@dataclass(frozen=True)
class DeviceSpan:
    """One device activity (kernel, memcpy or memset) from ``start`` to ``end``, microseconds."""

    name: str
    start: float
    end: float


def copy_kind(name: str) -> str | None:
    """"HtoD" / "DtoH" / "DtoD" for a profiler memcpy name, None for anything else."""
    if not name.startswith("Memcpy"):
        return None
    for kind in ("HtoD", "DtoH", "DtoD"):
        if kind in name:
            return kind
    return "other"


def gpu_timeline(spans: list[DeviceSpan], steps: int, gaps_shown: int = GAPS_SHOWN) -> dict:
    """Busy and idle time per step over the window from the first span's start to the last
    span's end (overlapping spans, e.g. two streams, count once), copies per step by
    direction, and the ``gaps_shown`` largest idle gaps with the spans before and after."""
    if not spans or steps <= 0:
        return {"steps": steps, "spans": len(spans)}
    ordered = sorted(spans, key=lambda s: (s.start, s.end))
    busy, gaps = 0.0, []
    cur_start, cur_end, last = ordered[0].start, ordered[0].end, ordered[0]
    for span in ordered[1:]:
        if span.start > cur_end:
            busy += cur_end - cur_start
            gaps.append((span.start - cur_end, last.name, span.name))
            cur_start, cur_end = span.start, span.end
        elif span.end > cur_end:
            cur_end = span.end
        if span.end >= cur_end:
            last = span
    busy += cur_end - cur_start
    window = cur_end - ordered[0].start
    copies: dict[str, dict[str, float]] = {}
    for span in spans:
        kind = copy_kind(span.name)
        if kind is not None:
            entry = copies.setdefault(kind, {"per_step": 0.0, "ms_per_step": 0.0})
            entry["per_step"] += 1 / steps
            entry["ms_per_step"] += (span.end - span.start) / 1e3 / steps
    gaps.sort(key=lambda g: -g[0])
    return {"steps": steps, "spans": len(spans), "window_ms_per_step": window / 1e3 / steps,
            "busy_ms_per_step": busy / 1e3 / steps, "idle_ms_per_step": (window - busy) / 1e3 / steps,
            "idle_share": (window - busy) / window if window > 0 else 0.0, "copies": copies,
            "largest_gaps": [{"us": us, "after": a, "before": b} for us, a, b in gaps[:gaps_shown]]}


def device_spans(events) -> list[DeviceSpan]:
    """Device activities of profiler ``FunctionEvent``s (user annotations left out)."""
    spans = []
    for e in events:
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA and not getattr(
                e, "is_user_annotation", False):
            spans.append(DeviceSpan(e.name, e.time_range.start, e.time_range.end))
    return spans


def _step_counted(engine, batch: int) -> bool:
    """One engine step; True when it logged a decode step at the full batch."""
    logged = len(engine.step_log.entries)
    engine.step()
    if len(engine.step_log.entries) == logged:
        return False
    entry = engine.step_log.entries[-1]
    return step_kind(entry) == "decode" and entry["decode_requests"] == batch


def decode_timeline(engine, prompts: list[list[int]], steps: int = 16) -> dict:
    """Serve ``prompts`` to completion, profiling ``steps`` engine steps once the batch has
    decoded ``WARM_STEPS`` steps at full size; each request gets enough new tokens for the
    window. On a machine without CUDA the window has no device spans (a CPU smoke run)."""
    params = SamplingParams(max_new_tokens=WARM_STEPS + steps + 4, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    warm = 0
    while engine.has_unfinished() and warm < WARM_STEPS:
        warm += _step_counted(engine, len(prompts))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    profiled = 0
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            if not engine.has_unfinished():
                break
            profiled += _step_counted(engine, len(prompts))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    while engine.has_unfinished():
        engine.step()
    return gpu_timeline(device_spans(prof.events()), profiled)


def format_timeline(batch: str, t: dict) -> list[str]:
    """Table lines for one batch's timeline (none when it has no device spans)."""
    if "busy_ms_per_step" not in t:
        return []
    copies = ", ".join(f"{k} {c['per_step']:.1f}/step {c['ms_per_step']:.3f} ms" for k, c in t["copies"].items())
    lines = [f"timeline at batch {batch} ({t['steps']} engine steps): GPU busy {t['busy_ms_per_step']:.3f} ms, "
             f"idle {t['idle_ms_per_step']:.3f} ms per step ({t['idle_share']:.1%}); copies: {copies or 'none'}"]
    for g in t["largest_gaps"]:
        lines.append(f"    gap {g['us']:8.1f} us  after {g['after'][:50]:<50} before {g['before'][:50]}")
    return lines
