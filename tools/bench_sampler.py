"""Sampler cost per step: the fused kernel, the batched torch ops and the per-request loop
they replaced.

For each batch size, vocabulary and sampling workload it reports the device ops one step's
sampling dispatches (views excluded; on CUDA each is a kernel launch costing host time),
the host time to enqueue them, and the device time (CUDA events; on CPU the same as the
host time). The two variants alternate within every repetition; medians are reported.

``fused`` is ``Sampler(kernel=True)`` (inference/kernels/sample_triton.py; CUDA only, and a
batch asking top-N alternatives still takes the torch ops), ``batched`` is
``Sampler(kernel=False)``. The per-request baseline is the algorithm of the sampler before the batched one
(``inference/sampler.py`` up to commit 46f6a98): one ``torch.Generator`` per request and
about ten ops per sampled row. It lives here only as the comparison point.

    python tools/bench_sampler.py --device cuda --output docs/bench/sampler_h200.json
    OMP_NUM_THREADS=1 python tools/bench_sampler.py --device cpu --vocab 32768 --batches 1,16,64 \\
        --output docs/bench/sampler_cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import orjson
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.kernels.sample_triton import fused_sample_available
from inference.request import Request, SamplingParams
from inference.sampling import Sampler, request_seed
from tools.op_count import DeviceOpCounter

WORKLOADS = {
    "greedy": dict(),
    "temperature": dict(temperature=1.0),
    "top-p": dict(temperature=1.0, top_p=0.95),
    "top-k+top-p": dict(temperature=0.8, top_k=50, top_p=0.9),
    "top-k+top-5": dict(temperature=0.8, top_k=50, logprobs=5),
}


class PerRequestSampler:
    """The replaced algorithm: a generator per request, a filter and a multinomial per row."""

    def __init__(self, engine_seed: int, device: torch.device) -> None:
        self.engine_seed, self.device, self.generators = engine_seed, device, {}

    def sample(self, logits: torch.Tensor, requests: list[Request], positions: list[int]) -> torch.Tensor:
        greedy = logits.argmax(dim=-1)
        if all(r.sampling_params.is_greedy for r in requests) and not any(r.sampling_params.logprobs for r in requests):
            return greedy, logits.gather(1, greedy[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        tokens, dist = greedy.clone(), torch.log_softmax(logits, dim=-1)
        for i, req in enumerate(requests):
            p = req.sampling_params
            if p.is_greedy:
                continue
            processed = torch.log_softmax(_filtered_row(logits[i], p.temperature, p.top_k, p.top_p), -1)
            tokens[i:i + 1] = torch.multinomial(processed.exp(), 1, generator=self._generator(req))
            dist[i] = processed
        out = dist.gather(1, tokens[:, None])[:, 0]
        top_n = max(r.sampling_params.logprobs for r in requests)
        return (tokens, out, dist.topk(top_n, dim=-1)) if top_n else (tokens, out)

    def _generator(self, req: Request) -> torch.Generator:
        if req not in self.generators:
            seed = request_seed(req, self.engine_seed)
            self.generators[req] = torch.Generator(device=self.device).manual_seed(seed)
        return self.generators[req]


def _filtered_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    scaled = logits / temperature
    if 0 < top_k < scaled.shape[-1]:
        scaled = scaled.masked_fill(scaled < torch.topk(scaled, top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        sorted_probs, order = torch.sort(torch.softmax(scaled, dim=-1), descending=True)
        drop = torch.zeros_like(sorted_probs, dtype=torch.bool).scatter_(-1, order, sorted_probs.cumsum(-1) - sorted_probs > top_p)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vocab", default="50304,151936", help="comma-separated vocabulary sizes")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--logits", default="peaked", choices=sorted(LOGITS),
                   help="peaked: 16 tokens ~15 nats above a N(0, 2) bulk (an LM-like row, small nucleus); "
                        "gaussian: N(0, 3) (flat: the 0.95-nucleus holds thousands of tokens)")
    p.add_argument("--repetitions", type=int, default=7)
    p.add_argument("--output", type=Path, default=None)
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: torch.device) -> tuple[float, float]:
    """(host ms to return, device ms from start to the work's end) of one call."""
    _sync(device)
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t) * 1e3
        return ms, ms
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t = time.perf_counter()
    fn()
    host = (time.perf_counter() - t) * 1e3
    end.record()
    end.synchronize()
    return host, start.elapsed_time(end)


