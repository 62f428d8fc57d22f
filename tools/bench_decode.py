#!/usr/bin/env python
"""Decode speed against two yardsticks, on one GPU:

1. the memory-bandwidth floor: bytes a decode step must read (weights it touches plus the
   KV cache it attends over) divided by a measured device-to-device copy bandwidth;
2. HF transformers ``generate`` on the same model shape and the same weights (loaded from
   a checkpoint that transformers itself saved), at the same batch.

    python tools/bench_decode.py --model olmoe-1b-7b-shape --batch 64 --output docs/bench/decode.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
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
from routing_replay import step_kind


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="olmoe-1b-7b-shape", choices=list(PRESETS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True, help="compare with HF generate")
    p.add_argument("--hf-output-len", type=int, default=32, help="HF generate is slow: fewer tokens")
    p.add_argument("--output")
    return p.parse_args(argv)


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def bytes_per_decode_step(config: ModelConfig, model, batch: int, context: int, elem: int) -> dict:
    """Weights a decode step of ``batch`` tokens touches, plus the KV it reads."""
    expert_params = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".w13", ".w2")))
    embed = model.embed_tokens.weight.numel()
    other = sum(p.numel() for p in model.parameters()) - expert_params - embed
    touched_fraction = 1.0 - (1.0 - config.topk / config.num_experts) ** batch
    weights = (other + expert_params * touched_fraction + batch * config.hidden_size) * elem
    kv = batch * context * config.kv_bytes_per_token * elem
    return {"weights": weights, "kv": kv, "total": weights + kv, "expert_touched_fraction": touched_fraction}


def engine_decode(model, args, prompts) -> dict:
    blocks = args.batch * -(-(args.prompt_len + args.output_len) // 16) + 8
    cfg = EngineConfig(block_size=16, num_kv_blocks=blocks, max_requests=args.batch, max_step_tokens=8192,
                       enable_prefix_caching=False, record_routing=True, cuda_graphs=True,
                       cuda_graph_max_batch=args.batch, dtype=args.dtype, device="cuda")
    engine = LLMEngine(model, cfg)
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    results = engine.generate([p.prompt_token_ids for p in prompts], params)
    wall = time.perf_counter() - start
    full = [e for e in engine.step_log.entries if step_kind(e) == "decode" and e["decode_requests"] == len(prompts)]
    step_ms = statistics.median(e["step_time_ms"] for e in full)
    gpu = [e["gpu_forward_ms"] for e in full if "gpu_forward_ms" in e]
    out = {"wall_s": wall, "median_decode_step_ms_at_batch": step_ms,
           "median_gpu_forward_ms_at_batch": statistics.median(gpu) if gpu else None,
           "decode_tokens_per_s_at_batch": len(prompts) / (step_ms / 1e3),
           "generated_tokens_per_s_wall": sum(len(r.output_token_ids) for r in results) / wall,
           "tokens": [r.output_token_ids for r in results]}
    del engine
    torch.cuda.empty_cache()
    return out


def hf_generate(config: ModelConfig, args, prompts, workdir: Path) -> dict:
    """Save HF weights with transformers, load them into our engine's model, and time HF
    generate on the same checkpoint."""
    import transformers

    from inference.hf_loader import load_hf_model
    from tools.hf_shapes import hf_config_for
    hf_config = hf_config_for(config)
    with torch.device("cuda"):
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype(args.dtype))
    hf_model.eval()
    hf_model.save_pretrained(workdir / "hf")
    ours = load_hf_model(workdir / "hf", device="cuda", dtype=torch_dtype(args.dtype))
    ids = torch.tensor([p.prompt_token_ids for p in prompts], device="cuda")
    n = args.hf_output_len
    with torch.no_grad():
        hf_model.generate(ids[:, :16], max_new_tokens=2, min_new_tokens=2, do_sample=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = hf_model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                attention_mask=torch.ones_like(ids))
        torch.cuda.synchronize()
        hf_wall = time.perf_counter() - start
    hf_tokens = out[:, ids.shape[1]:].tolist()
    del hf_model
    torch.cuda.empty_cache()
    sub = argparse.Namespace(**{**vars(args), "output_len": n})
    ours_run = engine_decode(ours, sub, prompts)
    agree = statistics.fmean(sum(a == b for a, b in zip(x, y)) / n for x, y in zip(hf_tokens, ours_run["tokens"]))
    return {"hf_wall_s": hf_wall, "hf_generated_tokens_per_s": args.batch * n / hf_wall,
            "engine_wall_s": ours_run["wall_s"], "engine_generated_tokens_per_s": ours_run["generated_tokens_per_s_wall"],
            "speedup_vs_hf": ours_run["generated_tokens_per_s_wall"] / (args.batch * n / hf_wall),
            "greedy_token_agreement": agree, "output_len": n, "transformers": transformers.__version__}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench_decode.py needs a CUDA GPU (exit status 2: nothing measured)", file=sys.stderr)
        return 2
    config = get_preset(args.model)
    dtype = torch_dtype(args.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    bandwidth = copy_bandwidth()
    model = build_model(config, seed=0, dtype=dtype, device="cuda")
    prompts = synthetic_prompts(num_requests=args.batch, prompt_len=args.prompt_len, vocab_size=config.vocab_size, seed=0)
    engine_decode(model, argparse.Namespace(**{**vars(args), "output_len": 4}), prompts[:8] if args.batch >= 8 else prompts)
    run = engine_decode(model, args, prompts)
    mean_context = args.prompt_len + args.output_len / 2
    need = bytes_per_decode_step(config, model, args.batch, int(mean_context), elem)
    floor_ms = need["total"] / bandwidth * 1e3
    report = {"device": torch.cuda.get_device_name(), "model": config.name, "dtype": args.dtype, "batch": args.batch,
              "prompt_len": args.prompt_len, "output_len": args.output_len,
              "copy_bandwidth_gb_s": bandwidth / 1e9, "bytes_per_step": need, "floor_step_ms": floor_ms,
              "measured_step_ms": run["median_decode_step_ms_at_batch"],
              "measured_gpu_forward_ms": run["median_gpu_forward_ms_at_batch"],
              "ratio_to_floor": run["median_decode_step_ms_at_batch"] / floor_ms,
              "decode_tokens_per_s": run["decode_tokens_per_s_at_batch"]}
    del model
    torch.cuda.empty_cache()
    if args.hf:
        with tempfile.TemporaryDirectory() as tmp:
            report["hf"] = hf_generate_safe(config, args, prompts, Path(tmp))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(format_table(report))
    return 0


def hf_generate_safe(config: ModelConfig, args, prompts, workdir: Path) -> dict:
    try:
        return hf_generate(config, args, prompts, workdir)
    except Exception as exc:  # report it; the floor measurement above still stands
        return {"error": f"{type(exc).__name__}: {exc}"}


def format_table(r: dict) -> str:
    lines = [f"device: {r['device']}  model: {r['model']} ({r['dtype']})  batch {r['batch']}, "
             f"context {r['prompt_len']}+{r['output_len']}",
             f"{'measure':<40} | {'value':>14}",
             f"{'copy bandwidth (GB/s, read+write)':<40} | {r['copy_bandwidth_gb_s']:>14,.0f}",
             f"{'bytes per decode step (GB)':<40} | {r['bytes_per_step']['total'] / 1e9:>14.2f}",
             f"{'bandwidth floor step (ms)':<40} | {r['floor_step_ms']:>14.2f}",
             f"{'measured decode step (ms, median)':<40} | {r['measured_step_ms']:>14.2f}",
             f"{'GPU time of the decode graph (ms)':<40} | {r['measured_gpu_forward_ms'] or float('nan'):>14.2f}",
             f"{'measured / floor':<40} | {r['ratio_to_floor']:>14.2f}"]
    hf = r.get("hf")
    if hf and "error" not in hf:
        lines += [f"{'HF generate tok/s':<40} | {hf['hf_generated_tokens_per_s']:>14,.1f}",
                  f"{'engine tok/s (same batch, wall)':<40} | {hf['engine_generated_tokens_per_s']:>14,.1f}",
                  f"{'speedup vs HF':<40} | {hf['speedup_vs_hf']:>14.1f}",
                  f"{'greedy token agreement with HF':<40} | {hf['greedy_token_agreement']:>14.3f}"]
    elif hf:
        lines.append(f"HF comparison failed: {hf['error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
