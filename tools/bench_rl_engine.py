#!/usr/bin/env python
"""What the engine costs inside an RL loop, side by side in one process:

1. log-probs: decode tok/s with the sampled tokens' log-probs computed and without,
   alternating repetitions (recording on, asynchronous scheduling, CUDA graphs);
2. refit: ``update_weights`` from a full state dict on the device, against the bare copy of
   the same bytes and against a rebuild (new model from the state dict + a new engine with
   graph capture);
3. ``sleep`` / ``wake_up`` (graph re-capture included) and the memory each leaves.

    python tools/bench_rl_engine.py --model olmoe-1b-7b-shape --output docs/bench/rl_engine_olmoe_1b_7b_shape_h200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import torch

from inference.engine import LLMEngine
from inference.model.gpt import allocate_model
from inference.presets import build_model, get_preset, torch_dtype
from inference.request import SamplingParams
from inference.workload import synthetic_prompts
from tools.bench_routing import add_workload_args, decode_stats, engine_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(p)
    p.add_argument("--refits", type=int, default=3)
    return p.parse_args(argv)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _allocated_gib(device: str) -> float | None:
    return torch.cuda.memory_allocated() / 2**30 if device.startswith("cuda") else None


def logprob_cost(model, args, prompts, params) -> dict:
    runs = {True: [], False: []}
    for rep in range(args.repetitions):
        for on in ((True, False) if rep % 2 == 0 else (False, True)):
            config = dataclasses.replace(engine_config(args, "gpu"), async_scheduling=True, compute_logprobs=on)
            with LLMEngine(model, config) as engine:
                engine.generate([p.prompt_token_ids for p in prompts], params, request_ids=[p.request_id for p in prompts])
                runs[on].append(decode_stats(engine.step_log.entries)["decode_tokens_per_s"])
            print(f"rep {rep} logprobs {'on ' if on else 'off'}: decode {runs[on][-1]:,.0f} tok/s", flush=True)
    on, off = statistics.median(runs[True]), statistics.median(runs[False])
    return {"decode_tokens_per_s_on": runs[True], "decode_tokens_per_s_off": runs[False],
            "median_on": on, "median_off": off, "ratio_on_vs_off": on / off}


def refit_and_rebuild(model, args, prompts, params) -> dict:
    config = dataclasses.replace(engine_config(args, "gpu"), async_scheduling=True)
    engine = LLMEngine(model, config)
    engine.generate([p.prompt_token_ids for p in prompts[:8]], params)
    new_weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
    targets = dict(model.state_dict())
    refit_s, copy_s = [], []
    for _ in range(args.refits):
        _sync(args.device)
        start = time.perf_counter()
        with torch.no_grad():
            for name, tensor in new_weights.items():
                targets[name].copy_(tensor)
        _sync(args.device)
        copy_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        engine.update_weights(new_weights.items())
        _sync(args.device)
        refit_s.append(time.perf_counter() - start)
    nbytes = sum(t.numel() * t.element_size() for t in new_weights.values())
    del targets
    new_weights = {name: t.cpu() for name, t in new_weights.items()}   # off the device: not counted below
    awake = _allocated_gib(args.device)
    start = time.perf_counter()
    engine.sleep()
    sleep_s, asleep = time.perf_counter() - start, _allocated_gib(args.device)
    start = time.perf_counter()
    engine.wake_up()
    _sync(args.device)
    wake_s = time.perf_counter() - start
    engine.close()
    gc.collect()
    _sync(args.device)
    start = time.perf_counter()
    rebuilt = allocate_model(model.config, args.device, torch_dtype(args.dtype))
    rebuilt.load_state_dict(new_weights, strict=False)   # host -> device, as from a trainer on the host
    with LLMEngine(rebuilt, config):
        _sync(args.device)
        rebuild_s = time.perf_counter() - start
    del rebuilt
    gc.collect()
    return {"weight_bytes": nbytes, "refit_s": refit_s, "copy_s": copy_s, "refit_s_median": statistics.median(refit_s),
            "copy_s_median": statistics.median(copy_s),
            "refit_overhead_s": statistics.median(refit_s) - statistics.median(copy_s),
            "rebuild_s": rebuild_s, "sleep_s": sleep_s, "wake_up_s": wake_s,
            "allocated_gib_awake": awake, "allocated_gib_asleep": asleep}


def main(argv=None) -> int:
    args = parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.cuda_graphs is None:
        args.cuda_graphs = args.device.startswith("cuda")
    config = get_preset(args.model)
    model = build_model(config, seed=args.seed, dtype=torch_dtype(args.dtype), device=args.device)
    weights_gib = _allocated_gib(args.device)
    prompts = synthetic_prompts(num_requests=args.num_requests, prompt_len=args.prompt_len,
                                vocab_size=config.vocab_size, seed=args.seed)
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    warm = argparse.Namespace(**{**vars(args), "num_requests": min(8, args.num_requests)})
    with LLMEngine(model, engine_config(warm, "gpu")) as engine:    # Triton JIT, allocator
        engine.generate([p.prompt_token_ids for p in prompts[:8]], params)
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "model": config.name, "dtype": args.dtype, "cuda_graphs": args.cuda_graphs,
              "workload": {"num_requests": args.num_requests, "prompt_len": args.prompt_len,
                           "output_len": args.output_len},
              "allocated_gib_weights": weights_gib,
              "logprobs": logprob_cost(model, args, prompts, params),
              "refit": refit_and_rebuild(model, args, prompts, params), "torch": torch.__version__}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(format_table(report))
    return 0


def format_table(report: dict) -> str:
    lp, rf = report["logprobs"], report["refit"]
    fmt_gib = lambda v: "-" if v is None else f"{v:.2f} GiB"  # noqa: E731
    rows = [f"device: {report['device']}  model: {report['model']} ({report['dtype']})",
            f"log-probs: decode {lp['median_on']:,.0f} tok/s on vs {lp['median_off']:,.0f} off -> ratio {lp['ratio_on_vs_off']:.4f}",
            f"refit of {rf['weight_bytes'] / 2**30:.2f} GiB: update_weights {rf['refit_s_median'] * 1e3:.1f} ms, bare copy "
            f"{rf['copy_s_median'] * 1e3:.1f} ms (overhead {rf['refit_overhead_s'] * 1e3:.1f} ms); rebuild "
            f"(model + engine + graph capture) {rf['rebuild_s']:.2f} s",
            f"sleep {rf['sleep_s'] * 1e3:.1f} ms -> {fmt_gib(rf['allocated_gib_asleep'])} allocated "
            f"(weights {fmt_gib(report['allocated_gib_weights'])}, awake {fmt_gib(rf['allocated_gib_awake'])}); "
            f"wake_up {rf['wake_up_s']:.2f} s"]
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
