"""Everything an engine allocates on its device, built together and released together:
the KV cache, the static step tensors and their pinned staging, the routing recorder's
buffers, the decode CUDA graphs, the runner that uses them and, for hybrid models, the
recurrent state pool and the prefix cache's state checkpoints. ``LLMEngine.sleep`` drops
it and ``wake_up`` builds it again; the model's weights are not part of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference.attention_backends import DecodeBackend
from inference.config import EngineConfig
from inference.graphs.decode import DecodeGraphRunner
from inference.errors import allocating
from inference.cache.kv_cache import KVCache
from inference.model import MoEGPT
from inference.model.context import AttentionFn
from inference.model_runner import ModelRunner
from inference.graphs.piecewise import PiecewiseGraphRunner
from inference.routing_collector import RoutingCollector
from inference.sampling import Sampler
from inference.cache.sequence_cache import SequenceCache
from inference.cache.state_checkpoints import CheckpointStore
from inference.cache.state_pool import StatePool
from inference.step_batch import StepBatch
from routing_replay import RoutingRecorder
from routing_replay.host_sync_recorder import HostSyncRecorder


@dataclass(eq=False)
class DeviceState:
    """Invariant: its members reference each other and nothing outside but the model, so
    dropping the object (after ``release``) frees all of its device memory at once."""

    kv_cache: KVCache
    batch: StepBatch
    recorder: object | None
    routing: RoutingCollector | None
    graph_runner: DecodeGraphRunner | None
    runner: ModelRunner
    piecewise_runner: PiecewiseGraphRunner | None = None
    state_pool: StatePool | None = None
    checkpoints: CheckpointStore | None = None

    @classmethod
    def build(cls, model: MoEGPT, config: EngineConfig, max_model_len: int, sampler: Sampler,
              attention_fn: AttentionFn, reads_routing: bool = True,
              sequence_cache: SequenceCache | None = None) -> "DeviceState":
        """``reads_routing`` False (a tensor-parallel rank that is not its replica's leader):
        the recorder's device buffers and writes exist, so every rank runs the same kernels
        and graphs, but no routing is read back (``routing`` is None). A hybrid model's
        ``sequence_cache`` (``HybridSequenceCache``) is attached to the state pool and
        checkpoint store built here."""
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        with allocating("KV cache", "lower num_kv_blocks (--num-kv-blocks / --kv-cache-memory)"):
            kv_cache = KVCache(model.attention_config, config.num_kv_blocks, config.block_size, dtype, device)
        pool = store = states = None
        if model.config.is_hybrid:
            with allocating("state pool", "lower max_requests (--max-requests)"):
                pool = StatePool.for_model(model.config, config.max_requests, dtype, device)
            with allocating("state checkpoints", "lower --state-checkpoints"):
                store = CheckpointStore.for_pool(pool, config.num_state_checkpoints)
            states = sequence_cache
            states.attach(pool, store)
        with allocating("step buffers"):
            batch = StepBatch(max_step_tokens=config.max_step_tokens, max_requests=config.max_requests,
                              max_blocks_per_request=-(-max_model_len // config.block_size),
                              block_size=config.block_size, dummy_block_id=kv_cache.dummy_block_id, device=device,
                              dummy_state_slot=pool.dummy_slot if pool is not None else None)
        recorder = None
        if config.record_routing:
            with allocating("routing buffer", "lower num_kv_blocks (--num-kv-blocks / --kv-cache-memory)"):
                recorder = _make_recorder(model, config, device)
        graph_runner = None
        if config.cuda_graphs or config.padded_decode:
            if config.cuda_graphs and device.type != "cuda":
                raise ValueError("cuda_graphs needs a CUDA device")
            graph_runner = DecodeGraphRunner(
                model, batch, kv_cache, recorder,
                max_batch=min(config.max_requests, config.cuda_graph_max_batch, config.max_step_tokens),
                use_graphs=config.cuda_graphs, recurrent_states=states.layer_states if states is not None else None,
                attention=DecodeBackend(config.decode_attention_mha_dot))
            if config.cuda_graphs and model.parallel is not None:
                _warm_collectives(model.parallel, device)
            with allocating("CUDA graphs", "lower max_requests (--max-requests) or turn graphs off (--no-cuda-graphs)"):
                graph_runner.capture()
        piecewise_runner = _piecewise_runner(model, config, batch, kv_cache, recorder, attention_fn)
        runner = ModelRunner(model, kv_cache, batch, sampler, attention_fn, recorder, graph_runner,
                             cuda_graphs=config.cuda_graphs, logprobs=config.compute_logprobs, states=states,
                             piecewise_runner=piecewise_runner)
        routing = RoutingCollector(recorder) if recorder is not None and reads_routing else None
        return cls(kv_cache, batch, recorder, routing, graph_runner, runner, piecewise_runner=piecewise_runner,
                   state_pool=pool, checkpoints=store)

    def release(self) -> None:
        """Drop the CUDA graphs (their memory pool goes with them); the caller drops the
        object, which frees every tensor. cuBLAS keeps a 32 MiB workspace for every stream
        it ran on (the graph warm-up stream included) for the life of the process: those
        are freed too (stream-ordered, so work still queued is safe), and come back lazily
        with the next matrix product."""
        if self.graph_runner is not None:
            self.graph_runner.release()
        if self.piecewise_runner is not None:
            self.piecewise_runner.release()
        clear_cublas_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if self.kv_cache.storage.is_cuda and clear_cublas_workspaces is not None:
            clear_cublas_workspaces()


def _piecewise_runner(model: MoEGPT, config: EngineConfig, batch: StepBatch, kv_cache: KVCache, recorder,
                      attention_fn: AttentionFn) -> PiecewiseGraphRunner | None:
    """The runner of mixed / prefill steps as piecewise graphs (captured here), or None."""
    graphs = config.piecewise_graphs
    if graphs is None:
        graphs = config.cuda_graphs and not model.config.is_hybrid
    if not (graphs or config.padded_prefill):
        return None
    runner = PiecewiseGraphRunner(model, batch, kv_cache, recorder, attention_fn,
                                  max_tokens=min(config.piecewise_max_tokens, config.max_step_tokens),
                                  use_graphs=graphs)
    with allocating("piecewise CUDA graphs", "lower --piecewise-max-tokens or turn them off (--no-piecewise-graphs)"):
        runner.capture()
    return runner


def _warm_collectives(parallel, device: torch.device) -> None:
    """Create the replica's NCCL communicator with the collectives the forward uses, before
    any graph capture (a communicator must not be created inside one)."""
    x = torch.zeros(8, device=device)
    parallel.tp.all_reduce(x)
    parallel.tp.all_gather(x)
    torch.cuda.synchronize(device)


def _make_recorder(model: MoEGPT, config: EngineConfig, device: torch.device):
    mc = model.config
    if mc.num_moe_layers == 0:
        raise ValueError(f"--record-routing: model {mc.name!r} has no MoE layers, so there is no routing to record")
    cls = RoutingRecorder if config.routing_recorder == "gpu" else HostSyncRecorder
    return cls(num_kv_blocks=config.num_kv_blocks, block_size=config.block_size, num_moe_layers=mc.num_moe_layers,
               topk=mc.topk, num_experts=mc.num_experts, max_step_tokens=config.max_step_tokens, device=device)
