#!/usr/bin/env python
"""Decode and prefill speed against hardware floors, on one GPU:

1. decode step (CUDA graphs, recording on) per batch vs the memory-bandwidth floor (bytes
   the step must read: weights it touches plus its KV, over the measured copy bandwidth);
2. a component breakdown of the decode step (tools/decode_profile.py), each component
   against its own bytes floor, plus the graph's launch gaps; ``--timeline-batches``: 16
   real engine steps under the profiler, the GPU's busy and idle time per step (time it
   waits on the host), copies and the largest gaps (tools/decode_timeline.py);
3. prefill tokens/s on 8k-token steps vs the FLOP floor (2 x active parameters x tokens at
   the measured bf16 matmul rate); ``--profile-prefill`` adds one more 8k step's component
   breakdown, the matmul components against their own FLOP floors;
4. optionally the same decode batches with another MoE backend (before/after), or with
   the fused small ops (router, q/k norm + rotary, residual add + norm) in another mode
   (``--compare-small-ops off``: before/after at every batch, breakdowns included; the
   pseudo-mode ``no-kv-write`` keeps the main run's small ops but writes K/V with
   ``write_kv`` instead of the fused norm + rotary kernel), and HF transformers
   ``generate`` at batch 64 on the same weights.

    python tools/bench_decode.py --output-dir docs/bench            # everything (long)
    python tools/bench_decode.py --quick --output-dir OUT           # ~2-3 min on an H200

``--quick``: both model shapes, batches 1/64/256, 32 new tokens, breakdown at 64 and 256,
prefill on 3 steps of 8192 tokens, grouped_mm comparison at 64 and 256, no HF. Writes
``decode_<model>_<gpu>.json`` per model after every stage (a run cut short keeps its results).
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

from inference.config import FUSED_SMALL_OPS_MODES, MOE_BACKENDS, EngineConfig
from inference.engine import LLMEngine
from inference.kernels import choose_moe_backend
from inference.presets import build_model, get_preset, torch_dtype
from inference.request import SamplingParams
from inference.workload import synthetic_prompts
from routing_replay import step_kind
from routing_replay.step_details import ENGINE_STAGES
from tools import decode_profile as dp
from tools.decode_profile import copy_bandwidth  # noqa: F401  (tools/bench_families.py imports it from here)
from tools.decode_tables import format_tables
from tools.decode_timeline import decode_timeline

MODELS = ("olmoe-1b-7b-shape", "qwen3-30b-a3b-shape")
HYBRID_MODELS = ("qwen3.5-35b-a3b-shape", "nemotron-3-nano-30b-a3b-shape")   # tools/gpu_recurrent.sh
PREFILL_STEP_TOKENS = 8192
# --sampling: what the decode requests ask for (RL rollouts sample at temperature 1).
SAMPLING = {"greedy": {}, "temperature": {"temperature": 1.0}, "top-p": {"temperature": 1.0, "top_p": 0.95}}
NO_KV_WRITE = "no-kv-write"     # --compare-small-ops: the main run's mode with EngineConfig.fused_kv_write off
MHA_DOT = "mha-dot"             # --compare-small-ops: the main run's mode with EngineConfig.decode_attention_mha_dot
TORCH_SAMPLER = "torch-sampler"  # --compare-small-ops: the main run's mode with EngineConfig.sampler_kernel off
PSEUDO_MODES = (NO_KV_WRITE, MHA_DOT, TORCH_SAMPLER)   # keep the main run's fused_small_ops mode


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    ints = lambda s: [int(x) for x in csv(s)]  # noqa: E731
    p.add_argument("--models", "--model", type=csv, default=list(MODELS))
    p.add_argument("--batches", "--batch", type=ints, default=[1, 16, 64, 256])
    p.add_argument("--profile-batches", type=ints, default=None, help="component breakdown at these (default: all)")
    p.add_argument("--profile-prefill", action="store_true",
                   help="component breakdown of one more 8k prefill step, against each matmul component's FLOP floor")
    p.add_argument("--timeline-batches", type=ints, default=[],
                   help="profile 16 real engine steps at these batches: GPU busy / idle per step, copies, "
                        "largest idle gaps (tools/decode_timeline.py)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--sampling", default="greedy", choices=list(SAMPLING), help="the decode requests' sampling")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prefill-requests", type=int, default=16, help="prompts of --prefill-prompt-len, 4 per 8k step")
    p.add_argument("--prefill-prompt-len", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--moe-backend", default="auto", choices=MOE_BACKENDS)
    p.add_argument("--compare-backends", type=csv, default=["grouped_mm"], help="decode again with these")
    p.add_argument("--compare-batches", type=ints, default=[64, 256])
    p.add_argument("--fused-small-ops", default="auto", choices=FUSED_SMALL_OPS_MODES,
                   help="EngineConfig.fused_small_ops of the main run")
    p.add_argument("--compare-small-ops", type=csv, default=[],
                   help=f"decode every batch again with fused_small_ops in these modes (e.g. off), or "
                        f"{NO_KV_WRITE}: the main run's mode without the fused KV write, or {MHA_DOT}: with MHA "
                        f"decode attention on the kernel's tl.dot path, or {TORCH_SAMPLER}: sampling with the torch ops")
    p.add_argument("--small-moe-max-tokens", type=int, default=None, metavar="N",
                   help="EngineConfig.fused_moe_small_batch_max_tokens: the fused MoE small-batch path up to N "
                        "tokens (0: off; default: the tuned crossover)")
    p.add_argument("--skinny-linear-max-tokens", type=int, default=0, metavar="N",
                   help="EngineConfig.skinny_linear_max_tokens: the attention projections as the skinny GEMM kernel "
                        "in steps of up to N tokens (0: off, cuBLAS)")
    p.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True, help="compare with HF generate")
    p.add_argument("--hf-models", type=csv, default=["olmoe-1b-7b-shape"], help="HF is slow: OLMoE only by default")
    p.add_argument("--hf-batch", type=int, default=64)
    p.add_argument("--hf-output-len", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="the subset described above")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; later stages are skipped past it")
    p.add_argument("--output-dir", type=Path, default=None, help="decode_<model>_<gpu>.json per model here")
    p.add_argument("--output", type=Path, default=None, help="one model: its report to this file instead")
    args = p.parse_args(argv)
    if args.output is not None and len(args.models) != 1:
        raise SystemExit("--output takes one model; use --output-dir for several")
    if args.quick:
        args.batches, args.output_len, args.profile_batches = [1, 64, 256], 32, [64, 256]
        args.prefill_requests, args.hf = 12, False
    if args.profile_batches is None:
        args.profile_batches = list(args.batches)
    for name in args.models:
        get_preset(name)
    for backend in args.compare_backends:
        if backend not in MOE_BACKENDS:
            raise SystemExit(f"--compare-backends: {backend!r} is not one of {MOE_BACKENDS}")
    for mode in args.compare_small_ops:
        if mode not in (*FUSED_SMALL_OPS_MODES, *PSEUDO_MODES):
            raise SystemExit(f"--compare-small-ops: {mode!r} is not one of {(*FUSED_SMALL_OPS_MODES, *PSEUDO_MODES)}")
    if args.small_moe_max_tokens is not None and args.small_moe_max_tokens < 0:
        raise SystemExit(f"--small-moe-max-tokens must be >= 0 (0: off), got {args.small_moe_max_tokens}")
    if args.skinny_linear_max_tokens < 0:
        raise SystemExit(f"--skinny-linear-max-tokens must be >= 0 (0: off), got {args.skinny_linear_max_tokens}")
    return args


class Budget:
    """Wall-clock budget shared by the stages; a stage past it is recorded as skipped."""

    def __init__(self, seconds: float | None) -> None:
        self.start, self.seconds = time.perf_counter(), seconds

    def exhausted(self) -> bool:
        return self.seconds is not None and time.perf_counter() - self.start > self.seconds


def engine_config(args, max_batch: int, backend: str, small_ops: str | None = None) -> EngineConfig:
    """The one EngineConfig of every engine this benchmark builds (comparisons change only
    ``backend`` or ``small_ops``). ``small_ops``: a ``fused_small_ops`` mode, ``NO_KV_WRITE``,
    ``MHA_DOT`` or ``TORCH_SAMPLER`` (None: the main run's)."""
    kv_write = small_ops != NO_KV_WRITE
    mha_dot = True if small_ops == MHA_DOT else None
    sampler_kernel = False if small_ops == TORCH_SAMPLER else None
    small_ops = args.fused_small_ops if small_ops is None or small_ops in PSEUDO_MODES else small_ops
    per_request = -(-(args.prompt_len + args.output_len) // 16)
    prefill = args.prefill_requests * -(-(args.prefill_prompt_len + 1) // 16)
    # An 8k prefill step holds several prompts: a batch-1 engine must still admit them together.
    prefill_rows = PREFILL_STEP_TOKENS // args.prefill_prompt_len if args.prefill_requests else 0
    return EngineConfig(block_size=16, num_kv_blocks=max(max_batch * per_request, prefill) + 8,
                        max_requests=max(max_batch, prefill_rows), max_step_tokens=PREFILL_STEP_TOKENS, enable_prefix_caching=False,
                        record_routing=True, cuda_graphs=True, cuda_graph_max_batch=max_batch, dtype=args.dtype,
                        device="cuda", moe_backend=backend, fused_small_ops=small_ops, fused_kv_write=kv_write,
                        fused_moe_small_batch_max_tokens=args.small_moe_max_tokens, decode_attention_mha_dot=mha_dot,
                        skinny_linear_max_tokens=args.skinny_linear_max_tokens, sampler_kernel=sampler_kernel)


def make_engine(model, args, max_batch: int, backend: str, small_ops: str | None = None) -> LLMEngine:
    return LLMEngine(model, engine_config(args, max_batch, backend, small_ops))


def serve(engine: LLMEngine, prompts: list[list[int]], max_new_tokens: int, on_full_decode=None,
          sampling: str = "greedy") -> dict:
    """Serve ``prompts`` to completion; ``on_full_decode()`` runs once, after the third
    decode step at the full batch (its time is excluded from the wall time)."""
    first = len(engine.step_log.entries)
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **SAMPLING[sampling])
    for p in prompts:
        engine.add_request(p, params)
    full_steps, hook_s, hook_result, results = 0, 0.0, None, []
    torch.cuda.synchronize()
    start = time.perf_counter()
    while engine.has_unfinished():
        logged = len(engine.step_log.entries)
        results += engine.step()
        if len(engine.step_log.entries) == logged:   # nothing scheduled: the step only polled routing
            continue
        e = engine.step_log.entries[-1]
        if step_kind(e) == "decode" and e["decode_requests"] == len(prompts):
            full_steps += 1
            if on_full_decode is not None and full_steps == 3:
                t = time.perf_counter()
                hook_result = on_full_decode()
                hook_s = time.perf_counter() - t
    wall = time.perf_counter() - start - hook_s
    entries = engine.step_log.entries[first:]
    return {"entries": entries, "wall_s": wall, "hook": hook_result, "results": results,
            "generated": sum(len(r.output_token_ids) for r in results)}


def decode_stats(run: dict, batch: int, floor_ms: float) -> dict:
    full = [e for e in run["entries"] if step_kind(e) == "decode" and e["decode_requests"] == batch]
    if not full:
        return {"error": "no decode step ran at the full batch"}
    step_ms = statistics.median(e["step_time_ms"] for e in full)
    gpu = [e["gpu_forward_ms"] for e in full if "gpu_forward_ms" in e]
    gpu_ms = statistics.median(gpu) if gpu else None
    return {"decode_steps": len(full), "step_ms": step_ms, "gpu_forward_ms": gpu_ms, "floor_ms": floor_ms,
            "ratio_to_floor": step_ms / floor_ms, "gpu_ratio_to_floor": gpu_ms / floor_ms if gpu_ms else None,
            "decode_tokens_per_s": batch / (step_ms / 1e3),
            "generated_tokens_per_s_wall": run["generated"] / run["wall_s"], "host": host_stage_medians(full)}


def host_stage_medians(entries: list[dict]) -> dict:
    """Median host ms per engine stage and sub-stage of these steps, with the GPU's idle time
    before each step and its whole step time (CUDA events). A step whose ``stage_complete_wait``
    is near 0 found the GPU already done: the host, not the GPU, set its pace."""
    keys = [f"{stage}_ms" for stage in ENGINE_STAGES] + [f"{stage}_{sub}_ms" for stage, subs in ENGINE_STAGES.items()
                                                        for sub in subs]
    keys += ["gpu_idle_before_ms", "gpu_step_ms"]
    return {k: statistics.median(e[k] for e in entries) for k in keys if all(k in e for e in entries)}


def profile_hook(engine: LLMEngine, config, batch: int, context: int, elem: int, bandwidth: float):
    def run() -> dict:
        try:
            runner = engine.graph_runner
            size = runner.padded_size(batch)
            prof = dp.profile_decode_step(runner, size, batch)
            floors = dp.component_floor_bytes(config, batch, context, elem)
            return {**prof, "padded_size": size, "rows": dp.breakdown_rows(prof, floors, bandwidth)}
        except Exception as exc:  # noqa: BLE001  (a profiling failure must not lose the timings)
            return {"error": f"{type(exc).__name__}: {exc}"}
    return run


def moe_path(model, num_tokens: int, engine: LLMEngine) -> str:
    """The routed-expert path the engine's MoE layers take at ``num_tokens`` rows."""
    mlp = next(layer.mlp for layer in model.layers if layer.moe_index is not None)
    x = torch.empty(num_tokens, mlp.w13.shape[2], dtype=mlp.w13.dtype, device=mlp.w13.device)
    ids = torch.empty(num_tokens, model.config.topk, dtype=torch.int64, device=x.device)
    return choose_moe_backend(x, ids, mlp.w13, mlp.w2, engine.config.moe_backend)


def decode_batches(engine, model, config, args, batches, bandwidth, profile: bool) -> dict:
    elem = torch.empty((), dtype=torch_dtype(args.dtype)).element_size()
    context = args.prompt_len + args.output_len // 2
    out = {}
    for batch in batches:
        prompts = [p.prompt_token_ids for p in synthetic_prompts(
            num_requests=batch, prompt_len=args.prompt_len, vocab_size=config.vocab_size, seed=batch)]
        floor_ms = dp.bytes_per_decode_step(config, model, batch, context, elem)["total"] / bandwidth * 1e3
        # The breakdown replays a decode step: recurrent states would advance twice, and the
        # component floors assume attention in every layer, so hybrids report the step only.
        profiled = profile and batch in args.profile_batches and not config.is_hybrid
        hook = profile_hook(engine, config, batch, context, elem, bandwidth) if profiled else None
        run = serve(engine, prompts, args.output_len, hook, args.sampling)
        out[str(batch)] = {**decode_stats(run, batch, floor_ms), "moe_path": moe_path(model, batch, engine),
                           "bytes_per_step": dp.bytes_per_decode_step(config, model, batch, context, elem)}
        if run["hook"] is not None:
            out[str(batch)]["breakdown"] = run["hook"]
        if batch in args.timeline_batches:
            out[str(batch)]["timeline"] = decode_timeline(engine, prompts)
    return out


def measure_prefill(engine, model, config, args, matmul_flops: float) -> dict:
    prompts = [p.prompt_token_ids for p in synthetic_prompts(
        num_requests=args.prefill_requests, prompt_len=args.prefill_prompt_len, vocab_size=config.vocab_size, seed=7)]
    run = serve(engine, prompts, 1)
    steps = [e for e in run["entries"] if step_kind(e) == "prefill" and e["prefill_tokens"] == PREFILL_STEP_TOKENS]
    steps = steps[1:] if len(steps) > 1 else steps   # the first may still compile kernels
    if not steps:
        return {"error": f"no prefill step of exactly {PREFILL_STEP_TOKENS} tokens ran"}
    step_ms = statistics.median(e["step_time_ms"] for e in steps)
    active = dp.active_params(config, model)
    floor_ms = 2 * active * PREFILL_STEP_TOKENS / matmul_flops * 1e3
    out = {"steps": len(steps), "step_tokens": PREFILL_STEP_TOKENS, "prompt_len": args.prefill_prompt_len,
           "requests_per_step": [e["prefill_requests"] for e in steps],   # chunks per measured step
           "step_ms": step_ms, "tokens_per_s": PREFILL_STEP_TOKENS / (step_ms / 1e3), "active_params": active,
           "flop_floor_ms": floor_ms, "floor_tokens_per_s": PREFILL_STEP_TOKENS / (floor_ms / 1e3),
           "fraction_of_matmul_rate": floor_ms / step_ms}
    # Cross-checks of the host step time: the step's own CUDA events, and the wall time of
    # serving one 8k step's prompts from an idle engine (scheduling and sampling included).
    gpu = [e["gpu_step_ms"] for e in steps if e.get("gpu_step_ms")]
    if gpu:
        out["gpu_step_ms"] = statistics.median(gpu)
    one_step = prompts[: PREFILL_STEP_TOKENS // args.prefill_prompt_len]
    walls = [serve(engine, one_step, 1)["wall_s"] * 1e3 for _ in range(3)]
    out["idle_serve_ms"] = statistics.median(walls)
    out["idle_serve_fraction_of_matmul_rate"] = floor_ms / out["idle_serve_ms"]
    if args.profile_prefill and not config.is_hybrid:
        out["breakdown"] = prefill_breakdown(engine, model, config, prompts[: PREFILL_STEP_TOKENS // args.prefill_prompt_len],
                                             args.prefill_prompt_len, matmul_flops)
    return out


def prefill_breakdown(engine, model, config, prompts: list[list[int]], prompt_len: int, matmul_flops: float) -> dict:
    """Component ms of one more 8k prefill step (eager: above the piecewise graphs' sizes),
    each matmul component against its FLOP floor at the measured matmul rate."""
    def once() -> int:
        run = serve(engine, prompts, 1)
        return sum(e["prefill_tokens"] for e in run["entries"])
    try:
        prof = dp.profile_prefill(model, once, engine.recorder)
    except Exception as exc:  # noqa: BLE001  (a profiling failure must not lose the timings)
        return {"error": f"{type(exc).__name__}: {exc}"}
    scale = PREFILL_STEP_TOKENS / 1e3
    floors = dp.prefill_flop_floors(config, prompt_len)
    rows = []
    for name, ms_per_k in prof["components_ms_per_1k_tokens"].items():
        if ms_per_k == 0.0:
            continue
        floor_ms = floors[name] * PREFILL_STEP_TOKENS / matmul_flops * 1e3 if name in floors else None
        rows.append({"component": name, "ms": ms_per_k * scale, "floor_ms": floor_ms,
                     "ratio": ms_per_k * scale / floor_ms if floor_ms else None})
    return {**prof, "step_tokens": PREFILL_STEP_TOKENS, "rows": rows}


def hf_generate(config, args, workdir: Path) -> dict:
    """Save HF weights with transformers, load them into our engine's model, and time HF
    generate on the same checkpoint, at ``--hf-batch``."""
    import transformers

    from inference.hf_loader import load_hf_model
    from tools.hf_shapes import hf_config_for
    batch, n = args.hf_batch, args.hf_output_len
    with torch.device("cuda"):
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config_for(config), dtype=torch_dtype(args.dtype))
    hf_model.eval()
    hf_model.save_pretrained(workdir / "hf")
    prompts = [p.prompt_token_ids for p in synthetic_prompts(
        num_requests=batch, prompt_len=args.prompt_len, vocab_size=config.vocab_size, seed=3)]
    ids = torch.tensor(prompts, device="cuda")
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
    ours = load_hf_model(workdir / "hf", device="cuda", dtype=torch_dtype(args.dtype))
    engine = make_engine(ours, argparse.Namespace(**{**vars(args), "output_len": n}), batch, args.moe_backend)
    serve(engine, prompts[:8], 2)   # warm-up
    run = serve(engine, prompts, n)
    engine.close()
    by_prompt = sorted(run["results"], key=lambda r: prompts.index(r.prompt_token_ids))
    agree = statistics.fmean(sum(a == b for a, b in zip(x, r.output_token_ids)) / n for x, r in zip(hf_tokens, by_prompt))
    hf_tps, ours_tps = batch * n / hf_wall, run["generated"] / run["wall_s"]
    return {"batch": batch, "output_len": n, "hf_generated_tokens_per_s": hf_tps,
            "engine_generated_tokens_per_s": ours_tps, "speedup_vs_hf": ours_tps / hf_tps,
            "greedy_token_agreement": agree, "transformers": transformers.__version__}


def write_report(report: dict, args) -> None:
    if args.output is not None:
        path = args.output
    elif args.output_dir is not None:
        path = args.output_dir / f"decode_{report['model'].replace('-', '_')}_{dp.gpu_slug(report['device'])}.json"
    else:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))


def bench_model(name: str, args, yard: dict, budget: Budget) -> dict:
    config = get_preset(name)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": name, "dtype": args.dtype,
              "moe_backend": args.moe_backend, "fused_small_ops": args.fused_small_ops,
              "fused_moe_small_batch_max_tokens": args.small_moe_max_tokens,
              "skinny_linear_max_tokens": args.skinny_linear_max_tokens,
              "prompt_len": args.prompt_len, "output_len": args.output_len, "sampling": args.sampling,
              "copy_bandwidth_gb_s": yard["bandwidth"] / 1e9, "matmul_tflops": yard["matmul"] / 1e12,
              "date": time.strftime("%Y-%m-%d"), "skipped": []}
    model = build_model(config, seed=0, dtype=torch_dtype(args.dtype), device="cuda")
    engine = make_engine(model, args, max(args.batches), args.moe_backend)
    report["fused_small_ops_modules"] = engine.fused_small_ops
    report["skinny_linear_modules"] = engine.skinny_linear
    serve(engine, [p.prompt_token_ids for p in synthetic_prompts(  # warm-up: compiles prefill + decode kernels
        num_requests=8, prompt_len=args.prompt_len, vocab_size=config.vocab_size, seed=99)], 4)
    report["batches"] = decode_batches(engine, model, config, args, args.batches, yard["bandwidth"], profile=True)
    report["ratio_to_floor"] = {b: r.get("ratio_to_floor") for b, r in report["batches"].items()}
    write_report(report, args)
    if budget.exhausted():
        report["skipped"].append("prefill")
    else:
        report["prefill"] = measure_prefill(engine, model, config, args, yard["matmul"])
        write_report(report, args)
    engine.close()
    del engine
    torch.cuda.empty_cache()
    report["compare"] = {}
    for backend in args.compare_backends:
        if backend == args.moe_backend or budget.exhausted():
            report["skipped"].append(f"compare {backend}")
            continue
        try:
            engine = make_engine(model, args, max(args.compare_batches), backend)
            rows = decode_batches(engine, model, config, args, args.compare_batches, yard["bandwidth"], profile=False)
            report["compare"][backend] = {"ratio_to_floor": {b: r.get("ratio_to_floor") for b, r in rows.items()},
                                          "batches": rows}
            engine.close()
            del engine
        except (ValueError, RuntimeError) as exc:   # e.g. grouped_mm off sm90
            report["compare"][backend] = {"error": f"{type(exc).__name__}: {exc}"}
        torch.cuda.empty_cache()
        write_report(report, args)
    compare_small_ops(report, model, config, args, yard, budget)
    del model
    torch.cuda.empty_cache()
    if args.hf and name in args.hf_models and not budget.exhausted():
        try:
            with tempfile.TemporaryDirectory() as tmp:
                report["hf"] = hf_generate(config, args, Path(tmp))
        except Exception as exc:  # noqa: BLE001  (report it; the measurements above still stand)
            report["hf"] = {"error": f"{type(exc).__name__}: {exc}"}
        torch.cuda.empty_cache()
    write_report(report, args)
    return report


