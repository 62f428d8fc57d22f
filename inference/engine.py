"""The dynamic inference engine: continuous batching over a paged KV cache, with optional
routing recording that adds no host synchronisation to the step."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from inference.attention_backends import select_attention
from inference.block_pool import BlockPool
from inference.config import EngineConfig
from inference.cuda_graphs import DecodeGraphRunner
from inference.errors import InvalidRequestError
from inference.kv_cache import KVCache
from inference.model import ForwardContext, MoEGPT
from inference.request import Request, RequestResult, SamplingParams
from inference.sampler import Sampler
from inference.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from inference.step_batch import PreparedStep, StepBatch
from routing_replay import RoutingRecorder, StepDetailsLog
from routing_replay.host_sync_recorder import HostSyncRecorder


@dataclass
class _PhaseTimes:
    """Host milliseconds spent in each routing phase during one step."""

    gather: float = 0.0
    store: float = 0.0
    reconstruct: float = 0.0
    finalize: float = 0.0


class _GpuTimer:
    """CUDA events around one step's forward. Read only after the sampled-token readback,
    which has already waited for them, so reading never adds a sync. No-op on CPU."""

    def __init__(self, begin: torch.cuda.Event | None) -> None:
        self.begin, self.end = begin, None

    @classmethod
    def start(cls, device: torch.device) -> "_GpuTimer":
        if device.type != "cuda":
            return cls(None)
        begin = torch.cuda.Event(enable_timing=True)
        begin.record()
        return cls(begin)

    def stop(self) -> None:
        if self.begin is not None:
            self.end = torch.cuda.Event(enable_timing=True)
            self.end.record()

    def elapsed_ms(self) -> float | None:
        if self.begin is None or self.end is None or not self.end.query():
            return None
        return self.begin.elapsed_time(self.end)


class LLMEngine:
    """Serves requests step by step. Invariant: every added request ends as exactly one
    ``RequestResult`` returned by ``step()``; with recording on, a result is returned only
    once its routing is final (``prompt_len + generated_len - 1`` rows)."""

    def __init__(self, model: MoEGPT, config: EngineConfig) -> None:
        self.model = model
        self.model_config = model.config
        self.config = config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_model_len = min(self.model_config.max_position_embeddings, config.kv_capacity_tokens)
        self.block_pool = BlockPool(config.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.kv_cache = KVCache(self.model_config, config.num_kv_blocks, config.block_size, self.dtype, self.device)
        self.scheduler = Scheduler(
            SchedulerConfig(max_requests=config.max_requests, max_step_tokens=config.max_step_tokens,
                            block_size=config.block_size, chunked_prefill=config.chunked_prefill),
            self.block_pool, on_preempt=self._on_preempt, on_finish=self._on_finish)
        self.batch = StepBatch(
            max_step_tokens=config.max_step_tokens, max_requests=config.max_requests,
            max_blocks_per_request=-(-self.max_model_len // config.block_size),
            block_size=config.block_size, dummy_block_id=self.kv_cache.dummy_block_id, device=self.device)
        self.sampler = Sampler(config.seed, self.device)
        self.recorder = self._make_recorder() if config.record_routing else None
        self.attention_fn = select_attention(self.device)
        if self.device.type == "cuda":
            from inference.kernels import moe_experts_grouped
            model.set_experts_fn(moe_experts_grouped)
        self.graph_runner = None
        if config.cuda_graphs or config.padded_decode:
            if config.cuda_graphs and self.device.type != "cuda":
                raise ValueError("cuda_graphs needs a CUDA device")
            self.graph_runner = DecodeGraphRunner(
                model, self.batch, self.kv_cache, self.recorder,
                max_batch=min(config.max_requests, config.cuda_graph_max_batch, config.max_step_tokens),
                use_graphs=config.cuda_graphs)
            self.graph_runner.capture()
        self.step_log = StepDetailsLog()
        self._step_index = 0
        self._start_time = time.perf_counter()
        self._arrivals = itertools.count()
        self._live_ids: set[str] = set()
        self._awaiting_routing: dict[str, RequestResult] = {}
        self._routing_start: dict[str, int] = {}
        self._phase = _PhaseTimes()
        self._to_reconstruct: list[tuple[str, list[int], int, int]] = []

    def _make_recorder(self):
        mc = self.model_config
        if mc.num_moe_layers == 0:
            raise ValueError(f"--record-routing: model {mc.name!r} has no MoE layers, so there is no routing to record")
        cls = RoutingRecorder if self.config.routing_recorder == "gpu" else HostSyncRecorder
        return cls(
            num_kv_blocks=self.config.num_kv_blocks, block_size=self.config.block_size,
            num_moe_layers=mc.num_moe_layers, topk=mc.topk, num_experts=mc.num_experts,
            max_step_tokens=self.config.max_step_tokens, device=self.device)

    # ---- requests -------------------------------------------------------------------
    def add_request(self, prompt_token_ids: Sequence[int], sampling_params: SamplingParams | None = None,
                    request_id: str | None = None, routing_start: int = 0) -> str:
        """Validate and queue a request; raises ``InvalidRequestError`` naming it when bad
        (nothing else is affected). ``routing_start`` > 0 returns only routing rows from that
        position on (multi-turn callers already hold the rows of earlier turns)."""
        arrival = next(self._arrivals)
        request_id = str(arrival) if request_id is None else str(request_id)
        params = sampling_params or SamplingParams()
        self._validate(request_id, prompt_token_ids, params)
        if isinstance(routing_start, bool) or not isinstance(routing_start, int) or not 0 <= routing_start <= len(prompt_token_ids):
            raise InvalidRequestError(
                f"routing_start={routing_start!r} must be an int in [0, prompt length {len(prompt_token_ids)}]", request_id)
        if routing_start:
            self._routing_start[request_id] = routing_start
        request = Request(request_id=request_id, prompt_token_ids=list(prompt_token_ids),
                          sampling_params=params, arrival_index=arrival)
        self._live_ids.add(request_id)
        self.scheduler.add(request)
        return request_id

    def _validate(self, request_id: str, prompt: Sequence[int], params: SamplingParams) -> None:
        if request_id in self._live_ids:
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
        params.validate(request_id)

    def abort(self, request_id: str) -> bool:
        request = self.scheduler.abort(request_id)
        if request is None:
            return False
        self._live_ids.discard(request_id)
        self._routing_start.pop(request_id, None)
        self.sampler.release(request_id)
        if self.recorder is not None:
            self.recorder.discard(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._awaiting_routing)

    # ---- the step -------------------------------------------------------------------
    def step(self) -> list[RequestResult]:
        """Schedule, run one forward, sample, and return the results that became final."""
        start = time.perf_counter()
        self._phase = _PhaseTimes()
        output = self.scheduler.schedule()
        finished: list[RequestResult] = []
        prepared = None
        graph_size = self._graph_size(output)
        if output.chunks:
            prepared = self.batch.prepare(output.chunks, graph_size)
            timer = _GpuTimer.start(self.device)
            sampled = (self._graph_forward_and_sample(prepared, graph_size, timer) if graph_size
                       else self._forward_and_sample(prepared, timer))
            for request in self.scheduler.update(output, sampled, self._eos(), self.max_model_len):
                finished.append(self._finish(request))
            if self.recorder is not None:
                self._reconstruct_finished()
        ready = [r for r in finished if r.request_id not in self._awaiting_routing]
        ready += self._finalize_routing()
        if output.chunks or output.preempted:
            gpu_ms = timer.elapsed_ms() if output.chunks else None
            self._record_step(output, prepared, (time.perf_counter() - start) * 1e3, graph_size is not None, gpu_ms)
        return ready

    def _graph_size(self, output: SchedulerOutput) -> int | None:
        """Padded batch size when this step can run as a decode graph, else None."""
        runner = self.graph_runner
        if runner is None or not output.chunks or len(output.chunks) > runner.max_batch:
            return None
        if not all(c.num_tokens == 1 and c.samples for c in output.chunks):
            return None
        return runner.padded_size(len(output.chunks))

    def _graph_forward_and_sample(self, prepared: PreparedStep, size: int, timer: "_GpuTimer") -> dict[str, int]:
        logits = self.graph_runner.run(size, len(prepared.sampling_chunks))
        timer.stop()
        if self.recorder is not None and not self.graph_runner.gather_in_graph:
            t = time.perf_counter()
            self.recorder.gather(prepared.token_to_block, prepared.token_to_offset)
            self._phase.gather += (time.perf_counter() - t) * 1e3
        requests = [c.request for c in prepared.sampling_chunks]
        with torch.inference_mode():
            tokens = self.sampler.sample(logits, requests)
        return {r.request_id: t for r, t in zip(requests, tokens)}

    def _forward_and_sample(self, prepared: PreparedStep, timer: "_GpuTimer") -> dict[str, int]:
        recorder = self.recorder
        staging = recorder.staging[: prepared.num_padded_tokens] if recorder is not None else None
        ctx = ForwardContext(prepared.attn, self.kv_cache.per_layer, self.attention_fn, staging)
        with torch.inference_mode():
            hidden = self.model(prepared.input_ids, prepared.positions, ctx)
            if recorder is not None:
                t = time.perf_counter()
                recorder.gather(prepared.token_to_block, prepared.token_to_offset)
                self._phase.gather += (time.perf_counter() - t) * 1e3
            if not prepared.sampling_chunks:
                timer.stop()
                return {}
            logits = self.model.compute_logits(hidden.index_select(0, prepared.logits_indices))
            timer.stop()
            requests = [c.request for c in prepared.sampling_chunks]
            tokens = self.sampler.sample(logits, requests)
        return {r.request_id: t for r, t in zip(requests, tokens)}

    def _eos(self) -> int | None:
        return self.model_config.eos_token_id

    def _finish(self, request: Request) -> RequestResult:
        result = RequestResult.from_request(request)
        start = self._routing_start.pop(request.request_id, 0)
        result.routing_start = start if self.recorder is not None else 0
        self.sampler.release(request.request_id)
        self._live_ids.discard(request.request_id)
        if self.recorder is not None:
            self._awaiting_routing[request.request_id] = result
        return result

    # ---- routing hooks (called by the scheduler before blocks are freed) ------------------
    def _on_preempt(self, request: Request) -> None:
        if self.recorder is not None and request.num_computed_tokens > 0:
            t = time.perf_counter()
            self.recorder.snapshot_preempted(request.request_id, request.block_ids, request.num_computed_tokens)
            self._phase.store += (time.perf_counter() - t) * 1e3

    def _on_finish(self, request: Request) -> None:
        if self.recorder is not None:
            # Batched into one gather per step (_reconstruct_finished), still before any
            # later forward can write into these blocks.
            start = self._routing_start.get(request.request_id, 0)
            self._to_reconstruct.append((request.request_id, list(request.block_ids), request.num_tokens - 1, start))

    def _reconstruct_finished(self) -> None:
        if self._to_reconstruct:
            t = time.perf_counter()
            self.recorder.reconstruct_many(self._to_reconstruct)
            self._to_reconstruct = []
            self._phase.reconstruct += (time.perf_counter() - t) * 1e3

    def _finalize_routing(self, wait: bool = False) -> list[RequestResult]:
        if self.recorder is None or not self._awaiting_routing:
            return []
        t = time.perf_counter()
        done = self.recorder.wait_all() if wait else self.recorder.poll()
        ready = []
        for key, routing in done.items():
            result = self._awaiting_routing.pop(key, None)
            if result is not None:
                result.routing = routing
                ready.append(result)
        self._phase.finalize += (time.perf_counter() - t) * 1e3
        return ready

    def _record_step(self, output: SchedulerOutput, prepared: PreparedStep | None, step_ms: float,
                     cuda_graph: bool, gpu_ms: float | None) -> None:
        chunks = output.chunks
        decode = [c for c in chunks if output.is_decode(c)]
        self.step_log.record({
            "step": self._step_index,
            "prefill_requests": len(chunks) - len(decode),
            "decode_requests": len(decode),
            "active_tokens": prepared.num_tokens if prepared else 0,
            "padded_tokens": prepared.num_padded_tokens if prepared else 0,
            "cuda_graph": cuda_graph and self.config.cuda_graphs,
            "step_time_ms": step_ms,
            "routing_gather_ms": self._phase.gather,
            "routing_store_ms": self._phase.store,
            "routing_reconstruct_ms": self._phase.reconstruct,
            "routing_finalize_ms": self._phase.finalize,
            "prefill_tokens": sum(c.num_tokens for c in chunks) - len(decode),
            "decode_tokens": len(decode),
            "finished_requests": sum(1 for c in chunks if c.request.is_finished),
            "preempted_requests": len(output.preempted),
            "time_s": time.perf_counter() - self._start_time,
            **({"gpu_forward_ms": gpu_ms} if gpu_ms is not None else {}),
        })
        self._step_index += 1

    # ---- batch API ------------------------------------------------------------------
    def generate(self, prompts: Iterable[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 request_ids: Sequence[str] | None = None,
                 on_result: Callable[[RequestResult], None] | None = None,
                 routing_starts: Sequence[int] | None = None) -> list[RequestResult]:
        """Serve ``prompts`` to completion; results come back in input order. A bad prompt
        yields a result with ``finish_reason == "error"`` and the others are served."""
        prompts = list(prompts)
        params = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                  else [sampling_params] * len(prompts))
        ids = [str(i) for i in (request_ids if request_ids is not None else
                                (next(self._arrivals) for _ in prompts))]
        if len(set(ids)) != len(ids):
            raise ValueError("generate: request_ids must be unique")
        starts = list(routing_starts) if routing_starts is not None else [0] * len(prompts)
        results: dict[str, RequestResult] = {}
        for rid, prompt, p, start in zip(ids, prompts, params, starts):
            try:
                self.add_request(prompt, p, rid, routing_start=start)
            except InvalidRequestError as exc:
                results[rid] = RequestResult.failed(rid, list(prompt) if isinstance(prompt, (list, tuple)) else [], str(exc))
                if on_result:
                    on_result(results[rid])
        while self.has_unfinished():
            done = self.step()
            if not done and not self.scheduler.has_unfinished():
                done = self._finalize_routing(wait=True)
            for r in done:
                results[r.request_id] = r
                if on_result:
                    on_result(r)
        return [results[rid] for rid in ids]
