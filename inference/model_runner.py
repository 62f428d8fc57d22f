"""Launching one scheduled step on the device, without waiting for it.

``ModelRunner.launch`` turns a ``SchedulerOutput`` into enqueued work on the compute stream
(inputs, forward as a decode graph or eagerly, routing gather, sampling, a non-blocking copy
of the sampled tokens into pinned memory) and returns a ``LaunchedStep`` that carries what
the step must hand back. Nothing here synchronises with the GPU: the only host wait is
``LaunchedStep.wait`` on a step's own done event, which the engine calls one step later
(asynchronous scheduling) or at once (synchronous).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inference.graphs.decode import DecodeGraphRunner
from inference.device_wait import wait_for_event
from inference.cache.kv_cache import KVCache
from inference.model import ForwardContext, MoEGPT
from inference.model.context import AttentionFn
from inference.graphs.piecewise import PiecewiseGraphRunner
from inference.prompt_logprobs import PromptLogprobPlan, compute_prompt_logprobs, plan_prompt_logprobs
from inference.request import Request
from inference.sampling import Sampler
from inference.scheduled_step import SchedulerOutput
from inference.step_batch import PreparedStep, StepBatch, TokenFeed
from routing_replay.phase_timer import PhaseTimer

_NEG_INF = float("-inf")


@dataclass
class GpuSpan:
    """CUDA events around a step's whole GPU work; read only once ``end`` completed."""

    begin: torch.cuda.Event
    forward_end: torch.cuda.Event
    end: torch.cuda.Event

    @classmethod
    def start(cls) -> "GpuSpan":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        events[0].record()
        return cls(*events)


@dataclass(eq=False)
class LaunchedStep:
    """A scheduled step whose device work has been enqueued.

    Invariant: until ``done`` has completed, everything the queued work reads or writes on
    the host (the ``host`` tensors) and every device tensor a later step may read from it
    (``tokens``, which feeds the next step's input ids) is referenced here; ``sample_rows``
    maps each sampling request to its row of ``tokens``. ``done is None`` on CPU, where the
    work has already run when ``launch`` returns.
    """

    index: int
    output: SchedulerOutput
    prepared: PreparedStep | None
    timer: PhaseTimer
    cuda_graph: bool = False
    piecewise_graph: bool = False      # a mixed / prefill step replayed as piecewise graphs
    sampling_requests: list[Request] = field(default_factory=list)
    tokens: torch.Tensor | None = None
    done: torch.cuda.Event | None = None
    gpu: GpuSpan | None = None
    sample_rows: dict[Request, int] = field(default_factory=dict)
    prompt_plan: PromptLogprobPlan | None = None
    device_out: dict[str, torch.Tensor] = field(default_factory=dict)   # what goes to the host
    host: dict[str, torch.Tensor] = field(default_factory=dict)         # its pinned copies
    num_finished: int = 0              # requests that finished when the step completed

    def is_done(self) -> bool:
        return self.done is None or self.done.query()

    def wait(self) -> None:
        if self.done is not None:
            wait_for_event(self.done)

    def sampled(self) -> dict[str, int]:
        """Request id -> sampled token; only once the step is done."""
        if "tokens" not in self.host:
            return {}
        values = self.host["tokens"].tolist()   # host memory: no device sync
        return {r.request_id: t for r, t in zip(self.sampling_requests, values)}

    def apply_logprobs(self) -> None:
        """Append each live sampling request's log-prob (and top-N) and store prompt
        log-probs; call once the step is done and before its tokens are applied (the extra
        token of a request that already finished is dropped with it)."""
        if "logprobs" in self.host:
            logprobs = self.host["logprobs"].tolist()
            top = (self.host["top_ids"].tolist(), self.host["top_logprobs"].tolist()) if "top_ids" in self.host else None
            for i, request in enumerate(self.sampling_requests):
                if request.is_finished:
                    continue
                request.output_logprobs.append(logprobs[i])
                n = request.sampling_params.logprobs
                if n:
                    # Most likely first: -inf entries (tokens top-k / top-p removed, in
                    # arbitrary order) end the list; the distribution has no more tokens.
                    request.output_top_logprobs.append([(t, v) for t, v in zip(top[0][i][:n], top[1][i][:n])
                                                        if v != _NEG_INF])
        if "prompt_logprobs" in self.host:
            for (request, position), value in zip(self.prompt_plan.owners, self.host["prompt_logprobs"].tolist()):
                if not request.is_finished:
                    request.prompt_logprobs[position] = value


