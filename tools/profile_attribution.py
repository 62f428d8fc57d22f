"""Charge profiled device kernels to the component labels whose CPU range launched them.

A kernel is matched to the CPU call that launched it by its CUPTI correlation id (the
runtime / driver event: ``cudaLaunchKernel``, ``cuLaunchKernel`` / ``cuLaunchKernelEx``
for Triton, ``cudaGraphLaunch``, ``cudaMemcpyAsync`` ...), and charged to the innermost
``record_function`` label whose CPU range contains that launch. This does not depend on an
aten op being the kernel's parent: a Triton launch inside a labelled Python function has
none (kineto links kernels only to the innermost *op*, so such kernels used to fall into
"unlabelled"). Kernels whose launch event is missing fall back to the CPU op the profiler
linked them to, if any.

``attribute_kernels`` is a pure function over plain records (``LabelRange``, ``Launch``,
``KernelRecord``) so it can be tested without a GPU; ``records_from_events`` turns
``torch.profiler`` ``FunctionEvent``s into those records.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

UNLABELLED = "unlabelled"
# CPU-side runtime / driver calls that start device work (a kernel, a copy, a graph).
_LAUNCH_PREFIXES = ("cuda", "cu", "hip")


@dataclass(frozen=True)
class LabelRange:
    """A labelled CPU range ``[start, end]`` (us) on ``thread``; ranges of one thread nest."""

    name: str
    thread: int
    start: float
    end: float


@dataclass(frozen=True)
class Launch:
    """The CPU call (at ``time`` us on ``thread``) that launched the device work carrying
    ``correlation_id``."""

    correlation_id: int
    thread: int
    time: float


@dataclass(frozen=True)
class KernelRecord:
    """One device-side execution (kernel, memcpy, memset) of ``duration`` us."""

    name: str
    correlation_id: int
    duration: float


@dataclass
class Attribution:
    """Device time per label (``totals``, us, "unlabelled" included) and per (kernel short
    name, label): ``[calls, us]``. Invariant: ``sum(totals) == sum of every kernel's time``."""

    totals: dict[str, float] = field(default_factory=dict)
    kernels: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def top_kernels(self, steps: int = 1, limit: int = 30) -> list[dict]:
        """The ``limit`` kernels with the most time: name, calls and ms per step, component."""
        rows = [{"kernel": name, "calls_per_step": calls / steps, "ms_per_step": us / steps / 1e3,
                 "component": label}
                for (name, label), (calls, us) in self.kernels.items()]
        rows.sort(key=lambda r: -r["ms_per_step"])
        return rows[:limit]

    def by_kernel(self, steps: int = 1) -> dict[str, dict[str, float]]:
        """Calls and ms per step of every kernel name, whatever label it was charged to
        (largest first): a check on the labels when launches stray across them."""
        merged: dict[str, list[float]] = {}
        for (name, _label), (calls, us) in self.kernels.items():
            entry = merged.setdefault(name, [0, 0.0])
            entry[0] += calls
            entry[1] += us
        ordered = sorted(merged.items(), key=lambda kv: -kv[1][1])
        return {name: {"calls_per_step": calls / steps, "ms_per_step": us / steps / 1e3} for name, (calls, us) in ordered}


def innermost_labels(labels: Iterable[LabelRange], launches: Iterable[Launch]) -> dict[int, str]:
    """correlation id -> name of the innermost label containing its launch (launches inside
    no label are left out). One sweep per thread over ranges and launches sorted by time."""
    by_thread: dict[int, list[LabelRange]] = defaultdict(list)
    for label in labels:
        by_thread[label.thread].append(label)
    launches_by_thread: dict[int, list[Launch]] = defaultdict(list)
    for launch in launches:
        launches_by_thread[launch.thread].append(launch)
    found: dict[int, str] = {}
    for thread, thread_launches in launches_by_thread.items():
        ranges = sorted(by_thread.get(thread, ()), key=lambda r: (r.start, -r.end))
        stack: list[LabelRange] = []
        i = 0
        for launch in sorted(thread_launches, key=lambda x: x.time):
            while i < len(ranges) and ranges[i].start <= launch.time:
                while stack and stack[-1].end < ranges[i].start:
                    stack.pop()
                stack.append(ranges[i])
                i += 1
            while stack and stack[-1].end < launch.time:
                stack.pop()
            if stack:
                found[launch.correlation_id] = stack[-1].name
    return found


