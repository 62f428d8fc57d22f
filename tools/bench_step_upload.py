#!/usr/bin/env python
"""What ``StepBatch.prepare`` costs per step: host-to-device copies, bytes copied, device
ops dispatched and host / GPU microseconds, for decode steps at several batch sizes and for a
mixed and a prefill step, with a StepBatch sized as the engine sizes it; side by side with
the per-tensor uploads it replaced (one copy per field of the rows the step uses).

    python tools/bench_step_upload.py --device cuda --output docs/bench/step_upload_h200.json

Steps are built as the async engine builds them: a decode step's input tokens are still on
the device (a ``TokenFeed`` gathers them) and its rows are padded to the decode-graph ladder
size; mixed and prefill steps are not padded. Counts come from a ``TorchDispatchMode``
around one ``prepare`` (an *upload* is a ``copy_`` from a CPU tensor into another storage on
the batch's device; *views* are aliasing ops, which launch nothing; *device ops* are every
other op). Host microseconds are medians over repetitions in which the step kinds
alternate: ``prepare_us`` the whole call, ``upload_us`` its "upload" lap (copies, unpack,
token feed). On CUDA ``gpu_us`` is the GPU time of the step's copies and ops, enqueued
behind a GPU sleep so that they run back to back. The ``per_tensor`` columns replay the
replaced scheme's copies (separate pinned staging and device tensors, one non-blocking copy
per field: the counts of the old ``rows`` dict, taken from the prepared step) with the same
token feed. Prints a table last; writes JSON (a list of rows) with ``--output``.
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
from routing_replay.phase_timer import PhaseTimer

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
    p.add_argument("--min-bytes-saved-per-op", type=int, default=None,
                   help="StepBatch's threshold for a second / third unpack op (default: the library's)")
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
    extra = {} if args.min_bytes_saved_per_op is None else dict(min_bytes_saved_per_op=args.min_bytes_saved_per_op)
    return StepBatch(max_step_tokens=args.max_step_tokens, max_requests=args.max_requests,
                     max_blocks_per_request=-(-args.max_model_len // args.block_size), block_size=args.block_size,
                     dummy_block_id=2 * 10 ** 6, device=device,
                     dummy_state_slot=args.max_requests if args.hybrid else None, **extra)


class PerTensorUploads:
    """The replaced scheme, for comparison: per field a pinned staging tensor and a device
    tensor of its own, one non-blocking copy per field of the rows a step uses, an event
    behind them, then the token feed. Its copies carry the same bytes the old code did."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        t, r = args.max_step_tokens, args.max_requests
        shapes = {name: ((t,), torch.int64) for name in ("input_ids", "positions", "token_to_block", "token_to_offset",
                                                          "slot_mapping")}
        shapes.update(block_tables=((r, -(-args.max_model_len // args.block_size)), torch.int32),
                      query_start_loc=((r + 1,), torch.int32), seq_lens=((r,), torch.int32),
                      logits_indices=((r,), torch.int64), feed_rows=((r,), torch.int64),
                      feed_sources=((r,), torch.int64))
        if args.hybrid:
            shapes.update(state_slots=((r,), torch.int64), has_initial_state=((r,), torch.bool))
        self.device = device
        self.dev = {k: torch.zeros(s, dtype=d, device=device) for k, (s, d) in shapes.items()}
        self.host = {k: torch.zeros(s, dtype=d, pin_memory=device.type == "cuda") for k, (s, d) in shapes.items()}

    @staticmethod
    def rows(step: dict, prepared) -> dict[str, int]:
        """The old ``rows`` dict of ``step`` (token fields: the padded token rows)."""
        reqs, fed = len(prepared.attn.seq_lens), sum(c.input_pending for c in step["chunks"])
        rows = dict(block_tables=reqs, query_start_loc=reqs + 1, seq_lens=reqs,
                    logits_indices=len(prepared.logits_indices), feed_rows=fed, feed_sources=fed, state_slots=reqs,
                    has_initial_state=reqs)
        tokens = ("input_ids", "positions", "token_to_block", "token_to_offset", "slot_mapping")
        return {name: rows.get(name, prepared.num_padded_tokens) for name in (*tokens, *rows)}

    def upload(self, step: dict) -> None:
        cuda = self.device.type == "cuda"
        for name, count in step["per_tensor_rows"].items():
            if count and name in self.dev:
                self.dev[name][:count].copy_(self.host[name][:count], non_blocking=cuda)
        if cuda:
            torch.cuda.Event().record()
        fed = step["per_tensor_rows"]["feed_rows"]
        if fed:
            d = self.dev
            d["input_ids"].index_copy_(0, d["feed_rows"][:fed], step["kwargs"]["feed"].tokens.index_select(
                0, d["feed_sources"][:fed]))


def _prepare(step: dict, timer: PhaseTimer | None = None):
    return step["batch"].prepare(step["chunks"], timer=timer, **step["kwargs"])


def _scheme_call(step: dict, scheme: str):
    return (lambda: _prepare(step)) if scheme == "new" else (lambda: step["per_tensor"].upload(step))


def count(step: dict, scheme: str, device: torch.device) -> dict:
    call = _scheme_call(step, scheme)
    call()      # once per staging slot: the block-table rows are cached from then on (steady state)
    call()
    counter = _Counter(device)
    with counter:
        call()
    return dict(uploads=counter.uploads, upload_bytes=counter.upload_bytes, device_ops=counter.device_ops,
                views=counter.views)


def host_times(steps: list[dict], device: torch.device, reps: int) -> dict[tuple[str, str], list[float]]:
    """Host microseconds per (step, what): ``prepare`` and its upload lap, and the per-tensor
    uploads; the step kinds alternate (reversed every other round)."""
    times: dict[tuple[str, str], list[float]] = {}
    for rep in range(reps):
        for step in (steps if rep % 2 == 0 else steps[::-1]):
            name = step["name"]
            if device.type == "cuda":
                torch.cuda.synchronize()
            timer = PhaseTimer()
            t = time.perf_counter()
            _prepare(step, timer)
            times.setdefault((name, "prepare_us"), []).append((time.perf_counter() - t) * 1e6)
            times.setdefault((name, "upload_us"), []).append(timer.sub_ms("stage_prepare", "upload") * 1e3)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step["per_tensor"].upload(step)
            times.setdefault((name, "per_tensor_upload_us"), []).append((time.perf_counter() - t) * 1e6)
    return times


def gpu_times(steps: list[dict], reps: int) -> dict[tuple[str, str], float]:
    """GPU microseconds of each step's uploads and ops (both schemes), enqueued behind a sleep
    so that the GPU runs them back to back instead of at the host's pace."""
    out: dict[tuple[str, str], list[float]] = {}
    for _ in range(reps):
        for step in steps:
            for scheme, key in (("new", "gpu_us"), ("per_tensor", "per_tensor_gpu_us")):
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda._sleep(5_000_000)
                start.record()
                _scheme_call(step, scheme)()
                end.record()
                end.synchronize()
                out.setdefault((step["name"], key), []).append(start.elapsed_time(end) * 1e3)
    return {k: statistics.median(v) for k, v in out.items()}


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    steps = build_steps(args, device)
    with torch.inference_mode():        # as ModelRunner.launch calls prepare
        for step in steps:      # one batch per kind: its slots' block-table rows stay cached, as in a steady state
            step["batch"] = make_batch(args, device)
            step["per_tensor"] = PerTensorUploads(args, device)
            step["per_tensor_rows"] = PerTensorUploads.rows(step, _prepare(step))
        rows = []
        for s in steps:
            row = dict(step=s["name"], tokens=s["tokens"], **count(s, "new", device))
            row.update({f"per_tensor_{k}": v for k, v in count(s, "per_tensor", device).items() if k != "views"})
            rows.append(row)
        times = host_times(steps, device, args.repetitions)
        gpu = gpu_times(steps, max(5, args.repetitions // 10)) if device.type == "cuda" else {}
    for row in rows:
        row.update({key: statistics.median(v) for (name, key), v in times.items() if name == row["step"]})
        row.update({key: v for (name, key), v in gpu.items() if name == row["step"]})
        row.update(device=args.device, hybrid=args.hybrid, max_step_tokens=args.max_step_tokens,
                   max_requests=args.max_requests, max_blocks_per_request=-(-args.max_model_len // args.block_size))
    return rows


def format_table(rows: list[dict]) -> str:
    r0 = rows[0]
    f = lambda r, key: f"{r[key]:.1f}" if key in r else "n/a"   # noqa: E731
    lines = [f"device {r0['device']}  max_step_tokens {r0['max_step_tokens']}  max_requests {r0['max_requests']}  "
             f"max_blocks_per_request {r0['max_blocks_per_request']}  hybrid {r0['hybrid']}   (per-tensor -> packed)",
             f"{'step':<16} | {'tokens':>6} | {'copies':>7} | {'bytes copied':>21} | {'device ops':>10} | "
             f"{'upload host us':>14} | {'prepare us':>10} | {'GPU us':>13}"]
    for r in rows:
        lines.append(
            f"{r['step']:<16} | {r['tokens']:>6} | {r['per_tensor_uploads']:>2} -> {r['uploads']:<2} | "
            f"{r['per_tensor_upload_bytes']:>9,} -> {r['upload_bytes']:<9,} | "
            f"{r['per_tensor_device_ops']:>3} -> {r['device_ops']:<3} | "
            f"{f(r, 'per_tensor_upload_us'):>5} -> {f(r, 'upload_us'):<5} | {f(r, 'prepare_us'):>10} | "
            f"{f(r, 'per_tensor_gpu_us'):>5} -> {f(r, 'gpu_us'):<5}")
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
