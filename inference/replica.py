"""Keeping the ranks of a tensor/expert-parallel replica in step.

Every rank of a replica runs its own ``LLMEngine`` (scheduler, block pool, sampler) over
the same requests, and they all compute the same schedule: nothing is broadcast per step.
Why not "rank 0 schedules, the others receive the step's inputs": the inputs already come
from deterministic host state that every rank has (the requests, in one order, and the
sampled tokens, which are bit-identical on every rank because the vocabulary-parallel
logits are all-gathered and every request samples from its own seeded generator). A
broadcast would add a host round trip to every step (the step pipeline's host runs one step
ahead of the GPU and never waits for another process) and a second copy of every
step-input tensor; computing the schedule costs each rank what it costs rank 0 anyway.

What can break determinism is the caller giving ranks different requests, or different
numerics on one rank. ``ReplicaSync`` guards against both: it folds every added request,
every launched step's schedule (chunks, block ids, preemptions) and every completed step's
sampled tokens into a running digest, and every ``check_every`` launched steps all-gathers
the digests over the replica through a gloo group (host memory: no device sync) and raises
``ReplicaDivergenceError`` on every rank if they differ, before the step's forward runs
(so a divergence is an error, not a collective hang). The same exchange carries each
rank's stop request (a signal delivered to one rank only), so a replica stops at one
step on all its ranks.

Steps that schedule nothing launch nothing and take no step index on any rank: a replica
leader may call ``step()`` more often than its peers (it waits for routing copies that only
it makes), which must not shift the checks.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from inference.request import Request


class ReplicaDivergenceError(RuntimeError):
    """The ranks of a replica no longer agree on what they serve (different requests were
    given to them, or one rank computed different tokens)."""


class ReplicaSync:
    """The replica's agreement checks, seen from one rank. Invariant: the digest folds in,
    in call order, every ``on_add``, ``on_schedule`` and ``on_complete``; ranks that were
    given the same requests and computed the same tokens hold the same digest at every
    step index, and a check happens exactly at launched-step indices ``i`` with
    ``i % check_every == 0``, on every rank of the replica."""

    def __init__(self, group, tp_rank: int, tp_size: int, dp_rank: int, check_every: int) -> None:
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"replica check interval must be an int >= 1, got {check_every!r}")
        self.group, self.tp_rank, self.tp_size, self.dp_rank = group, tp_rank, tp_size, dp_rank
        self.check_every = check_every
        self.stop_source: Callable[[], int] | None = None   # 0, or the signal number this rank received
        self.stop_signal = 0                                  # > 0 once the replica agreed to stop
        self.num_checks = 0
        self._digest = hashlib.blake2b(digest_size=8)

    @classmethod
    def build(cls, groups, check_every: int) -> "ReplicaSync":
        """Create the replica's host (gloo) group; every rank of the world calls this, in
        the same order (group creation is collective over the world)."""
        layout, coords = groups.layout, groups.coords
        group, _ = dist.new_subgroups_by_enumeration(layout.tp_groups(), backend="gloo")
        return cls(group, coords.tp_rank, layout.tp, coords.dp_rank, check_every)

    def _fold(self, values: list[int]) -> None:
        self._digest.update(np.asarray(values, dtype=np.int64).tobytes())

    def on_add(self, request: Request) -> None:
        params = request.sampling_params
        self._fold([-1, request.arrival_index, params.max_new_tokens, *request.prompt_token_ids])

    def on_schedule(self, index: int, output) -> None:
        """Fold in step ``index``'s schedule, then check at the interval (before launch)."""
        values = [-2, index]
        for chunk in output.chunks:
            blocks = chunk.request.block_ids
            values += [chunk.request.arrival_index, chunk.start, chunk.num_tokens, chunk.samples,
                       len(blocks), blocks[-1] if blocks else -1]
        values += [-3] + [r.arrival_index for r in output.preempted]
        self._fold(values)
        if index % self.check_every == 0:
            self.check(index)

    def on_complete(self, index: int, tokens: torch.Tensor | None) -> None:
        """Fold in the tokens step ``index`` sampled (host memory, already waited for)."""
        self._fold([-4, index])
        if tokens is not None:
            self._digest.update(tokens.numpy().tobytes())

    def check(self, index: int) -> None:
        """All-gather (digest, step, stop signal) over the replica; raise on disagreement."""
        stop = int(self.stop_source() or 0) if self.stop_source is not None else 0
        mine = torch.tensor([int.from_bytes(self._digest.digest(), "little", signed=True), index, stop],
                            dtype=torch.int64)
        gathered = [torch.empty_like(mine) for _ in range(self.tp_size)]
        dist.all_gather(gathered, mine, group=self.group)
        self.num_checks += 1
        rows = [t.tolist() for t in gathered]
        if any(r[:2] != rows[0][:2] for r in rows):
            raise ReplicaDivergenceError(
                f"replica {self.dp_rank}: its {self.tp_size} tensor-parallel ranks diverged by step {index} "
                f"(digest, step per tp rank: {[r[:2] for r in rows]}); every rank of a replica must be given the "
                f"same requests in the same order, and compute bit-identical logits")
        self.stop_signal = self.stop_signal or max(r[2] for r in rows)
