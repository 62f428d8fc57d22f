#!/usr/bin/env python
"""What ``StepBatch.prepare`` costs per step: host-to-device copies, bytes copied, device
ops dispatched and host microseconds, for decode steps at several batch sizes and for a
mixed and a prefill step, with a StepBatch sized as the engine sizes it.

    python tools/bench_step_upload.py --device cuda --output docs/bench/step_upload_h200.json

Steps are built as the async engine builds them: a decode step's input tokens are still on
the device (a ``TokenFeed`` gathers them), its rows are padded to the decode-graph ladder
size; mixed and prefill steps are not padded. Counts come from a ``TorchDispatchMode``
around one ``prepare`` per step (an *upload* is a ``copy_`` from a CPU tensor into another
storage on the batch's device; *views* are aliasing ops, which launch nothing; *device
ops* are every other op, the uploads excluded). Host microseconds are medians over
repetitions in which the step kinds alternate (untraced); on CUDA ``gpu_us`` is the GPU
time of the step's copies and ops, measured behind a GPU sleep so that they run back to
back. The script only uses StepBatch's public API, so the same file measures any version
of it (run it from another checkout to compare). Prints a table last; writes JSON (a list
of rows) with ``--output``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from inference.graphs.decode import DEFAULT_LADDER
from inference.request import Request, SamplingParams
from inference.scheduled_step import ScheduledChunk
from inference.step_batch import StepBatch, TokenFeed

DECODE_BATCHES = (1, 16, 64, 256)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--max-step-tokens", type=int, default=8192)
    p.add_argument("--max-requests", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=40960,
                   help="sets max_blocks_per_request as the engine does (40960: Qwen3-30B-A3B's positions)")
    p.add_argument("--context", type=int, default=2048, help="tokens before each decode step's token")
    p.add_argument("--hybrid", action="store_true", help="with state slots (a hybrid model's batch)")
    p.add_argument("--repetitions", type=int, default=200)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: a CPU copy does not wait on a busy core's OpenMP worker)")
    p.add_argument("--output", type=Path)
    return p.parse_args(argv)


class _Counter(TorchDispatchMode):
    """Uploads (with their bytes), views and other ops dispatched while active."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.uploads = self.upload_bytes = self.views = self.device_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default and self._is_upload(args[0], args[1]):
            self.uploads += 1
            self.upload_bytes += args[1].numel() * args[1].element_size()
        elif func.is_view:
            self.views += 1
        else:
            self.device_ops += 1
        return func(*args, **kwargs)

    def _is_upload(self, dst: torch.Tensor, src: torch.Tensor) -> bool:
        # On a CPU batch the device-side scatter also copies CPU -> CPU, but inside one storage.
        return (src.device.type == "cpu" and dst.device.type == self.device.type
                and src.untyped_storage().data_ptr() != dst.untyped_storage().data_ptr())


def _requests(n: int, context: int, block_size: int, first_block: int, pending: bool) -> list[Request]:
    """``n`` requests of ``context`` prompt tokens (+1 output token when decoding), distinct blocks."""
    reqs = []
    blocks_each = context // block_size + 2
    for i in range(n):
        r = Request(f"r{i}", [(7 * i + j) % 30000 + 2 for j in range(context)], SamplingParams(),
                    output_token_ids=[5] if pending else [])
        r.num_pending_tokens = int(pending)
        r.block_ids = list(range(first_block + i * blocks_each, first_block + (i + 1) * blocks_each))
        reqs.append(r)
    return reqs


