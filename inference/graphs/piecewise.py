"""Prefill and mixed steps as piecewise CUDA graphs: everything but attention is captured.

A step that carries prefill chunks cannot replay a decode graph: its attention depends on
host-side lengths (how many query rows each request has, how far its context reaches). The
rest of the forward (norms, projections, rotary, KV writes, the router and the routed
experts, routing capture, residual adds) depends only on the number of token rows. So for a
ladder of padded token counts the forward is captured as a chain of graphs, cut at every
attention call: ``piece 0, attention 0, piece 1, ..., attention L-1, piece L``. A replay runs
the pieces, and between them each layer's attention eagerly, with this step's metadata.
On a 48-layer model that is 49 graph launches and 48 attention calls instead of ~2,000
kernel launches from Python, which is what makes an eager mixed step several times slower
than a decode step of the same batch (the host, not the GPU, sets its pace).

How the cut works: the capture runs the model's ordinary paged forward with an attention
backend (``_CuttingBackend``) whose ``attend`` ends the graph being captured, notes the
call (its inputs are static from then on), starts the next graph and returns a static
output buffer. Piece i copies its query rows into a static ``q`` buffer before it ends;
the attention call of the replay reads that buffer and writes the static output that piece
i + 1 reads. K/V writes stay inside the pieces (their slot mapping is a static tensor).
Every chain shares one memory pool with the others, and chains are replayed one whole
chain at a time in capture order, which is what sharing a pool requires.

Invariants: a chain of size S reads rows [0, S) of the step batch's static token tensors
(padding rows point at the dummy block and route into the staging rows past the step's
tokens, which the gather sends to the dummy block); between two pieces exactly one
attention call runs, reading ``q[:S]`` and writing ``out[:S]`` (padding rows zero); the
chain's final hidden states stay in ``hidden[S]`` until the next replay of that size.
Models with recurrent layers are not captured (their prefill loops over sequences on the
host).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inference.model import AttentionMetadata, ForwardContext, MoEGPT
from inference.model.context import AttentionBackend
from inference.step_batch import StepBatch

DEFAULT_TOKEN_LADDER = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


@dataclass
class _AttentionCall:
    """One attention call between two pieces: which backend method, its static inputs."""

    latent: bool
    q: torch.Tensor                     # static [S, heads, d], written by the piece before
    out: torch.Tensor                   # static [S, heads, dv], read by the piece after
    args: tuple

    def run(self, backend: AttentionBackend, meta: AttentionMetadata) -> None:
        if self.latent:
            cache, scale, latent_dim = self.args
            result = backend.attend_latent(self.q, cache, meta, scale, latent_dim)
        else:
            k_cache, v_cache, scale, window, sinks = self.args
            result = backend.attend(self.q, k_cache, v_cache, meta, scale, window, sinks)
        self.out.copy_(result)


@dataclass
class _Chain:
    pieces: list[torch.cuda.CUDAGraph] = field(default_factory=list)
    calls: list[_AttentionCall] = field(default_factory=list)
    hidden: torch.Tensor | None = None


class _CuttingBackend(AttentionBackend):
    """The attention backend of a capture: every call ends the current piece and starts
    the next (``capture is None``: a warm-up run that only sizes the static buffers)."""

    def __init__(self, runner: "PiecewiseGraphRunner", size: int, capture: "_Capture | None") -> None:
        self.runner, self.size, self.capture = runner, size, capture

    def attend(self, q, k_cache, v_cache, meta, scale, window=0, sinks=None):
        return self._cut(False, q, v_cache.shape[-1], (k_cache, v_cache, scale, window, sinks))

    def attend_latent(self, q, cache, meta, scale, latent_dim):
        return self._cut(True, q, latent_dim, (cache, scale, latent_dim))

    def _cut(self, latent: bool, q: torch.Tensor, value_dim: int, args: tuple) -> torch.Tensor:
        q_buf = self.runner.buffer("q", q.shape[1:], q.dtype)[: self.size]
        out = self.runner.buffer("out", (q.shape[1], value_dim), q.dtype)[: self.size]
        q_buf.copy_(q)
        if self.capture is not None:
            self.capture.cut(_AttentionCall(latent, q_buf, out, args))
        return out


class _Capture:
    """The chain being captured: ``cut`` closes the current piece and opens the next."""

    def __init__(self, pool, mode: str) -> None:
        self.pool, self.mode = pool, mode
        self.chain = _Chain()
        self._open()

    def _open(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool, capture_error_mode=self.mode)
        self.chain.pieces.append(graph)

    def cut(self, call: _AttentionCall) -> None:
        self.chain.pieces[-1].capture_end()
        self.chain.calls.append(call)
        self._open()

    def close(self, hidden: torch.Tensor) -> _Chain:
        self.chain.pieces[-1].capture_end()
        self.chain.hidden = hidden
        return self.chain


class PiecewiseGraphRunner:
    """Runs the forward of steps with prefill chunks, padded to a ladder of token counts.
    ``use_graphs=False`` runs the same padded static-tensor path eagerly with the real
    attention backend (CPU tests cover the padding that the graphs rely on)."""

    def __init__(self, model: MoEGPT, batch: StepBatch, kv_cache, recorder, attention: AttentionBackend,
                 max_tokens: int, use_graphs: bool) -> None:
        if model.config.is_hybrid:
            raise ValueError("piecewise graphs: models with recurrent layers are not captured")
        self.model, self.batch, self.kv_cache, self.recorder = model, batch, kv_cache, recorder
        self.attention, self.use_graphs = attention, use_graphs
        self.sizes = tuple(s for s in DEFAULT_TOKEN_LADDER if s < max_tokens) + (max_tokens,)
        self.gather_in_graph = recorder is not None and getattr(recorder, "graph_safe", True)
        self.capture_error_mode = "thread_local" if getattr(model, "parallel", None) is not None else "global"
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._chains: dict[int, _Chain] = {}

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]

    def padded_size(self, num_tokens: int) -> int | None:
        return next((s for s in self.sizes if s >= num_tokens), None)

    def buffer(self, role: str, row_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A static [max_tokens, *row_shape] tensor shared by every layer and chain (the
        attention calls of a chain run one after another, each done with its buffers
        before the next piece writes them)."""
        key = (role, tuple(row_shape), dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.zeros(self.max_tokens, *row_shape, dtype=dtype, device=self.batch.device)
        return self._buffers[key]

    def _forward(self, size: int, backend: AttentionBackend, meta: AttentionMetadata) -> torch.Tensor:
        b = self.batch
        staging = self.recorder.staging[:size] if self.recorder is not None else None
        ctx = ForwardContext(meta, self.kv_cache.per_layer, backend, staging)
        hidden = self.model(b.input_ids[:size], b.positions[:size], ctx)
        if self.gather_in_graph:
            self.recorder.gather(b.token_to_block[:size], b.token_to_offset[:size])
        return hidden

    def _capture_meta(self, size: int) -> AttentionMetadata:
        """What the captured pieces read of the metadata: the static slot mapping only."""
        b = self.batch
        return AttentionMetadata(slot_mapping=b.slot_mapping[:size], block_tables=b.block_tables[:0],
                                 query_start_loc=b.query_start_loc[:1], seq_lens=b.seq_lens[:0],
                                 query_start_loc_host=[0], seq_lens_host=[], max_query_len=0, max_seq_len=0,
                                 decode_only=False)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture a chain per ladder size, largest first, in one shared memory pool."""
        if not self.use_graphs:
            return
        self.batch.point_at_dummy_block()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):      # warm up: Triton compiles, buffers are sized
                self._forward(size, _CuttingBackend(self, size, None), self._capture_meta(size))
            torch.cuda.synchronize()
            for size in reversed(self.sizes):
                capture = _Capture(pool, self.capture_error_mode)
                hidden = self._forward(size, _CuttingBackend(self, size, capture), self._capture_meta(size))
                self._chains[size] = capture.close(hidden)
            # The first launch of a graph uploads it (measured: ~0.3 s for a 16-layer
            # model's chains, paid by the first real step otherwise). Pieces only: every
            # row still reads and writes the dummy block.
            for size in reversed(self.sizes):
                for piece in self._chains[size].pieces:
                    piece.replay()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def release(self) -> None:
        for chain in self._chains.values():
            for piece in chain.pieces:
                piece.reset()
        self._chains.clear()
        self._buffers.clear()

    @property
    def num_graphs(self) -> int:
        return sum(len(c.pieces) for c in self._chains.values())

    @torch.inference_mode()
    def run(self, size: int, meta: AttentionMetadata) -> torch.Tensor:
        """Final hidden states [size, H] of a prepared step padded to ``size`` token rows
        (``meta``: the step's own metadata, whose slot mapping covers ``size`` rows)."""
        if not self.use_graphs:
            return self._forward(size, self.attention, meta)
        chain = self._chains[size]
        for piece, call in zip(chain.pieces, chain.calls):
            piece.replay()
            call.run(self.attention, meta)
        chain.pieces[-1].replay()
        return chain.hidden
