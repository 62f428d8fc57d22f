"""Running megatron-core 0.16 in our tests and tools: attention masks and position ids in its
conventions, and the shims that let it run on CPU over gloo (one process, or the ranks of
a tensor/expert-parallel layout). megatron-core is imported lazily."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Iterator
from unittest import mock

import torch

if TYPE_CHECKING:
    from inference.parallel import ParallelLayout


def causal_mask(batch: int, seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Megatron's boolean attention mask [batch, 1, seq, seq] (True = masked)."""
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)
    return mask.expand(batch, 1, seq_len, seq_len)


def packed_causal_mask(cu_seqlens: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """[1, 1, T, T] mask of packed sequences (block-diagonal causal): the local spec has no
    THD kernel, so packing is expressed as a mask over one [T, 1] batch, the same token
    order a THD forward routes."""
    total = cu_seqlens[-1]
    seq_id = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), torch.diff(torch.tensor(cu_seqlens)))
    same = seq_id[:, None] == seq_id[None, :]
    allowed = same & torch.ones(total, total, dtype=torch.bool).tril()
    return (~allowed).to(device).view(1, 1, total, total)


def packed_position_ids(cu_seqlens: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """[1, T] positions restarting at 0 at every packed sequence."""
    return torch.cat([torch.arange(b - a) for a, b in zip(cu_seqlens, cu_seqlens[1:])]).to(device).view(1, -1)


def _window_mask_cpu(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
    """megatron's ``get_sliding_window_causal_mask`` (True = masked), on the CPU."""
    m = torch.ones(sq, skv, dtype=torch.bool)
    return ~torch.tril(torch.triu(m, diagonal=skv - sq - window_size[0]), diagonal=skv - sq + window_size[1])


def _torch_norm(cls, config, hidden_size: int, eps: float = 1e-5, **_unused: Any) -> torch.nn.Module:
    """megatron's ``WrappedTorchNorm`` (the local spec's norm without Apex or Transformer
    Engine) without its refusal of sequence parallelism: a norm is per token, so it computes
    the same on a rank's sequence slice; its weights carry ``sequence_parallel`` as megatron's
    fused norms set it (their gradients are then all-reduced over TP by megatron)."""
    norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
    norm = norm_cls(normalized_shape=hidden_size, eps=eps)
    for p in norm.parameters():
        setattr(p, "sequence_parallel", config.sequence_parallel)
    return norm


class _NoOpRngTracker:
    """Stands in for megatron's CUDA RNG tracker on CPU: dropout is off, so forking an RNG
    stream has nothing to protect. Invariant: holds no state."""

    def fork(self, name: str = "") -> Any:
        return nullcontext()

    def get_states(self) -> dict:
        return {}

    def set_states(self, states: dict) -> None:
        pass

    def add(self, name: str, seed: int) -> None:
        pass

    def is_initialized(self) -> bool:
        return True


@contextmanager
def cpu_megatron_runtime(layout: "ParallelLayout | None" = None) -> Iterator[None]:
    """Run megatron-core 0.16 on CPU in this process: a gloo process group of one rank
    (in-process store: no port, so concurrent runs cannot collide) unless one exists,
    model-parallel state of size 1 (or ``layout``'s groups, over the existing world:
    ``megatron_parallel_kwargs``), and patches (undone on exit) for its CUDA assumptions:
    ``torch.cuda.current_device`` (router buffers), the CUDA RNG tracker (attention
    dropout fork, activation-recompute RNG save/restore), the missing TE router GEMM name (``moe_utils.te_general_gemm``, undefined without
    Transformer Engine, read by the fp32 router), the torch norm's refusal of sequence
    parallelism (``_torch_norm``) and the sliding-window mask that is built on
    ``device="cuda"``."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import torch_norm
    from megatron.core.transformer.moe import moe_utils

    created_group = not dist.is_initialized()
    if created_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.cuda, "current_device", lambda: "cpu"))
        stack.enter_context(mock.patch.object(mrandom, "_CUDA_RNG_STATE_TRACKER", _NoOpRngTracker()))
        stack.enter_context(mock.patch.object(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True))
        stack.enter_context(mock.patch.object(mrandom, "_get_cuda_rng_state", lambda *a, **k: None))
        stack.enter_context(mock.patch.object(mrandom, "_set_cuda_rng_state", lambda *a, **k: None))
        stack.enter_context(mock.patch.object(moe_utils, "te_general_gemm", None, create=True))
        stack.enter_context(mock.patch.object(torch_norm.WrappedTorchNorm, "__new__", _torch_norm))
        if hasattr(fused_softmax, "get_sliding_window_causal_mask"):
            stack.enter_context(mock.patch.object(fused_softmax, "get_sliding_window_causal_mask", _window_mask_cpu))
        created_state = not parallel_state.model_parallel_is_initialized()
        if created_state:
            from inference.parallel.megatron_layout import megatron_parallel_kwargs
            kwargs = megatron_parallel_kwargs(layout) if layout is not None else dict(tensor_model_parallel_size=1)
            parallel_state.initialize_model_parallel(**kwargs)
        try:
            yield
        finally:
            if created_state:
                parallel_state.destroy_model_parallel()
            if created_group:
                dist.destroy_process_group()
