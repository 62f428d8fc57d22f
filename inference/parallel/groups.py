"""Process groups of a ``ParallelLayout`` and the few collectives the sharded layers use.

Groups are built once per process and passed to the layers explicitly (no module-level
state, no megatron-style global ``parallel_state``). The backend is the default process
group's (gloo on CPU, nccl on CUDA, as ``tools/run_setup.py`` initialises it) unless given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from inference.parallel.layout import ParallelLayout, RankCoords

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class GroupHandle:
    """One process group as seen from this rank: ``rank`` in ``[0, size)``. ``group`` is
    None for a size-1 group (collectives are the identity) or for a handle that only
    describes shards (building or loading without processes; collectives raise).
    Invariant: ``0 <= rank < size``."""

    rank: int
    size: int
    group: Any = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"group rank {self.rank} outside size {self.size}")

    def _require_group(self, what: str) -> None:
        if self.group is None:
            raise RuntimeError(f"{what} over a {self.size}-rank group without a process group "
                               "(built with ParallelGroups.shard_only: it can shard and load, not run)")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place; every rank gets the same values."""
        if self.size == 1:
            return x
        self._require_group("all_reduce")
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenation of every rank's ``x`` along ``dim`` in rank order."""
        if self.size == 1:
            return x
        self._require_group("all_gather")
        x = x.contiguous()
        # The concatenated output form (gloo accepts no other); torch < 2.13 calls it *_into_tensor.
        out = torch.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_single(out, x, group=self.group)
        return torch.cat(out.view(self.size, *x.shape).unbind(0), dim=dim)


def _handle(ranks_per_group: list[list[int]], rank: int, backend: str | None, build: bool) -> GroupHandle:
    size = len(ranks_per_group[0])
    mine = next(g for g in ranks_per_group if rank in g)
    if size == 1 or not build:
        return GroupHandle(mine.index(rank), size)
    # Every rank creates every group (new_group is collective over the world), in one order.
    group, _ = dist.new_subgroups_by_enumeration(ranks_per_group, backend=backend)
    return GroupHandle(mine.index(rank), size, group)


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's view of a layout: its coordinates and one handle per group kind.
    ``tp``: the replica (attention, dense MLPs, vocabulary, the MoE combine); ``ep``: ranks
    holding different experts; ``etp``: ranks splitting the same experts; ``dp``: the same
    position in every replica. Invariant: each handle's rank and size agree with
    ``layout.coords(coords.rank)``."""

    layout: ParallelLayout
    coords: RankCoords
    tp: GroupHandle
    ep: GroupHandle
    etp: GroupHandle
    dp: GroupHandle

    @property
    def replica_leader(self) -> int:
        """Global rank of this replica's leader (owns the recorder's host side and files)."""
        return self.layout.replica_leader(self.coords.dp_rank)

    @property
    def is_replica_leader(self) -> bool:
        return self.coords.rank == self.replica_leader

    @classmethod
    def build(cls, layout: ParallelLayout, backend: str | None = None) -> "ParallelGroups":
        """Create the process groups; every rank of the world must call this, in the same order."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelGroups.build needs torch.distributed initialised (torchrun)")
        if dist.get_world_size() != layout.world_size:
            raise ValueError(f"layout is for {layout.world_size} ranks, the world has {dist.get_world_size()}")
        return cls._make(layout, dist.get_rank(), backend, build=True)

    @classmethod
    def shard_only(cls, layout: ParallelLayout, rank: int) -> "ParallelGroups":
        """Handles without process groups: enough to build and load a rank's shards (memory
        plans, checkpoint tests), not to run collectives."""
        return cls._make(layout, rank, None, build=False)

    @classmethod
    def _make(cls, layout: ParallelLayout, rank: int, backend: str | None, build: bool) -> "ParallelGroups":
        coords = layout.coords(rank)
        return cls(layout, coords,
                   tp=_handle(layout.tp_groups(), rank, backend, build),
                   ep=_handle(layout.ep_groups(), rank, backend, build),
                   etp=_handle(layout.etp_groups(), rank, backend, build),
                   dp=_handle(layout.dp_groups(), rank, backend, build))