def _caller(sampler, logits: torch.Tensor, requests: list[Request]):
    """One step's sampling per call, each call at the next position (fresh draws)."""
    positions = itertools.count(1)

    def call():
        position = next(positions)
        return sampler.sample(logits, requests, [position] * len(requests))
    return call


def _peaked(batch: int, vocab: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    logits = torch.randn(batch, vocab, generator=gen, device=device) * 2.0
    top = torch.randint(0, vocab, (batch, 16), generator=gen, device=device)
    return logits.scatter_add_(1, top, 15.0 + 2.0 * torch.randn(batch, 16, generator=gen, device=device))


LOGITS = {"peaked": _peaked,
          "gaussian": lambda batch, vocab, gen, device: torch.randn(batch, vocab, generator=gen, device=device) * 3.0}


def measure(device: torch.device, batch: int, vocab: int, workload: str, reps: int, logits_kind: str = "peaked") -> dict:
    params = SamplingParams(seed=None, **WORKLOADS[workload])
    requests = [Request(request_id=str(i), prompt_token_ids=[1], sampling_params=params, arrival_index=i)
                for i in range(batch)]
    gen = torch.Generator(device=device).manual_seed(batch + vocab)
    logits = LOGITS[logits_kind](batch, vocab, gen, device)
    variants = {"batched": Sampler(0, device, kernel=False), "per-request": PerRequestSampler(0, device)}
    if device.type == "cuda" and fused_sample_available():
        variants = {"fused": Sampler(0, device, kernel=True), **variants}
    calls = {name: _caller(sampler, logits, requests) for name, sampler in variants.items()}
    row = {"batch": batch, "vocab": vocab, "workload": workload, "logits": logits_kind}
    for name, call in calls.items():          # warm-up and op counts
        call()
        with DeviceOpCounter() as ops:
            call()
        row[f"{name}_ops"] = ops.total
    samples = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():      # alternated
            samples[name].append(time_call(call, device))
    for name, values in samples.items():
        row[f"{name}_host_ms"] = statistics.median(h for h, _ in values)
        row[f"{name}_device_ms"] = statistics.median(d for _, d in values)
    row["speedup_device"] = row["per-request_device_ms"] / row["batched_device_ms"]
    if "fused_device_ms" in row:
        row["fused_speedup_device"] = row["batched_device_ms"] / row["fused_device_ms"]
        row["fused_speedup_host"] = row["batched_host_ms"] / row["fused_host_ms"]
    return row


def format_table(rows: list[dict]) -> str:
    names = [n for n in ("fused", "batched", "per-request") if rows and f"{n}_ops" in rows[0]]
    joined = " / ".join(names)
    head = (f"| batch | vocab | workload | ops {joined} | host ms {joined} | device ms {joined} "
            "| batched vs per-request |" + (" fused vs batched (device, host) |" if "fused" in names else ""))
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        ops = " / ".join(str(r[f"{n}_ops"]) for n in names)
        host = " / ".join(f"{r[f'{n}_host_ms']:.3f}" for n in names)
        dev = " / ".join(f"{r[f'{n}_device_ms']:.3f}" for n in names)
        line = f"| {r['batch']} | {r['vocab']} | {r['workload']} | {ops} | {host} | {dev} | {r['speedup_device']:.2f}x |"
        if "fused" in names:
            line += f" {r['fused_speedup_device']:.2f}x, {r['fused_speedup_host']:.2f}x |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    workloads = args.workloads.split(",")
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; known: {sorted(WORKLOADS)}")
    rows = []
    with torch.inference_mode():
        for vocab in (int(v) for v in args.vocab.split(",")):
            for batch in (int(b) for b in args.batches.split(",")):
                for workload in workloads:
                    rows.append(measure(device, batch, vocab, workload, args.repetitions, args.logits))
                    print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "repetitions": args.repetitions,
              "command": " ".join(sys.argv), "results": rows}
    print(format_table(rows))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
