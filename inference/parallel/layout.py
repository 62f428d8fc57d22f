"""Parallel layouts: how a world of ranks is split into tensor-, expert- and data-parallel parts.

The mapping (every rank computes it locally; nothing here talks to other processes):

- ``world = dp x tp``. Global rank ``rank = dp_rank * tp + tp_rank``: tensor parallelism is
  the innermost dimension, so a replica's ranks are consecutive (one node over NVLink when
  ``tp`` <= GPUs per node), as torchrun, vLLM, SGLang and megatron-core (``order="tp-..."``)
  lay them out. Replica ``dp_rank`` is the ranks ``dp_rank * tp .. dp_rank * tp + tp - 1``;
  its leader (the recorder's host side, result files) is ``dp_rank * tp``.
- Experts: ``ep`` must divide ``tp``: expert parallelism runs *inside* a replica. Within a
  replica ``tp_rank = ep_rank * etp + etp_rank`` with ``etp = tp / ep``; EP rank ``e`` owns
  the contiguous global experts ``[e * n / ep, (e + 1) * n / ep)`` and each of those
  experts' intermediate dimension is split over the ``etp`` ranks sharing ``ep_rank``
  (expert tensor parallelism). This is megatron-core's expert rank order ("tp-ep-dp" with
  ``expert_tensor_parallel_size = tp / ep``) and SGLang's ``moe_tp_size = tp / ep``;
  ``ep = tp`` is vLLM's ``--enable-expert-parallel`` with one replica.

Why EP may not span replicas: the activations of a replica are replicated over its TP
ranks, so inside a replica the MoE dispatch needs no communication (every rank already has
every token) and the combine is the replica's one all-reduce. EP across replicas would
make every MoE layer of every step a collective between replicas: replicas could no longer
schedule independently (vLLM's DP+EP pads idle replicas with dummy forwards for that), and
a replica's step, CUDA graph size and routing would depend on the others. Wide EP
(attention-DP + all-to-all) is a later layout, not this one.

Attention: ``tp`` must divide the query heads. KV heads are split when ``tp`` divides them;
when ``tp`` is a multiple of the KV heads, each KV head is replicated on ``tp / kv_heads``
consecutive ranks (vLLM's rule, so TP 8 works on a 4-KV-head model; megatron-core needs
``tp | kv_heads``, which ``megatron_compatible`` reports). Multi-head latent attention
(MLA) splits its heads the same way and replicates the latent KV cache on every TP rank
(every head reads the whole latent), as vLLM and SGLang do.

Hybrid models (``replicates_blocks``: recurrent mixers, per-layer MLP kinds, zero-centred
norms, relu^2 MLPs, attention without rotary; Qwen3-Next / Qwen3.5, Nemotron-H) split only
their MoE layers: every other block is replicated on the replica's ranks (recurrent mixers
and their state pool, attention with all KV heads and the whole KV cache, dense MLPs,
norms); the router is replicated, the experts expert-parallel as above and the shared
expert row-parallel over the replica, summed by the MoE block's one all-reduce. The
vocabulary-parallel embedding and head are kept (one all-reduce, one all-gather per step,
as for every TP model): replicating them would cost a 150k-row vocabulary twice per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inference.config import ModelConfig


class ParallelLayoutError(ValueError):
    """A layout that cannot be built, or cannot split a given model; lists every problem."""

    def __init__(self, what: str, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(f"{what}:\n  " + "\n  ".join(self.problems))


@dataclass(frozen=True)
class RankCoords:
    """Where one global rank sits: replica ``dp_rank``, position ``tp_rank`` inside it, and
    its expert coordinates. Invariant: ``tp_rank == ep_rank * etp + etp_rank``."""

    rank: int
    dp_rank: int
    tp_rank: int
    ep_rank: int
    etp_rank: int


@dataclass(frozen=True)
class HeadPartition:
    """The attention heads of one TP rank: query heads ``[q_start, q_stop)`` and KV heads
    ``[kv_start, kv_stop)`` (global head indices). ``kv_replicas`` ranks hold each KV head
    (1 when the KV heads are split). Invariant: this rank's query heads all read its KV heads."""

    q_start: int
    q_stop: int
    kv_start: int
    kv_stop: int
    kv_replicas: int

    @property
    def num_heads(self) -> int:
        return self.q_stop - self.q_start

    @property
    def num_kv_heads(self) -> int:
        return self.kv_stop - self.kv_start


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` when ``total`` splits evenly into ``parts``."""
    if parts < 1 or total % parts or not 0 <= index < parts:
        raise ValueError(f"cannot take part {index} of {total} split into {parts}")
    size = total // parts
    return index * size, (index + 1) * size


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 1) -> int:
    """The vocabulary rounded up so ``tp`` ranks get equal shards of a multiple of
    ``multiple`` rows (megatron-training pads to ``128 * tp``; 1 pads least)."""
    step = tp * multiple
    return -(-vocab_size // step) * step


def _positive(**values: int) -> list[str]:
    return [f"{name.replace('_', '-')} must be an int >= 1, got {v!r}"
            for name, v in values.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]


@dataclass(frozen=True)
class ParallelLayout:
    """``world_size`` ranks as ``dp`` replicas of ``tensor_parallel_size`` ranks, experts over
    ``expert_parallel_size`` of each replica's ranks (see the module docstring for the
    exact rank mapping). Invariant: ``world_size == dp * tp`` and ``tp == ep * etp``."""

    world_size: int
    tensor_parallel_size: int = 1
    expert_parallel_size: int = 1

    def __post_init__(self) -> None:
        w, t, e = self.world_size, self.tensor_parallel_size, self.expert_parallel_size
        problems = _positive(world_size=w, tensor_parallel_size=t, expert_parallel_size=e)
        if not problems:
            if w % t:
                problems.append(f"world size {w} is not divisible by --tensor-parallel-size {t} "
                                f"(world = data-parallel replicas x tensor-parallel size)")
            if t % e:
                problems.append(f"--expert-parallel-size {e} must divide --tensor-parallel-size {t}: "
                                "expert parallelism runs inside a replica (its EP ranks are the replica's TP ranks)")
        if problems:
            raise ParallelLayoutError(f"invalid parallel layout (world={w}, tp={t}, ep={e})", problems)

    @property
    def tp(self) -> int:
        return self.tensor_parallel_size

    @property
    def ep(self) -> int:
        return self.expert_parallel_size

    @property
    def dp(self) -> int:
        return self.world_size // self.tensor_parallel_size

    @property
    def etp(self) -> int:
        """Expert tensor-parallel size: ranks sharing one EP rank's experts."""
        return self.tensor_parallel_size // self.expert_parallel_size

    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        dp_rank, tp_rank = divmod(rank, self.tp)
        ep_rank, etp_rank = divmod(tp_rank, self.etp)
        return RankCoords(rank, dp_rank, tp_rank, ep_rank, etp_rank)

    def replica_leader(self, dp_rank: int) -> int:
        return dp_rank * self.tp

    def tp_groups(self) -> list[list[int]]:
        """One group per replica: its ranks, in tp_rank order."""
        return [list(range(d * self.tp, (d + 1) * self.tp)) for d in range(self.dp)]

    def ep_groups(self) -> list[list[int]]:
        """Ranks holding different experts and the same intermediate slice (stride etp)."""
        return [[d * self.tp + e * self.etp + s for e in range(self.ep)]
                for d in range(self.dp) for s in range(self.etp)]

    def etp_groups(self) -> list[list[int]]:
        """Ranks holding the same experts, split along the intermediate dimension."""
        return [[d * self.tp + e * self.etp + s for s in range(self.etp)]
                for d in range(self.dp) for e in range(self.ep)]

    def dp_groups(self) -> list[list[int]]:
        """Ranks at the same position of every replica (identical shards)."""
        return [[d * self.tp + t for d in range(self.dp)] for t in range(self.tp)]

    def expert_range(self, ep_rank: int, num_experts: int) -> tuple[int, int]:
        """Global expert ids ``[first, stop)`` owned by ``ep_rank``."""
        return split_range(num_experts, self.ep, ep_rank)

    def heads(self, config: "ModelConfig", tp_rank: int) -> HeadPartition:
        """This rank's heads. MLA has no KV heads of its own: its per-head keys and values
        come from the (replicated) latent, so the KV range is the query range."""
        h, kv = config.num_heads, config.num_kv_heads
        q_start, q_stop = split_range(h, self.tp, tp_rank)
        if config.mla is not None:
            return HeadPartition(q_start, q_stop, q_start, q_stop, 1)
        replicas = self.tp // kv if self.tp > kv else 1
        kv_per_rank = max(1, kv // self.tp)
        kv_start = (tp_rank // replicas) * kv_per_rank
        return HeadPartition(q_start, q_stop, kv_start, kv_start + kv_per_rank, replicas)

    def model_problems(self, config: "ModelConfig") -> list[str]:
        """Why this layout cannot split ``config`` (empty when it can)."""
        if replicates_blocks(config):
            return self._expert_problems(config)
        t, problems = self.tp, []
        if config.num_heads % t:
            problems.append(f"--tensor-parallel-size {t} does not divide the {config.num_heads} attention heads")
        kv = config.num_kv_heads
        if config.mla is None and kv % t and t % kv:
            problems.append(f"--tensor-parallel-size {t} neither divides the {kv} KV heads nor is a multiple "
                            "of them (KV heads are split, or replicated on tp / kv_heads ranks)")
        if config.dense_layers and config.intermediate_size % t:
            problems.append(f"--tensor-parallel-size {t} does not divide the dense MLP width "
                            f"{config.intermediate_size}")
        if config.attention_output_gate:
            problems.append("gated attention output (output_gate_proj) outside a hybrid model has no sharded "
                            "attention")
        return problems + self._expert_problems(config)

    def _expert_problems(self, config: "ModelConfig") -> list[str]:
        """The MoE block's conditions, the only split blocks of a hybrid model."""
        problems = []
        if config.num_moe_layers == 0:
            return problems
        if config.num_experts % self.ep:
            problems.append(f"--expert-parallel-size {self.ep} does not divide the {config.num_experts} experts")
        if config.moe_intermediate_size % self.etp:
            problems.append(f"expert tensor-parallel size tp/ep = {self.etp} does not divide "
                            f"moe_intermediate_size {config.moe_intermediate_size}")
        if config.shared_expert_intermediate_size % self.tp:
            problems.append(f"--tensor-parallel-size {self.tp} does not divide the shared-expert width "
                            f"{config.shared_expert_intermediate_size} (the shared expert is row-parallel)")
        return problems

    def validate_model(self, config: "ModelConfig") -> None:
        """Raise ``ParallelLayoutError`` (every problem at once) unless the model splits."""
        problems = self.model_problems(config)
        if problems:
            raise ParallelLayoutError(
                f"model {config.name!r} cannot use tp={self.tp}, ep={self.ep}", problems)

    def megatron_compatible(self, config: "ModelConfig") -> bool:
        """Whether megatron-core can hold the same shards (it splits KV groups, never replicates;
        it builds no hybrid layers on CPU: ``inference.megatron_export.HYBRID_REFUSAL``)."""
        return (not replicates_blocks(config) and not self.model_problems(config)
                and (config.mla is not None or config.num_kv_heads % self.tp == 0))


def replicates_blocks(config: "ModelConfig") -> bool:
    """Whether a layout splits only ``config``'s MoE layers (a hybrid model: see the module
    docstring) rather than its attention and dense MLPs too."""
    from inference.model.hybrid import uses_hybrid_layers    # lazily: the model package imports this one
    return uses_hybrid_layers(config)