class ModelRunner:
    """Prepares inputs, runs the forward and samples, for one step at a time. Invariant:
    ``launch`` never waits for the device; a step's pending input tokens are read on the
    device from the step launched just before it."""

    def __init__(self, model: MoEGPT, kv_cache: KVCache, batch: StepBatch, sampler: Sampler,
                 attention_fn: AttentionFn, recorder=None, graph_runner: DecodeGraphRunner | None = None,
                 cuda_graphs: bool = False, logprobs: bool = True, states=None,
                 piecewise_runner: PiecewiseGraphRunner | None = None) -> None:
        """``states``: a hybrid model's ``HybridSequenceCache`` (state slot per request,
        per-layer state tensors, checkpoint snapshots after each forward)."""
        self.model, self.kv_cache, self.batch, self.sampler = model, kv_cache, batch, sampler
        self.attention_fn, self.recorder, self.graph_runner = attention_fn, recorder, graph_runner
        self.piecewise_runner = piecewise_runner
        self.cuda_graphs, self.logprobs = cuda_graphs, logprobs
        self.states = states
        self.recurrent_states = states.layer_states if states is not None else None
        self.device = batch.device

    def graph_size(self, output: SchedulerOutput) -> int | None:
        """Padded batch size when this step can run as a decode graph, else None."""
        runner = self.graph_runner
        if runner is None or not output.chunks or len(output.chunks) > runner.max_batch:
            return None
        if not all(c.num_tokens == 1 and c.samples for c in output.chunks):
            return None
        return runner.padded_size(len(output.chunks))

    def piecewise_size(self, output: SchedulerOutput) -> int | None:
        """Padded token count when this step (one with a prefill chunk: decode-only steps
        keep their own path) runs as piecewise graphs, else None."""
        runner = self.piecewise_runner
        if runner is None or not any(c.num_tokens > 1 for c in output.chunks):
            return None
        return runner.padded_size(sum(c.num_tokens for c in output.chunks))

    @torch.inference_mode()
    def launch(self, index: int, output: SchedulerOutput, previous: LaunchedStep | None,
               timer: PhaseTimer) -> LaunchedStep:
        step = LaunchedStep(index=index, output=output, prepared=None, timer=timer)
        gpu = GpuSpan.start() if self.device.type == "cuda" else None
        size = self.graph_size(output)
        pieces = self.piecewise_size(output) if size is None else None
        t = timer.now()
        feed = TokenFeed(previous.tokens, previous.sample_rows) if previous is not None and previous.tokens is not None else None
        slots = [self.states.slot_of(c.request) for c in output.chunks] if self.states is not None else None
        step.prepared = prepared = self.batch.prepare(output.chunks, size or pieces, feed, timer, slots,
                                                      pad_requests=size is not None)
        t = timer.now()
        if size is not None:
            logits = self.graph_runner.run(size, len(prepared.sampling_chunks))
            step.cuda_graph = self.cuda_graphs
            if self.recorder is not None and not self.graph_runner.gather_in_graph:
                self.recorder.gather(prepared.token_to_block, prepared.token_to_offset, timer)
        elif pieces is not None:
            runner = self.piecewise_runner
            hidden = runner.run(pieces, prepared.attn)
            step.cuda_graph = step.piecewise_graph = runner.use_graphs
            if self.recorder is not None and not runner.gather_in_graph:
                self.recorder.gather(prepared.token_to_block, prepared.token_to_offset, timer)
            logits = self._logits(step, hidden)
        else:
            logits = self._eager_forward(step, timer)
        if self.states is not None:
            self.states.after_forward(output.chunks)     # checkpoint snapshots, after the forward
        if gpu is not None:
            gpu.forward_end.record()
        t = timer.lap("stage_launch", "forward", t)
        if prepared.sampling_chunks:
            step.sampling_requests = [c.request for c in prepared.sampling_chunks]
            step.sample_rows = {r: i for i, r in enumerate(step.sampling_requests)}
            positions = [c.start + c.num_tokens for c in prepared.sampling_chunks]   # of the sampled tokens
            sampled = self.sampler.sample(logits, step.sampling_requests, positions, logprobs=self.logprobs)
            step.tokens = sampled.tokens
            step.device_out.update((k, v) for k, v in (("tokens", sampled.tokens), ("logprobs", sampled.logprobs),
                                                      ("top_ids", sampled.top_ids),
                                                      ("top_logprobs", sampled.top_logprobs)) if v is not None)
        t = timer.lap("stage_launch", "sample", t)
        step.gpu = gpu
        self._copy_tokens_to_host(step)
        timer.lap("stage_launch", "copy", t)
        return step

    def _eager_forward(self, step: LaunchedStep, timer: PhaseTimer) -> torch.Tensor | None:
        prepared, recorder = step.prepared, self.recorder
        staging = recorder.staging[: prepared.num_padded_tokens] if recorder is not None else None
        ctx = ForwardContext(prepared.attn, self.kv_cache.per_layer, self.attention_fn, staging,
                             recurrent=prepared.recurrent, recurrent_states=self.recurrent_states)
        hidden = self.model(prepared.input_ids, prepared.positions, ctx)
        if recorder is not None:
            recorder.gather(prepared.token_to_block, prepared.token_to_offset, timer)
        return self._logits(step, hidden)

    def _logits(self, step: LaunchedStep, hidden: torch.Tensor) -> torch.Tensor | None:
        """Prompt log-probs (if planned) and the logits of the sampled rows of ``hidden``."""
        prepared = step.prepared
        plan = plan_prompt_logprobs(step.output.chunks, prepared.attn.query_start_loc_host)
        if plan:
            step.prompt_plan = plan
            step.device_out["prompt_logprobs"] = compute_prompt_logprobs(self.model, hidden, plan)
        if not prepared.sampling_chunks:
            return None
        return self.model.compute_logits(hidden.index_select(0, prepared.logits_indices))

    def _copy_tokens_to_host(self, step: LaunchedStep) -> None:
        """Sampled tokens (and log-probs) into pinned memory, then the done event (recorded
        last, so every event of the step has completed once it has)."""
        if self.device.type != "cuda":
            step.host = step.device_out
            return
        for name, tensor in step.device_out.items():
            step.host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            step.host[name].copy_(tensor, non_blocking=True)
        if step.gpu is not None:
            step.gpu.end.record()
        step.done = torch.cuda.Event()
        step.done.record()

