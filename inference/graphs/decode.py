"""Decode steps as CUDA graphs captured for a ladder of padded batch sizes.

Every input a graph reads is a static tensor of the ``StepBatch`` (updated in place each
step) or the recorder's staging tensor; padding rows write KV and routing into the dummy
block. With a graph-safe recorder the routing scatter into ``block_routing`` is captured
in the graph too, so recording adds no host work to graph steps. Hybrid models' recurrent
layers read and write their state slots through the batch's static ``state_slots`` (padding
rows: the state pool's dummy slot), and the pool's tensors never move, so a graph stays
valid as slots change hands.
"""

from __future__ import annotations

import torch

from inference.attention_backends import DecodeBackend
from inference.cache.kv_cache import KVCache
from inference.model import AttentionMetadata, ForwardContext, MoEGPT
from inference.model.recurrent import RecurrentMetadata
from inference.step_batch import StepBatch

DEFAULT_LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphRunner:
    """Runs padded decode forwards; ``use_graphs=False`` runs the same static-tensor path
    eagerly (CPU tests exercise the padding logic that graphs rely on). Invariant: for a
    padded size B, the forward reads rows [0, B) of the static tensors only and leaves its
    logits in ``self._logits[B]`` until the next run of that size."""

    def __init__(self, model: MoEGPT, batch: StepBatch, kv_cache: KVCache, recorder,
                 max_batch: int, use_graphs: bool, recurrent_states=None,
                 attention: DecodeBackend | None = None) -> None:
        """``recurrent_states``: hybrid models' ``ForwardContext.recurrent_states`` (the
        state pool's per-layer tensors), with the batch's ``state_slots`` tensors.
        ``attention``: the decode backend the graphs capture (default ``DecodeBackend()``)."""
        self.model, self.batch, self.kv_cache, self.recorder = model, batch, kv_cache, recorder
        self.attention = attention if attention is not None else DecodeBackend()
        self.recurrent_states = recurrent_states
        self.use_graphs = use_graphs
        self.sizes = tuple(s for s in DEFAULT_LADDER if s < max_batch) + (max_batch,)
        self.gather_in_graph = recorder is not None and getattr(recorder, "graph_safe", True)
        # A tensor-parallel forward captures NCCL collectives; NCCL's watchdog thread queries
        # events meanwhile, which "global" capture mode would turn into a capture error.
        self.capture_error_mode = "thread_local" if getattr(model, "parallel", None) is not None else "global"
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def padded_size(self, num_requests: int) -> int | None:
        return next((s for s in self.sizes if s >= num_requests), None)

    def _forward(self, size: int) -> torch.Tensor:
        b = self.batch
        meta = AttentionMetadata(
            slot_mapping=b.slot_mapping[:size], block_tables=b.block_tables[:size],
            query_start_loc=b.query_start_loc[: size + 1], seq_lens=b.seq_lens[:size],
            query_start_loc_host=[], seq_lens_host=[], max_query_len=1, max_seq_len=0, decode_only=True)
        staging = self.recorder.staging[:size] if self.recorder is not None else None
        recurrent = None
        if self.recurrent_states is not None:
            # Row r is sequence r (one token each); host lists are only read off the decode path.
            recurrent = RecurrentMetadata(
                query_start_loc=b.query_start_loc[: size + 1], state_slots=b.state_slots[:size],
                has_initial_state=b.has_initial_state[:size], query_start_loc_host=list(range(size + 1)),
                state_slots_host=[], has_initial_state_host=[], decode_only=True)
        ctx = ForwardContext(meta, self.kv_cache.per_layer, self.attention, staging, recurrent=recurrent,
                             recurrent_states=self.recurrent_states)
        hidden = self.model(b.input_ids[:size], b.positions[:size], ctx)
        if self.gather_in_graph:
            self.recorder.gather(b.token_to_block[:size], b.token_to_offset[:size])
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every ladder size, largest first, in one shared memory pool."""
        if not self.use_graphs:
            return
        self.batch.point_at_dummy_block()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):      # warm up: Triton compiles, allocator settles
                self._forward(size)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        for size in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode=self.capture_error_mode):
                self._logits[size] = self._forward(size)
            self._graphs[size] = graph
        torch.cuda.synchronize()

    def release(self) -> None:
        """Drop every captured graph and its outputs; the shared memory pool is freed with
        the last graph that uses it."""
        for graph in self._graphs.values():
            graph.reset()
        self._graphs.clear()
        self._logits.clear()

    @torch.inference_mode()
    def run(self, size: int, num_rows: int) -> torch.Tensor:
        """Logits [num_rows, V] of a prepared decode step padded to ``size`` rows."""
        if self.use_graphs:
            self._graphs[size].replay()
            logits = self._logits[size]
        else:
            logits = self._forward(size)
        return logits[:num_rows]
