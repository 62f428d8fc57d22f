"""Yardsticks and a per-component profile of one decode step, for ``tools/bench_decode.py``.

- ``copy_bandwidth`` / ``matmul_rate``: the measured device-to-device copy bandwidth and
  bf16 matmul rate that the floors divide by.
- ``bytes_per_decode_step`` / ``component_floor_bytes``: bytes a decode step must move, in
  total and per component; ``active_params`` for the prefill FLOP floor.
- ``profile_decode_step``: the decode forward run eagerly (the same ``_forward`` that the
  decode CUDA graph captured) under ``torch.profiler`` with each component's modules
  wrapped in ``record_function`` labels; every kernel's device time is charged to the
  innermost label around the CPU call that launched it (``attribute_kernel_time``, via
  ``tools.profile_attribution``), and the kernels with the most time are listed by name.
  Graph launch gaps = the graph's replay time minus the sum of kernel times, i.e. what the
  graph adds between kernels.
"""

from __future__ import annotations

import contextlib
import re
import statistics
from collections.abc import Callable, Iterable, Iterator

import torch

from inference.model.attention import GQAttention, MLAttention
from inference.model.layers import RMSNorm, SwiGLUMLP
from inference.model.moe import MoEMLP
from inference.model.router import TopKRouter
from tools.profile_attribution import UNLABELLED, Attribution, attribute_kernels, records_from_events
from inference.cache.state_pool import state_bytes_per_sequence

LABEL_PREFIX = "decode::"
COMPONENTS = ("attention kernel + KV write", "attention projections", "norms and rotary", "router + top-k",
              "MoE experts", "dense / shared MLP", "routing capture", "logits", "embedding + residual adds")


def gpu_slug(device_name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100' (for file names)."""
    match = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", device_name)
    return (match.group(1) if match else re.sub(r"\W+", "_", device_name)).lower()


def cuda_ms(fn: Callable[[], object], reps: int, warmup: int = 2) -> list[float]:
    """Per-call CUDA-event times of ``fn`` (ms), each call bracketed by its own events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def capture_graph(fn: Callable[[], object], calls: int = 1) -> torch.cuda.CUDAGraph:
    """``calls`` back-to-back calls of ``fn`` captured in one CUDA graph, after a warm-up
    call on a side stream (Triton compiles, the allocator settles)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = statistics.median(cuda_ms(lambda: dst.copy_(src), reps, warmup=3))
    del src, dst
    return 2 * nbytes / (ms / 1e3)


def matmul_rate(n: int = 8192, reps: int = 10, dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense ``n x n x n`` matmul rate in FLOP/s (cuBLAS, the best the GEMMs can do)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = statistics.median(cuda_ms(lambda: a @ b, reps, warmup=3))
    del a, b
    return 2 * n ** 3 / (ms / 1e3)


def param_groups(model) -> dict[str, int]:
    """Parameter counts: routed experts, embedding, lm_head (when untied), everything else."""
    experts = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".w13", ".w2")))
    embed = model.embed_tokens.weight.numel()
    head = 0 if model.lm_head.weight is model.embed_tokens.weight else model.lm_head.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return {"experts": experts, "embed": embed, "lm_head": head, "other": total - experts - embed - head}


def active_params(config, model) -> float:
    """Parameters a prefill token multiplies by: all but the embedding (a gather) and the
    lm_head (only sampled rows reach it), with ``topk / E`` of the routed experts."""
    g = param_groups(model)
    return g["other"] + g["experts"] * config.topk / config.num_experts


def bytes_per_decode_step(config, model, batch: int, context: int, elem: int) -> dict:
    """Weights a decode step of ``batch`` tokens touches (routed experts: the expected
    fraction under uniform routing), plus the KV it reads (attention layers only) and, for
    hybrid models, every request's recurrent state read and written once."""
    g = param_groups(model)
    touched = 1.0 - (1.0 - config.topk / config.num_experts) ** batch
    weights = (g["other"] + g["lm_head"] + g["experts"] * touched + batch * config.hidden_size) * elem
    kv = batch * context * config.kv_bytes_per_token * elem
    state = 2 * batch * state_bytes_per_sequence(config, next(model.parameters()).dtype)
    return {"weights": weights, "kv": kv, "state": state, "total": weights + kv + state,
            "expert_touched_fraction": touched}