def build_steps(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Each step: name, chunks, token count and the keyword arguments ``prepare`` gets."""
    steps = []
    bs = args.block_size
    ladder = tuple(s for s in DEFAULT_LADDER if s < args.max_requests) + (args.max_requests,)
    for b in DECODE_BATCHES:
        reqs = _requests(b, args.context, bs, 0, pending=True)
        chunks = [ScheduledChunk(r, r.num_tokens, 1, True) for r in reqs]
        feed = TokenFeed(torch.arange(b, device=device) + 100, {r: i for i, r in enumerate(reqs)})
        padded = next(s for s in ladder if s >= b)
        steps.append(dict(name=f"decode {b}", chunks=chunks,
                          kwargs=dict(num_padded_tokens=padded, feed=feed, pad_requests=True)))
    decodes = _requests(64, args.context, bs, 0, pending=True)
    prompt = _requests(1, 1024, bs, 10 ** 6, pending=False)[0]
    mixed = [ScheduledChunk(r, r.num_tokens, 1, True) for r in decodes] + [ScheduledChunk(prompt, 0, 960, False)]
    feed = TokenFeed(torch.arange(64, device=device) + 100, {r: i for i, r in enumerate(decodes)})
    steps.append(dict(name="mixed 64+960", chunks=mixed, kwargs=dict(feed=feed, pad_requests=False)))
    per_prompt = args.max_step_tokens // 4
    prompts = _requests(4, per_prompt, bs, 0, pending=False)
    steps.append(dict(name=f"prefill 4x{per_prompt}", chunks=[ScheduledChunk(r, 0, per_prompt, True) for r in prompts],
                      kwargs=dict(pad_requests=False)))
    for step in steps:
        if args.hybrid:
            step["kwargs"]["state_slots"] = list(range(len(step["chunks"])))
        step["tokens"] = sum(c.num_tokens for c in step["chunks"])
    return steps


def make_batch(args: argparse.Namespace, device: torch.device) -> StepBatch:
    """As ``DeviceState.build`` sizes it (the dummy block past any block the steps use)."""
    return StepBatch(max_step_tokens=args.max_step_tokens, max_requests=args.max_requests,
                     max_blocks_per_request=-(-args.max_model_len // args.block_size), block_size=args.block_size,
                     dummy_block_id=2 * 10 ** 6, device=device,
                     dummy_state_slot=args.max_requests if args.hybrid else None)


def _prepare(step: dict):
    return step["batch"].prepare(step["chunks"], **step["kwargs"])


def count(step: dict, device: torch.device) -> dict:
    _prepare(step)      # once per staging slot: the block-table rows are cached from then on (steady state)
    _prepare(step)
    counter = _Counter(device)
    with counter:
        _prepare(step)
    return dict(uploads=counter.uploads, upload_bytes=counter.upload_bytes, device_ops=counter.device_ops,
                views=counter.views)


def host_times(steps: list[dict], device: torch.device, reps: int) -> dict[str, list[float]]:
    """Host microseconds per ``prepare``, the step kinds alternating (reversed every other round)."""
    times: dict[str, list[float]] = {s["name"]: [] for s in steps}
    for rep in range(reps):
        for step in (steps if rep % 2 == 0 else steps[::-1]):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            _prepare(step)
            times[step["name"]].append((time.perf_counter() - t) * 1e6)
    return times


def gpu_times(steps: list[dict], reps: int) -> dict[str, float]:
    """GPU microseconds of each step's uploads and ops, enqueued behind a sleep so that the GPU
    runs them back to back instead of at the host's pace."""
    out: dict[str, list[float]] = {s["name"]: [] for s in steps}
    for _ in range(reps):
        for step in steps:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(5_000_000)
            start.record()
            _prepare(step)
            end.record()
            end.synchronize()
            out[step["name"]].append(start.elapsed_time(end) * 1e3)
    return {k: statistics.median(v) for k, v in out.items()}


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    steps = build_steps(args, device)
    for step in steps:      # one batch per kind: its slots' block-table rows stay cached, as in a steady state
        step["batch"] = make_batch(args, device)
    with torch.inference_mode():        # as ModelRunner.launch calls prepare
        rows = [dict(step=s["name"], tokens=s["tokens"], **count(s, device)) for s in steps]
        times = host_times(steps, device, args.repetitions)
        gpu = gpu_times(steps, max(5, args.repetitions // 10)) if device.type == "cuda" else {}
    for row in rows:
        row.update(host_us=statistics.median(times[row["step"]]), device=args.device, hybrid=args.hybrid,
                   max_step_tokens=args.max_step_tokens, max_requests=args.max_requests,
                   max_blocks_per_request=-(-args.max_model_len // args.block_size))
        if row["step"] in gpu:
            row["gpu_us"] = gpu[row["step"]]
    return rows


def format_table(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = [f"device {r0['device']}  max_step_tokens {r0['max_step_tokens']}  max_requests {r0['max_requests']}  "
             f"max_blocks_per_request {r0['max_blocks_per_request']}  hybrid {r0['hybrid']}",
             f"{'step':<16} | {'tokens':>6} | {'uploads':>7} | {'bytes':>9} | {'device ops':>10} | {'views':>5} | "
             f"{'host us':>7} | {'gpu us':>6}"]
    for r in rows:
        gpu = f"{r['gpu_us']:.1f}" if "gpu_us" in r else "n/a"
        lines.append(f"{r['step']:<16} | {r['tokens']:>6} | {r['uploads']:>7} | {r['upload_bytes']:>9,} | "
                     f"{r['device_ops']:>10} | {r['views']:>5} | {r['host_us']:>7.1f} | {gpu:>6}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = run(args)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