def attribute_kernels(labels: Iterable[LabelRange], launches: Iterable[Launch],
                      kernels: Iterable[KernelRecord]) -> Attribution:
    """Charge every kernel to the innermost label around its launch ("unlabelled" when its
    launch is unknown or inside no label)."""
    label_of = innermost_labels(labels, launches)
    result = Attribution()
    for kernel in kernels:
        label = label_of.get(kernel.correlation_id, UNLABELLED)
        result.totals[label] = result.totals.get(label, 0.0) + kernel.duration
        entry = result.kernels.setdefault((short_kernel_name(kernel.name), label), [0, 0.0])
        entry[0] += 1
        entry[1] += kernel.duration
    return result


_INNER_NAME = re.compile(r"\b([A-Za-z_]\w*(?:Functor\w*|_kernel\w*|_cuda\w*|Op))\b")
_FIRST_NAME = re.compile(r"[<,]\s*(?:\w+::)*([A-Za-z_]\w{3,})")
_GENERIC = ("kernel", "device_kernel", "Kernel", "Kernel2")


def short_kernel_name(name: str, width: int = 80) -> str:
    """A readable kernel name: the function's unqualified name without template arguments
    or parameters, plus the functor / inner kernel it instantiates when there is one
    (``vectorized_elementwise_kernel<CUDAFunctor_add>``); a generic wrapper (cutlass's
    ``Kernel2<...>``) is named by its first template argument."""
    text = name.removeprefix("void ").strip()
    cut = min((i for i in (text.find("<"), text.find("(")) if i >= 0), default=len(text))
    base = text[:cut].split("::")[-1].strip() or text[:cut].strip()
    rest = text[cut:]
    inner = next((m.group(1) for m in _INNER_NAME.finditer(rest) if m.group(1) != base), None)
    if inner is None and base in _GENERIC and (first := _FIRST_NAME.search(rest)):
        inner = first.group(1)
    short = f"{base}<{inner}>" if inner else base
    return short[:width]


def _is_device(event) -> bool:
    return getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA and not getattr(
        event, "is_user_annotation", False)


def records_from_events(events: Iterable, label_prefix: str
                        ) -> tuple[list[LabelRange], list[Launch], list[KernelRecord]]:
    """Plain records from profiler ``FunctionEvent``s: labels named ``label_prefix...``
    (prefix removed), runtime launch calls, and device executions with their correlation ids.

    Threads are collapsed to one: the profiled region issues its work from one thread, and
    kineto's runtime events that no op links to keep a thread id numbered differently from
    the ops' (the profiler renumbers only the linked ones)."""
    labels, launches, kernels, ops = [], {}, [], {}
    for e in events:
        if _is_device(e):
            kernels.append(e)
            continue
        start, end = e.time_range.start, e.time_range.end
        if e.name.startswith(label_prefix):
            labels.append(LabelRange(e.name.removeprefix(label_prefix), 0, start, end))
        elif e.name.startswith(_LAUNCH_PREFIXES) and not e.name.startswith("cudnn"):
            launches[e.id] = Launch(e.id, 0, start)
        else:
            ops.setdefault(e.id, start)
    records = []
    for k in kernels:
        records.append(KernelRecord(k.name, k.id, k.time_range.end - k.time_range.start))
        linked = getattr(k, "linked_correlation_id", 0)
        if k.id not in launches and linked in ops:     # no runtime event: the op that launched it
            launches[k.id] = Launch(k.id, 0, ops[linked])
    return labels, list(launches.values()), records
