"""Recurrent layers: correctness of the fast paths and their speed, at the real shapes.

    python tools/bench_recurrent.py [--batch 64] [--prefill-len 2048] [--reps 20] [--output out.json]

On CUDA, for Qwen3.5-35B-A3B's Gated DeltaNet layer and Nemotron-3-Nano's Mamba2 layer
(bf16 weights and activations, fp32 states):

- ``decode``: one token for each of ``--batch`` requests. The torch step form (eager), our
  slot-indexed Triton step kernel (core only), and the whole layer replayed as a CUDA
  graph. ``state_gbps`` counts the state bytes the step must stream (read + write of every
  request's conv and recurrent state) plus the layer's weights, against the step time;
  ``floor_us`` is that traffic at ``--hbm-gbps``.
- ``prefill``: four sequences of ``--prefill-len`` tokens with initial states. The torch
  chunked form on the GPU vs fla-core's chunked kernels (when ``fla`` is importable).

``max_err`` compares each fast path with the torch form on the same device and inputs.
On CPU (or with ``--cpu``), the recurrent and chunked torch forms of one ``--cpu-len``
sequence are timed against each other (one thread). The table is printed last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.kernels import recurrent_decode, recurrent_fla  # noqa: E402
from inference.model.recurrent import GatedDeltaNet, Mamba2Mixer, RecurrentMetadata  # noqa: E402
from inference.model.recurrent.delta_rule import gated_delta_rule_chunked, gated_delta_rule_recurrent  # noqa: E402
from inference.model.recurrent.ssd import discretize_dt, ssd_chunked, ssd_recurrent  # noqa: E402
from inference.presets import get_preset  # noqa: E402
from tools.decode_profile import capture_graph, cuda_ms  # noqa: E402

LAYERS = {"qwen3.5-35b-a3b gdn": "qwen3.5-35b-a3b-shape", "nemotron-3-nano mamba2": "nemotron-3-nano-30b-a3b-shape"}


def make_layer(preset: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    config = get_preset(preset)
    layer = (GatedDeltaNet(config.hidden_size, config.gated_deltanet) if config.gated_deltanet
             else Mamba2Mixer(config.hidden_size, config.mamba2))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "A_log":
                p.copy_(torch.empty(p.shape).uniform_(0.0, 2.5, generator=gen))
            elif name.startswith("norm") or name in ("D", "dt_bias"):
                p.copy_(torch.ones(p.shape))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return layer.to(device=device, dtype=dtype).eval()


def slot_tensors(layer: torch.nn.Module, num_slots: int, dtype: torch.dtype, device: str):
    c = layer.config
    gen = torch.Generator(device=device).manual_seed(1)
    conv = torch.randn(num_slots + 1, *c.conv_state_shape, generator=gen, device=device).to(dtype) * 0.1
    rec = torch.randn(num_slots + 1, *c.recurrent_state_shape, generator=gen, device=device) * 0.1
    return conv, rec


def cuda_time_us(fn, reps: int) -> float:
    """Median per-call CUDA-event time in microseconds, after one warm-up call."""
    return statistics.median(cuda_ms(fn, reps, warmup=1)) * 1e3


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def decode_rows(name: str, preset: str, batch: int, reps: int, hbm_gbps: float) -> list[dict]:
    dev, dtype = "cuda", torch.bfloat16
    layer = make_layer(preset, dtype, dev)
    conv, rec = slot_tensors(layer, batch, dtype, dev)
    hidden = layer.in_proj.in_features
    x = torch.randn(batch, hidden, device=dev, dtype=dtype)
    meta = RecurrentMetadata.build([1] * batch, list(range(batch)), [True] * batch, device=dev)
    traffic = 2 * batch * (conv[0].nbytes + rec[0].nbytes) + sum(p.nbytes for p in layer.parameters())
    rows = []
    with torch.no_grad():
        ref_conv, ref_rec = conv.clone(), rec.clone()
        ref = layer(x, meta, ref_conv, ref_rec, mode="recurrent")
        fast_conv, fast_rec = conv.clone(), rec.clone()
        fast = layer(x, meta, fast_conv, fast_rec, mode="auto")
        err = max(max_err(fast, ref), max_err(fast_rec, ref_rec))
        for label, mode in (("layer eager torch", "recurrent"), ("layer eager auto", "auto")):
            us = cuda_time_us(lambda: layer(x, meta, conv, rec, mode=mode), reps)
            rows.append(dict(layer=name, phase="decode", impl=label, batch=batch, us=us))
        graph = capture_graph(lambda: layer(x, meta, conv, rec, mode="auto"))
        rows.append(dict(layer=name, phase="decode", impl="layer cuda graph", batch=batch,
                         us=cuda_time_us(graph.replay, reps)))
    for r in rows:
        r.update(max_err=err if r["impl"] != "layer eager torch" else 0.0,
                 state_gbps=traffic / (r["us"] * 1e3), floor_us=traffic / (hbm_gbps * 1e3))
    return rows


def prefill_rows(name: str, preset: str, length: int, reps: int) -> list[dict]:
    dev, dtype = "cuda", torch.bfloat16
    layer = make_layer(preset, dtype, dev)
    conv, rec = slot_tensors(layer, 4, dtype, dev)
    x = torch.randn(4 * length, layer.in_proj.in_features, device=dev, dtype=dtype) * 0.5
    meta = RecurrentMetadata.build([length] * 4, [0, 1, 2, 3], [True] * 4, device=dev)
    rows = []
    with torch.no_grad():
        ref_conv, ref_rec = conv.clone(), rec.clone()
        ref = layer(x, meta, ref_conv, ref_rec, mode="chunked")
        rows.append(dict(layer=name, phase="prefill", impl="torch chunked", batch=4, tokens=4 * length,
                         us=cuda_time_us(lambda: layer(x, meta, conv, rec, mode="chunked"), reps),
                         max_err=0.0))
        if recurrent_fla.fla_available():
            fast_conv, fast_rec = conv.clone(), rec.clone()
            fast = layer(x, meta, fast_conv, fast_rec, mode="auto")
            rows.append(dict(layer=name, phase="prefill", impl="fla chunked", batch=4, tokens=4 * length,
                             us=cuda_time_us(lambda: layer(x, meta, conv, rec, mode="auto"), reps),
                             max_err=max(max_err(fast, ref), max_err(fast_rec, ref_rec))))
    return rows


def cpu_rows(length: int) -> list[dict]:
    """The recurrent vs chunked torch forms of one sequence on CPU (one thread)."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k, v = r(length, 2, 64), r(length, 2, 64), r(length, 4, 64)
    g, beta = -torch.rand(length, 4, generator=gen) * 0.2, torch.rand(length, 4, generator=gen)
    x, dt = r(length, 8, 32), discretize_dt(r(length, 8), torch.zeros(8))
    a, b, c = -torch.rand(8, generator=gen), r(length, 2, 64), r(length, 2, 64)
    cases = {"gated delta rule": (lambda: gated_delta_rule_recurrent(q, k, v, g, beta),
                                  lambda: gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=64)),
             "mamba2 ssd": (lambda: ssd_recurrent(x, dt, a, b, c), lambda: ssd_chunked(x, dt, a, b, c, chunk_size=64))}
    rows = []
    for name, (recurrent, chunked) in cases.items():
        times = {}
        for label, fn in (("cpu recurrent", recurrent), ("cpu chunked", chunked)):
            start = time.perf_counter()
            out = fn()
            times[label] = ((time.perf_counter() - start) * 1e6, out)
        err = max(max_err(times["cpu chunked"][1][i], times["cpu recurrent"][1][i]) for i in (0, 1))
        for label, (us, _) in times.items():
            rows.append(dict(layer=name, phase="prefill", impl=label, batch=1, tokens=length, us=us, max_err=err))
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'layer':24} {'phase':8} {'impl':18} {'batch':>5} {'us':>10} {'max_err':>9} {'GB/s':>7} {'floor_us':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        gbps = f"{r['state_gbps']:7.0f}" if "state_gbps" in r else f"{'':7}"
        floor = f"{r['floor_us']:9.1f}" if "floor_us" in r else f"{'':9}"
        lines.append(f"{r['layer']:24} {r['phase']:8} {r['impl']:18} {r['batch']:>5} {r['us']:>10.1f} "
                     f"{r['max_err']:>9.2e} {gbps} {floor}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--cpu-len", type=int, default=512)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--hbm-gbps", type=float, default=4800.0, help="memory bandwidth for floor_us (H200: 4800)")
    p.add_argument("--cpu", action="store_true", help="only the CPU rows, even with CUDA")
    p.add_argument("--output", default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    rows = cpu_rows(args.cpu_len)
    if torch.cuda.is_available() and not args.cpu:
        print(f"device {torch.cuda.get_device_name()}, fla {'yes' if recurrent_fla.fla_available() else 'no'}, "
              f"triton {'yes' if recurrent_decode.triton_available() else 'no'}")
        for name, preset in LAYERS.items():
            rows += decode_rows(name, preset, args.batch, args.reps, args.hbm_gbps)
            rows += prefill_rows(name, preset, args.prefill_len, args.reps)
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
