#!/usr/bin/env python
"""Decode of the newer families' shapes on one GPU: the step time at full batch against its
memory-bandwidth floor, and the recording ratio (decode throughput with routing recorded
over without), record on and off alternating.

    python tools/bench_families.py --model moonlight-16b-a3b-shape --batch 64 --output out/moonlight.json

The floor counts what a decode step must read: every weight it touches (experts hit by at
least one of the batch's tokens, expected under uniform routing) and the KV it attends over:
MLA's latent rows (not expanded K/V), and for windowed layers the window only. Bandwidth is a
measured device-to-device copy. The table is printed last; ``--output`` gets the JSON.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import torch

from inference.config import EngineConfig, ModelConfig
from inference.engine import LLMEngine
from inference.presets import PRESETS, build_model, get_preset, torch_dtype
from inference.request import SamplingParams
from inference.workload import synthetic_prompts
from tools.bench_decode import copy_bandwidth


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="moonlight-16b-a3b-shape", choices=list(PRESETS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repetitions", type=int, default=2, help="runs per mode (record off / on), alternating")
    p.add_argument("--device", default="cuda", help="cpu only to smoke-test the script (no floor, no graphs)")
    p.add_argument("--output")
    return p.parse_args(argv)


def kv_bytes_read(config: ModelConfig, batch: int, context: int, elem: int) -> int:
    """KV bytes one decode step reads: per layer, per token of its visible context."""
    if config.mla is not None:
        per_layer = config.mla.cache_dim
    else:
        per_layer = 2 * config.num_kv_heads * config.head_dim
    tokens = sum(min(config.window_of(i), context) if config.window_of(i) else context
                 for i in range(config.num_layers))
    return batch * tokens * per_layer * elem


def bytes_per_decode_step(config: ModelConfig, model, batch: int, context: int, elem: int) -> dict:
    expert = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".w13", ".w2", ".b13", ".b2")))
    embed = model.embed_tokens.weight.numel()
    other = sum(p.numel() for p in model.parameters()) - expert - embed
    touched = 1.0 - (1.0 - config.topk / config.num_experts) ** batch
    weights = (other + expert * touched + batch * config.hidden_size) * elem
    kv = kv_bytes_read(config, batch, context, elem)
    return {"weights": weights, "kv": kv, "total": weights + kv, "expert_touched_fraction": touched}


def run(model, args, prompts, record: bool) -> dict:
    blocks = args.batch * -(-(args.prompt_len + args.output_len) // 16) + 8
    cuda = args.device.startswith("cuda")
    cfg = EngineConfig(block_size=16, num_kv_blocks=blocks, max_requests=args.batch, max_step_tokens=8192,
                       enable_prefix_caching=False, record_routing=record, cuda_graphs=cuda,
                       cuda_graph_max_batch=args.batch, dtype=args.dtype, device=args.device)
    engine = LLMEngine(model, cfg)
    _sync(args.device)
    start = time.perf_counter()
    results = engine.generate([p.prompt_token_ids for p in prompts], SamplingParams(max_new_tokens=args.output_len,
                                                                                  ignore_eos=True))
    wall = time.perf_counter() - start
    full = [e for e in engine.step_log.entries
            if e["decode_requests"] == len(prompts) and e["prefill_requests"] == 0]
    step_ms = statistics.median(e["step_time_ms"] for e in full)
    gpu = [e["gpu_forward_ms"] for e in full if "gpu_forward_ms" in e]
    out = {"record": record, "wall_s": wall, "decode_steps_at_batch": len(full), "median_step_ms": step_ms,
           "median_gpu_forward_ms": statistics.median(gpu) if gpu else None,
           "decode_tokens_per_s": len(prompts) / (step_ms / 1e3),
           "graph_steps": sum(e["cuda_graph"] for e in full),
           "routing_rows_ok": all(r.routing is not None and r.routing.shape[0] == args.prompt_len + args.output_len - 1
                                  for r in results) if record else None,
           "tokens": [r.output_token_ids for r in results]}
    del engine
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    args = parse_args(argv)
    config = get_preset(args.model)
    elem = torch.empty((), dtype=torch_dtype(args.dtype)).element_size()
    bandwidth = copy_bandwidth() if args.device.startswith("cuda") else float("nan")
    model = build_model(config, seed=0, dtype=torch_dtype(args.dtype), device=args.device)
    prompts = synthetic_prompts(num_requests=args.batch, prompt_len=args.prompt_len, vocab_size=config.vocab_size,
                                seed=0)
    warm = argparse.Namespace(**{**vars(args), "output_len": 4})
    run(model, warm, prompts[: min(8, args.batch)], record=True)       # Triton compiles outside timed runs
    runs = {False: [], True: []}
    for rep in range(args.repetitions):
        for record in ((False, True) if rep % 2 == 0 else (True, False)):
            r = run(model, args, prompts, record)
            runs[record].append(r)
            print(f"rep {rep} record={record}: {r['decode_tokens_per_s']:,.0f} tok/s, step {r['median_step_ms']:.2f} ms",
                  flush=True)
    need = bytes_per_decode_step(config, model, args.batch, int(args.prompt_len + args.output_len / 2), elem)
    report = build_report(args, config, bandwidth, need, runs)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(format_table(report))
    return 0


def build_report(args, config: ModelConfig, bandwidth: float, need: dict, runs: dict) -> dict:
    def med(record: bool, key: str) -> float:
        return statistics.median(r[key] for r in runs[record])

    floor_ms = need["total"] / bandwidth * 1e3
    step_on = med(True, "median_step_ms")
    tokens_same = all(a["tokens"] == b["tokens"] for a in runs[True] for b in runs[False])
    for r in runs[True] + runs[False]:
        r.pop("tokens")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    return {"device": device, "model": config.name, "dtype": args.dtype, "batch": args.batch,
            "prompt_len": args.prompt_len, "output_len": args.output_len,
            "kv_elements_per_token": config.kv_bytes_per_token, "copy_bandwidth_gb_s": bandwidth / 1e9,
            "bytes_per_step": need, "floor_step_ms": floor_ms, "measured_step_ms_record_on": step_on,
            "measured_step_ms_record_off": med(False, "median_step_ms"),
            "gpu_forward_ms_record_on": med(True, "median_gpu_forward_ms") if runs[True][0]["median_gpu_forward_ms"] else None,
            "ratio_to_floor": step_on / floor_ms,
            "recording_ratio": med(True, "decode_tokens_per_s") / med(False, "decode_tokens_per_s"),
            "tokens_identical_record_on_off": tokens_same, "runs": {"on": runs[True], "off": runs[False]}}


def format_table(r: dict) -> str:
    gpu = r["gpu_forward_ms_record_on"]
    rows = [("copy bandwidth (GB/s, read+write)", f"{r['copy_bandwidth_gb_s']:,.0f}"),
            ("bytes per decode step (GB)", f"{r['bytes_per_step']['total'] / 1e9:.2f}"),
            ("  of which KV (GB)", f"{r['bytes_per_step']['kv'] / 1e9:.3f}"),
            ("bandwidth floor step (ms)", f"{r['floor_step_ms']:.2f}"),
            ("decode step, record on (ms, median)", f"{r['measured_step_ms_record_on']:.2f}"),
            ("decode step, record off (ms, median)", f"{r['measured_step_ms_record_off']:.2f}"),
            ("GPU time of the decode graph (ms)", f"{gpu:.2f}" if gpu else "n/a"),
            ("measured / floor (target <= 2)", f"{r['ratio_to_floor']:.2f}"),
            ("recording ratio on/off (target >= 0.995)", f"{r['recording_ratio']:.4f}"),
            ("tokens identical, record on vs off", str(r["tokens_identical_record_on_off"]))]
    head = (f"device: {r['device']}  model: {r['model']} ({r['dtype']})  batch {r['batch']}, "
            f"context {r['prompt_len']}+{r['output_len']}")
    return "\n".join([head] + [f"{k:<42} | {v:>12}" for k, v in rows])


if __name__ == "__main__":
    sys.exit(main())
