"""Our layout against megatron-core 0.16's own code: its rank generators build the same
TP / EP / expert-TP / DP groups, its vocabulary ranges equal ours, its per-rank qkv rows hold
the same heads, and the tokens its sequence-parallel split gives a TP rank are the rows
``sequence_parallel_slice`` gives that rank's router."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

from megatron.core.parallel_state import RankGenerator  # noqa: E402
from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region  # noqa: E402
from megatron.core.tensor_parallel.utils import VocabUtility  # noqa: E402

from inference.megatron_export import _grouped_qkv, cpu_megatron_runtime  # noqa: E402
from inference.parallel import ParallelGroups, ParallelLayout, VocabParallelEmbedding  # noqa: E402
from inference.parallel.attention import attention_shard  # noqa: E402
from inference.parallel.megatron_layout import (megatron_parallel_kwargs, megatron_vocab_size,  # noqa: E402
                                                sequence_parallel_rows)
from routing_replay.replay_targets import packed_targets, padded_targets, sequence_parallel_slice  # noqa: E402
from tests.inference.parallel.rank_checks import CONFIGS  # noqa: E402

ORDER = "tp-cp-ep-dp-pp"          # initialize_model_parallel's default


def _groups(generator: RankGenerator, token: str) -> list[list[int]]:
    return sorted(sorted(g) for g in generator.get_ranks(token))


@pytest.mark.parametrize("world,tp,ep", [(8, 1, 1), (8, 2, 1), (8, 2, 2), (8, 4, 2), (8, 4, 4), (8, 8, 2), (4, 4, 1)])
def test_megatron_rank_generators_build_our_groups(world, tp, ep):
    layout = ParallelLayout(world, tp, ep)
    kw = megatron_parallel_kwargs(layout)
    decoder = RankGenerator(tp=kw["tensor_model_parallel_size"], ep=1, dp=world // tp, pp=1, cp=1, order=ORDER)
    etp, emp = kw["expert_tensor_parallel_size"], kw["expert_model_parallel_size"]
    expert = RankGenerator(tp=etp, ep=emp, dp=world // (etp * emp), pp=1, cp=1, order=ORDER)
    assert _groups(decoder, "tp") == sorted(layout.tp_groups())
    assert _groups(decoder, "dp") == sorted(layout.dp_groups())
    assert _groups(expert, "ep") == sorted(layout.ep_groups())
    assert _groups(expert, "tp") == sorted(layout.etp_groups())


def test_vocabulary_ranges_equal_megatrons():
    config = CONFIGS["rich"]                                        # vocabulary 509
    for tp in (2, 4):
        layout = ParallelLayout(tp, tp)
        padded = megatron_vocab_size(config, layout)
        for r in range(tp):
            emb = VocabParallelEmbedding(config.vocab_size, 8, ParallelGroups.shard_only(layout, r).tp)
            assert (emb.start, emb.stop) == tuple(VocabUtility.vocab_range_from_global_vocab_size(padded, r, tp))


@pytest.mark.parametrize("name,tp", [("tiny", 2), ("rich", 2)])
def test_megatron_qkv_rows_of_a_rank_are_our_shard_regrouped(name, tp):
    """megatron's ColumnParallelLinear keeps contiguous rows of its per-group [q_g; k_g; v_g]
    weight per rank; regrouping our rank-local [q; k; v] shard must give exactly those rows."""
    config = CONFIGS[name]
    layout = ParallelLayout(tp, tp)
    assert layout.megatron_compatible(config)
    full = torch.randn((config.num_heads + 2 * config.num_kv_heads) * config.head_dim, config.hidden_size)
    megatron_rows = _grouped_qkv(full, config).chunk(tp)
    for r in range(tp):
        shard = attention_shard(config, layout, ParallelGroups.shard_only(layout, r).tp)
        local = shard.modules["qkv_proj"].tensor_shards()["weight"].take(full)
        assert torch.equal(_grouped_qkv(local, shard.local_config), megatron_rows[r])


class _TPGroup:
    """What megatron's sequence-parallel split reads from a process group."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def _scatter(x: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """megatron's own sequence-parallel scatter as TP rank ``rank`` of ``size`` runs it (its
    wrapper needs torch.distributed initialised to honour an explicit group)."""
    with cpu_megatron_runtime():
        return scatter_to_sequence_parallel_region(x, group=_TPGroup(rank, size))


def _token_routing(lengths: list[int]) -> list[np.ndarray]:
    """Routing whose rows name their token: row i of sequence b holds experts [b, i]
    (one layer, top-2)."""
    return [np.array([[[b, i]] for i in range(n - 1)]) for b, n in enumerate(lengths)]


def _assert_rank_routes_its_tokens(coords: np.ndarray, rows: np.ndarray, lengths: list[int]) -> int:
    """``coords`` [n, 2]: (sequence, position) of the tokens megatron gave this rank; their
    target rows must be those tokens' recorded routing (where one was recorded)."""
    recorded = np.array([pos < lengths[b] - 1 for b, pos in coords])
    assert np.array_equal(rows[recorded], coords[recorded])
    return int(recorded.sum())


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_split_matches_sequence_parallel_slice(tp):
    seq_len, lengths = 8, [8, 5, 7]
    batch = len(lengths)
    targets = padded_targets(_token_routing(lengths), seq_len, order="sb")       # [1, seq*batch, 2]
    # megatron's activations [seq, batch, hidden]; "hidden" carries each token's (sequence, position)
    s_idx, b_idx = torch.meshgrid(torch.arange(seq_len), torch.arange(batch), indexing="ij")
    hidden = torch.stack([b_idx, s_idx], dim=-1)
    checked = 0
    for r in range(tp):
        coords = _scatter(hidden, r, tp).reshape(-1, 2).numpy()     # the router flattens [s, b] s-major
        rows = sequence_parallel_slice(targets, r, tp)[0]
        assert rows.shape == coords.shape
        checked += _assert_rank_routes_its_tokens(coords, rows, lengths)
        start, stop = sequence_parallel_rows(seq_len, batch, tp, r)
        assert np.array_equal(rows, targets[0, start:stop])
    assert checked == sum(n - 1 for n in lengths)
    cu = [0, 8, 14, 24]                                   # THD with padded slots: one [T, 1] sequence
    packed = packed_targets(_token_routing(lengths), cu_seqlens=cu)
    thd = torch.tensor([[b, t - cu[b]] for b in range(batch) for t in range(cu[b], cu[b + 1])]).view(-1, 1, 2)
    checked = 0
    for r in range(tp):
        coords = _scatter(thd, r, tp).reshape(-1, 2).numpy()
        checked += _assert_rank_routes_its_tokens(coords, sequence_parallel_slice(packed, r, tp)[0], lengths)
    assert checked == sum(n - 1 for n in lengths)