def component_floor_bytes(config, batch: int, context: int, elem: int) -> dict[str, float]:
    """Bytes each component must move at least (weights once, activations in and out)."""
    c, b = config, batch
    layers, moe_layers = c.num_layers, c.num_moe_layers
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    act = b * c.hidden_size * elem
    touched = 1.0 - (1.0 - c.topk / c.num_experts) ** b
    dense_layers = layers - moe_layers
    shared = c.shared_expert_intermediate_size
    return {
        "attention kernel + KV write": layers * b * (context * 2 * kv + 2 * kv + 2 * q) * elem,
        "attention projections": layers * ((c.hidden_size * (q + 2 * kv) + q * c.hidden_size) * elem + 2 * act),
        "norms and rotary": layers * (4 * act + 4 * b * (q + kv) * elem * (2 if c.qk_norm != "none" else 1)) + 2 * act,
        "router + top-k": moe_layers * (c.num_experts * c.hidden_size * elem + act + b * c.num_experts * 4),
        "MoE experts": moe_layers * (c.num_experts * touched * 3 * c.hidden_size * c.moe_intermediate_size * elem
                                     + 2 * act),
        "dense / shared MLP": (dense_layers * 3 * c.hidden_size * c.intermediate_size
                               + moe_layers * 3 * c.hidden_size * shared) * elem,
        "routing capture": moe_layers * b * c.topk * 8 * 2,
        "logits": c.vocab_size * c.hidden_size * elem + b * c.vocab_size * 4 + act,
        "embedding + residual adds": act + layers * 2 * 3 * act,
    }


def _labelled(fn: Callable, label: str) -> Callable:
    def run(*args, **kwargs):
        with torch.profiler.record_function(LABEL_PREFIX + label):
            return fn(*args, **kwargs)
    return run


@contextlib.contextmanager
def labelled_components(model, recorder=None) -> Iterator[int]:
    """Wrap the decode forward's pieces in profiler labels (instance attributes shadowing
    ``forward`` and friends); everything is restored on exit. Yields how many it wrapped."""
    patched: list[tuple[object, str, object]] = []

    def wrap(obj, attr: str, label: str) -> None:
        had = attr in vars(obj)
        patched.append((obj, attr, vars(obj)[attr] if had else None))
        setattr(obj, attr, _labelled(getattr(obj, attr), label))

    wrap(model, "forward", "embedding + residual adds")
    wrap(model, "compute_logits", "logits")
    for module in model.modules():
        if isinstance(module, (GQAttention, MLAttention)):
            wrap(module, "forward", "attention kernel + KV write")
            wrap(module, "project", "norms and rotary")        # rotary, and reshapes
            if isinstance(module, GQAttention):                 # the fused norm + rotary + KV write kernel
                wrap(module, "project_write_kv", "norms and rotary")
                wrap(module, "_linear", "attention projections")   # skinny_linear bypasses nn.Linear.forward
            for sub in module.modules():
                if isinstance(sub, torch.nn.Linear):
                    wrap(sub, "forward", "attention projections")
        elif isinstance(module, RMSNorm):
            wrap(module, "forward", "norms and rotary")
            wrap(module, "add_forward", "norms and rotary")   # fused residual add + norm
        elif isinstance(module, TopKRouter):
            wrap(module, "forward", "router + top-k")
        elif isinstance(module, MoEMLP):
            wrap(module, "forward", "routing capture")         # its own ops: the staging copy
            wrap(module, "experts_fn", "MoE experts")
        elif isinstance(module, SwiGLUMLP):
            wrap(module, "forward", "dense / shared MLP")
    if recorder is not None and hasattr(recorder, "gather"):
        wrap(recorder, "gather", "routing capture")
    try:
        yield len(patched)
    finally:
        for obj, attr, original in reversed(patched):
            if original is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, original)