def compare_small_ops(report: dict, model, config, args, yard: dict, budget: Budget) -> None:
    """``report["compare_small_ops"][mode]``: every batch decoded again (breakdowns too)
    with ``fused_small_ops=mode``, in the same process and on the same weights."""
    report["compare_small_ops"] = {}
    for mode in args.compare_small_ops:
        if mode == args.fused_small_ops or budget.exhausted():
            report["skipped"].append(f"compare small ops {mode}")
            continue
        engine = make_engine(model, args, max(args.batches), args.moe_backend, mode)
        serve(engine, [p.prompt_token_ids for p in synthetic_prompts(   # warm-up, as the main run
            num_requests=8, prompt_len=args.prompt_len, vocab_size=config.vocab_size, seed=99)], 4)
        rows = decode_batches(engine, model, config, args, args.batches, yard["bandwidth"], profile=True)
        report["compare_small_ops"][mode] = {"ratio_to_floor": {b: r.get("ratio_to_floor") for b, r in rows.items()},
                                             "modules": engine.fused_small_ops, "batches": rows}
        engine.close()
        del engine
        torch.cuda.empty_cache()
        write_report(report, args)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench_decode.py needs a CUDA GPU (exit status 2: nothing measured)", file=sys.stderr)
        return 2
    budget = Budget(args.time_budget)
    yard = {"bandwidth": dp.copy_bandwidth(), "matmul": dp.matmul_rate()}
    reports = []
    for name in args.models:
        if budget.exhausted():
            print(f"skipped {name}: time budget spent", flush=True)
            continue
        reports.append(bench_model(name, args, yard, budget))
        print(format_tables(reports[-1]), flush=True)
    print("\n=== summary ===")
    for r in reports:
        print(format_tables(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
