"""The dynamic inference engine: continuous batching over a paged KV cache, with optional
routing recording that adds no host synchronisation to the step.

One ``step()`` runs the pipeline's stages, each a small method:

    schedule N+1 -> prepare + launch N+1 -> complete N -> finalize routing

With asynchronous scheduling the host completes step N (waits for its sampled tokens,
applies stop conditions, frees what finished) only after step N+1 is already queued on the
GPU, so the GPU never waits for the host; step N's tokens reach step N+1's inputs on the
device. Synchronous scheduling completes each step right after launching it. Both run the
same code, on CPU as on CUDA, and produce the same tokens and routing.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import weakref
from typing import Callable, Iterable, Sequence

import torch

from inference.attention_backends import select_attention
from inference.cache.block_pool import BlockPool
from inference.cache.hybrid_cache import HybridSequenceCache, auto_checkpoint_interval
from inference.cache.kv_cache import KVCache
from inference.config import EngineConfig
from inference.device_state import DeviceState
from inference.errors import InvalidRequestError, allocating
from inference.model import MoEGPT
from inference.model_runner import LaunchedStep
from inference.replica import ReplicaSync
from inference.request import Request, RequestResult, SamplingParams
from inference.sampling import Sampler
from inference.scheduler import Scheduler, SchedulerConfig
from inference.stop_strings import Detokenizer, StopStringChecker
from inference.cache.sequence_cache import SequenceCache
from inference.cache.state_pool import state_bytes_per_sequence
from inference.step_entry import gpu_timings, step_entry
from inference.weight_refit import copy_named_tensors
from routing_replay import StepDetailsLog
from routing_replay.phase_timer import PhaseTimer


class LLMEngine:
    """Serves requests step by step. Invariant: every added request ends as exactly one
    ``RequestResult`` returned by ``step()`` (unless aborted); with recording on, a result is
    returned only once its routing is final (``prompt_len + generated_len - 1`` rows). At
    most one step is in flight between ``step()`` calls (asynchronous scheduling)."""

    def __init__(self, model: MoEGPT, config: EngineConfig, detokenizer: Detokenizer | None = None) -> None:
        """A tensor-parallel ``model`` makes this one rank's engine of its replica: building
        it is collective (``inference.replica``); only the replica leader reads routing back.
        ``detokenizer`` (token-id lists -> texts, special tokens skipped; ``inference.stop_strings``)
        serves requests with stop strings; without one they fail alone at ``add_request``."""
        self.model = model
        self.stop_checker = StopStringChecker(detokenizer) if detokenizer is not None else None
        self.model_config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if config.async_scheduling is None:
            config = dataclasses.replace(config, async_scheduling=self.device.type == "cuda")
        self.config = config
        self.max_model_len = min(self.model_config.max_position_embeddings, config.kv_capacity_tokens)
        with allocating("KV cache", "lower num_kv_blocks (--num-kv-blocks / --kv-cache-memory)"):
            self.block_pool = BlockPool(config.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.sequence_cache = self._sequence_cache()
        # The scheduler calls back into the engine through weak references, so dropping the
        # engine frees its device memory at once, without waiting for the garbage collector.
        self.scheduler = Scheduler(
            SchedulerConfig(max_requests=config.max_requests, max_step_tokens=config.max_step_tokens,
                            block_size=config.block_size, chunked_prefill=config.chunked_prefill,
                            eos_token_id=self.model_config.eos_token_id,
                            extra_eos_token_ids=self.model_config.extra_eos_token_ids, max_model_len=self.max_model_len),
            self.sequence_cache, on_preempt=_weak(self._on_preempt), on_finish=_weak(self._on_finish),
            stop_checker=self.stop_checker.check if self.stop_checker is not None else None)
        self.sampler = Sampler(config.seed, self.device, kernel=config.sampler_kernel)
        self._attention_fn = select_attention(self.device, config.decode_attention_mha_dot)
        if self.device.type == "cuda":
            model.set_experts_fn(routed_experts_fn(config))
        # Before the decode graphs are captured: they bake in whichever ops run.
        from inference.kernels.small_ops import fused_small_ops_enabled
        self.fused_small_ops = model.set_fused_small_ops(fused_small_ops_enabled(config.fused_small_ops, self.device),
                                                         kv_write=config.fused_kv_write)
        self.skinny_linear = model.set_skinny_linear(config.skinny_linear_max_tokens)
        parallel = model.parallel
        self.replica = (ReplicaSync.build(parallel, config.replica_check_interval)
                        if parallel is not None and parallel.tp.size > 1 else None)
        self.reads_routing = parallel is None or parallel.is_replica_leader
        self._state: DeviceState | None = DeviceState.build(model, config, self.max_model_len, self.sampler,
                                                            self._attention_fn, self.reads_routing,
                                                            self.sequence_cache)
        self.step_log = StepDetailsLog(config.step_log_max_entries or None)
        self.weight_version: int | str = 0
        self.num_generated_tokens = 0          # tokens received by the host so far, all requests
        self._start_time = time.perf_counter()
        self._arrivals = itertools.count()
        self._step_index = 0
        self._live: dict[str, Request] = {}    # caller id -> request, until its result is returned
        self._routing_start: dict[Request, int] = {}
        self._in_flight: LaunchedStep | None = None
        self._schedule_timer = PhaseTimer()    # the timer of the schedule() call under way
        self._last_gpu_end: torch.cuda.Event | None = None
        self._unattributed_ms = 0.0            # host time of calls that completed no step
        self._closed = False

    def _sequence_cache(self) -> SequenceCache:
        """KV blocks only, or for a hybrid model also state slots and checkpoints."""
        mc, config = self.model_config, self.config
        if not mc.is_hybrid:
            return SequenceCache(self.block_pool)
        interval = config.checkpoint_interval_blocks or auto_checkpoint_interval(
            state_bytes_per_sequence(mc, self.dtype), KVCache.bytes_per_block(mc, config.block_size, self.dtype))
        return HybridSequenceCache(self.block_pool, interval)

    # Device-side parts (absent while the engine sleeps, and after close).
    def _device_state(self) -> DeviceState:
        if self._state is None:
            raise RuntimeError("the engine is closed" if self._closed else
                               "the engine is asleep (its KV cache is released): call wake_up() first")
        return self._state

    kv_cache = property(lambda self: self._device_state().kv_cache)
    batch = property(lambda self: self._device_state().batch)
    graph_runner = property(lambda self: self._device_state().graph_runner)
    runner = property(lambda self: self._device_state().runner)
    recorder = property(lambda self: self._state.recorder if self._state is not None else None)
    routing = property(lambda self: self._state.routing if self._state is not None else None)

    # ---- requests -------------------------------------------------------------------
    def add_request(self, prompt_token_ids: Sequence[int], sampling_params: SamplingParams | None = None,
                    request_id: str | None = None, routing_start: int = 0) -> str:
        """Validate and queue a request; raises ``InvalidRequestError`` naming it when bad
        (nothing else is affected). ``routing_start`` > 0 returns only routing rows from that
        position on (multi-turn callers already hold the rows of earlier turns). An id can
        be reused once its result has been returned."""
        self._device_state()   # refuses a sleeping or closed engine, naming the cause
        arrival = next(self._arrivals)
        request_id = str(arrival) if request_id is None else str(request_id)
        params = sampling_params or SamplingParams()
        self._validate(request_id, prompt_token_ids, params)
        if isinstance(routing_start, bool) or not isinstance(routing_start, int) or not 0 <= routing_start <= len(prompt_token_ids):
            raise InvalidRequestError(
                f"routing_start={routing_start!r} must be an int in [0, prompt length {len(prompt_token_ids)}]", request_id)
        request = Request(request_id=request_id, prompt_token_ids=list(prompt_token_ids),
                          sampling_params=params, arrival_index=arrival)
        if routing_start:
            self._routing_start[request] = routing_start
        self._live[request_id] = request
        self.scheduler.add(request)
        if self.replica is not None:
            self.replica.on_add(request)
        return request_id

    def _validate(self, request_id: str, prompt: Sequence[int], params: SamplingParams) -> None:
        if request_id in self._live:
            raise InvalidRequestError("a request with this id is already being served", request_id)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidRequestError("prompt_token_ids must be a list of ints", request_id)
        if len(prompt) == 0:
            raise InvalidRequestError("empty prompt (at least one token is needed)", request_id)
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", request_id)
        if len(prompt) > self.model_config.max_position_embeddings:
            raise InvalidRequestError(
                f"prompt has {len(prompt)} tokens; the model's maximum is "
                f"{self.model_config.max_position_embeddings} positions", request_id)
        if len(prompt) > self.config.kv_capacity_tokens:
            raise InvalidRequestError(
                f"prompt has {len(prompt)} tokens; the KV cache can hold at most {self.config.kv_capacity_tokens} "
                f"(num_kv_blocks={self.config.num_kv_blocks} x block_size={self.config.block_size})", request_id)
        if not self.config.chunked_prefill and len(prompt) > self.config.max_step_tokens:
            raise InvalidRequestError(
                f"prompt has {len(prompt)} tokens but max_step_tokens is {self.config.max_step_tokens} and "
                "chunked prefill is off, so it can never be scheduled; enable chunked prefill or raise "
                "max_step_tokens", request_id)
        params.validate(request_id)
        if params.stop and self.stop_checker is None:
            raise InvalidRequestError(
                f"stop strings {list(params.stop)!r} need a detokenizer, and this engine has none: "
                "build it with LLMEngine(model, config, detokenizer=...)", request_id)

    def abort(self, request_id: str) -> bool:
        """Stop serving a request wherever it is (queued, running, in flight, or finished
        with its routing still on the way); its result is never returned. False if unknown."""
        request = self._live.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.abort(request_id)   # None when it already finished
        self._routing_start.pop(request, None)
        if self.routing is not None:
            self.routing.discard(request)
        return True

    def has_unfinished(self) -> bool:
        """Whether a request is queued, running, in flight, or waiting for its routing."""
        return (self.scheduler.has_unfinished() or self._in_flight is not None
                or (self.routing is not None and self.routing.num_awaiting > 0))

    # ---- the step -------------------------------------------------------------------
    def step(self) -> list[RequestResult]:
        """Run one pipeline iteration; returns the results that became final."""
        call_start = time.perf_counter()
        launched = self._schedule_and_launch()
        if self.config.async_scheduling:
            completing, self._in_flight = self._in_flight, launched
        else:
            completing = launched
        ready = self._complete(completing) if completing is not None else []
        timer = completing.timer if completing is not None else PhaseTimer()
        t = timer.now()
        if self.routing is not None:
            ready += self.routing.poll(timer)
        timer.lap("stage_complete", "routing", t)
        call_ms = (time.perf_counter() - call_start) * 1e3
        if completing is None:
            self._unattributed_ms += call_ms
        else:
            self._record(completing, call_ms + self._unattributed_ms)
            self._unattributed_ms = 0.0
        return self._returned(ready)

    def _returned(self, results: list[RequestResult]) -> list[RequestResult]:
        """Results leave the engine: their ids may be reused from now on."""
        for result in results:
            self._live.pop(result.request_id, None)
        return results

    def _schedule_and_launch(self) -> LaunchedStep | None:
        """Stages schedule, prepare and launch of the next step (None: nothing to run)."""
        timer = PhaseTimer()
        t = timer.now()
        self._schedule_timer = timer     # preemption snapshots in schedule() time into it
        output = self.scheduler.schedule()
        timer.lap("stage_schedule", "", t)
        if not output.chunks and not output.preempted:
            return None
        index, self._step_index = self._step_index, self._step_index + 1
        if self.replica is not None:
            self.replica.on_schedule(index, output)
        if not output.chunks:
            return LaunchedStep(index=index, output=output, prepared=None, timer=timer)
        return self.runner.launch(index, output, self._in_flight, timer)

    def _complete(self, step: LaunchedStep) -> list[RequestResult]:
        """Stage complete: wait for the step's tokens, apply them, finish requests, and
        enqueue the final routing reads of those that finished."""
        timer = step.timer
        t = timer.now()
        step.wait()
        t = timer.lap("stage_complete", "wait", t)
        sampled = step.sampled()
        if self.replica is not None:
            self.replica.on_complete(step.index, step.host.get("tokens"))
        self.num_generated_tokens += sum(1 for r in step.sampling_requests if not r.is_finished)
        step.apply_logprobs()
        finished = self.scheduler.update(step.output, sampled)
        step.num_finished = len(finished)
        results = [self._result_of(request) for request in finished]
        t = timer.lap("stage_complete", "update", t)
        if self.routing is not None:
            self.routing.flush(timer)
        timer.lap("stage_complete", "routing", t)
        return [r for r in results if r is not None]

    def _result_of(self, request: Request) -> RequestResult | None:
        """The result of a finished request, or None while its routing is on the way."""
        result = RequestResult.from_request(request)
        result.weight_version = self.weight_version
        if not self.config.compute_logprobs:
            result.output_logprobs = None
        start = self._routing_start.pop(request, 0)
        if self.routing is None:
            return result
        result.routing_start = start
        self.routing.await_routing(request, result)
        return None

    def _record(self, step: LaunchedStep, step_ms: float) -> None:
        gpu_ms, self._last_gpu_end = gpu_timings(step, self._last_gpu_end)
        self.step_log.record(step_entry(step, step_ms, time.perf_counter() - self._start_time, gpu_ms))

    # ---- scheduler hooks (called before blocks are freed) ----------------------------------
    def _on_preempt(self, request: Request) -> None:
        in_flight = self._in_flight
        if in_flight is not None and self.scheduler.is_in_flight(request):
            # The queued step still writes this request's blocks: they may be reused only
            # once it is done (rare: preemption is the one place the host waits early).
            in_flight.wait()
        if self.routing is not None:
            self.routing.snapshot_preempted(request, self._schedule_timer)

    def _on_finish(self, request: Request) -> None:
        if self.routing is not None:
            self.routing.request_finished(request, self._routing_start.get(request, 0))

    # ---- lifecycle inside an RL loop -------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       weight_version: int | str | None = None) -> int | str:
        """Copy new weights into the model in place (captured CUDA graphs stay valid) and
        return the new ``weight_version`` (the counter + 1, or the given tag).

        Names are this engine's parameter names (``MoEGPT.named_parameters()``, plus router
        ``expert_bias`` buffers); any subset may be given, and every name and shape is
        checked before anything is copied. Refused while requests are being served (drain
        first: a rollout never mixes weights). The prefix cache, and with it the routing rows
        of its blocks, is invalidated: a prompt cached before the refit is recomputed after
        it. Tensors produced on another CUDA stream must be ready before the call."""
        if self.has_unfinished():
            raise RuntimeError("update_weights: requests are still being served; drain them (step() until "
                               "has_unfinished() is False) before refitting")
        version = weight_version if weight_version is not None else self._next_version()
        copy_named_tensors(self.model, named_tensors)
        if not self.sequence_cache.reset_prefix_cache():
            raise AssertionError("KV blocks still in use with no request being served")
        self.weight_version = version
        return version

    def _next_version(self) -> int:
        if not isinstance(self.weight_version, int):
            raise ValueError(f"weight_version is the tag {self.weight_version!r}: pass the next tag explicitly")
        return self.weight_version + 1

    def sleep(self) -> None:
        """Release the KV cache, the routing buffers, the step buffers and the CUDA graphs
        (the weights stay); ``wake_up`` rebuilds them and re-captures the graphs. Refused
        while requests are being served. The prefix cache does not survive a sleep."""
        if self.has_unfinished():
            raise RuntimeError("sleep: requests are still being served; drain them first")
        if self._state is None:
            return
        self._state.release()
        self._state = None
        self._last_gpu_end = None
        self.sequence_cache.reset_prefix_cache()
        self._detach_states()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        """Allocate what ``sleep`` released (a no-op when awake)."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        if self._state is None:
            self._state = DeviceState.build(self.model, self.config, self.max_model_len, self.sampler,
                                            self._attention_fn, self.reads_routing, self.sequence_cache)

    def _detach_states(self) -> None:
        """Let go of the state pool and checkpoints (their memory leaves with the device state)."""
        if isinstance(self.sequence_cache, HybridSequenceCache):
            self.sequence_cache.attach(None, None)

    @property
    def is_sleeping(self) -> bool:
        return self._state is None and not self._closed

    def close(self) -> None:
        """Free every device allocation the engine made, now (the model stays the caller's);
        unfinished requests are dropped. Idempotent; the engine cannot serve afterwards."""
        if self._closed:
            return
        if self._in_flight is not None:
            self._in_flight.wait()
        self._in_flight = self._last_gpu_end = None
        if self._state is not None:
            self._state.release()
        self._state = None
        self._closed = True
        self._detach_states()
        self._live.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- batch API ------------------------------------------------------------------
    def generate(self, prompts: Iterable[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 request_ids: Sequence[str] | None = None,
                 on_result: Callable[[RequestResult], None] | None = None,
                 routing_starts: Sequence[int] | None = None) -> list[RequestResult]:
        """Serve ``prompts`` to completion; results come back in input order. A bad prompt
        yields a result with ``finish_reason == "error"`` and the others are served.

        Needs an idle engine: requests queued earlier with ``add_request`` are never served
        (or dropped) by ``generate``; drain them with ``step()`` first."""
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle engine, but requests added with add_request are still "
                               "being served; call step() until has_unfinished() is False first")
        prompts = list(prompts)
        params = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                  else [sampling_params] * len(prompts))
        ids = [str(i) for i in (request_ids if request_ids is not None else
                                (next(self._arrivals) for _ in prompts))]
        if len(set(ids)) != len(ids):
            raise ValueError("generate: request_ids must be unique")
        starts = list(routing_starts) if routing_starts is not None else [0] * len(prompts)
        results: dict[str, RequestResult] = {}

        def deliver(result: RequestResult) -> None:
            results[result.request_id] = result
            if on_result:
                on_result(result)

        for rid, prompt, p, start in zip(ids, prompts, params, starts):
            try:
                self.add_request(prompt, p, rid, routing_start=start)
            except InvalidRequestError as exc:
                deliver(RequestResult.failed(rid, list(prompt) if isinstance(prompt, (list, tuple)) else [], str(exc)))
        while self.has_unfinished():
            done = self.step()
            if not done and not self.scheduler.has_unfinished() and self._in_flight is None:
                done = self._drain_routing()
            for result in done:
                deliver(result)
        return [results[rid] for rid in ids]

    def _drain_routing(self) -> list[RequestResult]:
        """Off the step path: block until every finished request's routing is final."""
        return self._returned(self.routing.poll(PhaseTimer(), wait=True) if self.routing is not None else [])


def routed_experts_fn(config: EngineConfig) -> Callable[..., torch.Tensor]:
    """The routed-experts function the engine installs on a CUDA model: ``moe_backend`` and
    the fused path's small-batch threshold bound (CPU models keep their reference loop)."""
    from inference.kernels import moe_experts_fn
    return moe_experts_fn(config.moe_backend, config.fused_moe_small_batch_max_tokens)


def _weak(method):
    """A callback that calls ``method`` while its object is alive, without keeping it alive."""
    ref = weakref.WeakMethod(method)

    def call(*args):
        target = ref()
        if target is not None:
            target(*args)
    return call