def attribute_kernel_time(events: Iterable) -> tuple[dict[str, float], Attribution]:
    """Device microseconds per component label from profiler ``FunctionEvent``s (every
    component present, "unlabelled" included), and the attribution itself for its kernel
    tables (``tools.profile_attribution``: each kernel is charged to the innermost label
    around the CPU call that launched it, Triton launches included)."""
    result = attribute_kernels(*records_from_events(events, LABEL_PREFIX))
    totals = {name: 0.0 for name in (*COMPONENTS, UNLABELLED)}
    for name, us in result.totals.items():
        totals[name] = totals.get(name, 0.0) + us
    return totals, result


def profile_decode_step(runner, size: int, rows: int, reps: int = 3) -> dict:
    """Component times (ms) of the decode forward padded to ``size`` rows, eager under the
    profiler, against the replay time of the captured graph of that size.

    The static step tensors must hold a real decode step (call right after one): the
    replica recomputes it, rewriting the same KV slots and routing rows with the same
    values.
    """
    graph_ms = statistics.median(cuda_ms(lambda: runner.run(size, rows), reps=20, warmup=3))
    with torch.inference_mode():
        runner._forward(size)        # eager warm-up outside the profile
        torch.cuda.synchronize()
        with labelled_components(runner.model, getattr(runner, "recorder", None)) as wrapped:
            eager_ms = statistics.median(cuda_ms(lambda: runner._forward(size), reps=reps, warmup=1))
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(reps):
                    runner._forward(size)
                torch.cuda.synchronize()
    totals, attribution = attribute_kernel_time(prof.events())
    top = attribution.top_kernels(steps=reps)
    per_call = {k: v / reps / 1e3 for k, v in totals.items()}
    kernel_ms = sum(per_call.values())
    return {"graph_replay_ms": graph_ms, "eager_ms": eager_ms, "kernel_ms": kernel_ms,
            "components_ms": per_call, "graph_launch_gaps_ms": graph_ms - kernel_ms, "labels_wrapped": wrapped,
            "top_kernels": top}


def profile_prefill(model, serve_once: Callable[[], int], recorder=None) -> dict:
    """Component times of real prefill steps: ``serve_once()`` serves prompts to completion
    under the profiler with the component labels and returns how many prompt tokens it
    computed; times are reported per 1,000 prompt tokens (the steps' own mix of attention
    context lengths, nothing replayed)."""
    with torch.inference_mode(), labelled_components(model, recorder):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            tokens = serve_once()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    totals, attribution = attribute_kernel_time(prof.events())
    per_k = {k: v / 1e3 / tokens * 1e3 for k, v in totals.items()} if tokens else {}
    return {"prompt_tokens": tokens, "components_ms_per_1k_tokens": per_k,
            "kernel_ms_per_1k_tokens": sum(per_k.values()), "top_kernels": attribution.top_kernels(),
            "kernels_by_name": attribution.by_kernel()}


def prefill_flop_floors(config, context: int) -> dict[str, float]:
    """FLOPs per prompt token of the matmul-bound components of a prefill of ``context``-token
    prompts: routed + shared experts (SwiGLU: 3 matrices), the attention projections and the
    causal attention itself (QK^T and PV over on average context / 2 keys)."""
    h, layers = config.hidden_size, config.num_layers
    moe_layers = config.num_moe_layers
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    experts = 2 * 3 * h * (config.topk * config.moe_intermediate_size + config.shared_expert_intermediate_size)
    return {"MoE experts": moe_layers * experts,
            "attention projections": layers * 2 * h * (2 * q + 2 * kv),
            "attention kernel + KV write": layers * 2 * 2 * q * context / 2}


def breakdown_rows(profile: dict, floors: dict[str, float], bandwidth: float) -> list[dict]:
    """One row per component: measured ms, bytes floor ms, ratio (None where the floor is 0)."""
    rows = []
    for name in (*COMPONENTS, "unlabelled"):
        ms = profile["components_ms"].get(name, 0.0)
        floor_ms = floors.get(name, 0.0) / bandwidth * 1e3
        if ms == 0.0 and floor_ms == 0.0:
            continue
        rows.append({"component": name, "ms": ms, "floor_ms": floor_ms,
                     "ratio": ms / floor_ms if floor_ms > 0 else None})
    rows.append({"component": "graph launch gaps", "ms": profile["graph_launch_gaps_ms"], "floor_ms": 0.0,
                 "ratio": None})
    return rows
