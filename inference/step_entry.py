"""One step_details entry from a completed step (schema in docs/SCHEMAS.md).

Host times: the engine stages (``stage_*``) and routing phases (``routing_*``) of this step,
each with sub-phases that add up to it. A step's stages fall into two ``step()`` calls under
asynchronous scheduling (scheduled and launched in one, completed in the next), so
``step_time_ms`` is the host time of the call that completed it (plus any earlier calls that
completed nothing): summed over entries it is the engine's time in ``step()``.
"""

from __future__ import annotations

from inference.model_runner import LaunchedStep
from routing_replay.step_details import ENGINE_STAGES, ROUTING_SUBPHASES

_PHASES = {**ENGINE_STAGES, **ROUTING_SUBPHASES}


def step_entry(step: LaunchedStep, step_ms: float, time_s: float, gpu_ms: dict[str, float] | None) -> dict:
    output, prepared = step.output, step.prepared
    chunks = output.chunks
    num_decode = sum(1 for c in chunks if c.is_decode)
    return {
        "step": step.index,
        "prefill_requests": len(chunks) - num_decode,
        "decode_requests": num_decode,
        "active_tokens": prepared.num_tokens if prepared else 0,
        "padded_tokens": prepared.num_padded_tokens if prepared else 0,
        "cuda_graph": step.cuda_graph,
        "piecewise_graph": step.piecewise_graph,
        "step_time_ms": step_ms,
        **step.timer.entry(_PHASES),
        "prefill_tokens": sum(c.num_tokens for c in chunks) - num_decode,
        "decode_tokens": num_decode,
        "finished_requests": step.num_finished,
        "preempted_requests": len(output.preempted),
        "time_s": time_s,
        **(gpu_ms or {}),
    }


def gpu_timings(step: LaunchedStep, last_end) -> tuple[dict[str, float] | None, object]:
    """The ``gpu_*`` fields of a completed CUDA step (events already completed, so reading
    them never waits) and the event that ends it (the next step's idle time starts there)."""
    gpu = step.gpu
    if gpu is None:
        return None, last_end
    gpu_ms = {"gpu_forward_ms": gpu.begin.elapsed_time(gpu.forward_end), "gpu_step_ms": gpu.begin.elapsed_time(gpu.end)}
    if last_end is not None:
        gpu_ms["gpu_idle_before_ms"] = max(0.0, last_end.elapsed_time(gpu.begin))
    return gpu_ms, gpu.end
