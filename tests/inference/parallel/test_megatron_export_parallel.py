"""The TP/EP-sharded megatron-core export on 2 gloo ranks, with sequence parallelism: every
rank's GPTModel shard computes our logits; rank r's routers route exactly the rows
``sequence_parallel_slice(targets, r, tp)`` of the engine's recording, and replaying that
slice forces them. Layouts: experts split by rank (tp 2, ep 2) and each expert split over
both ranks (tp 2, ep 1: expert tensor parallelism)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

from inference.config import EngineConfig  # noqa: E402
from inference.engine import LLMEngine  # noqa: E402
from inference.presets import build_model, get_preset  # noqa: E402
from inference.request import SamplingParams  # noqa: E402
from routing_replay.replay_targets import padded_targets, sequence_parallel_slice  # noqa: E402
from tests.inference.parallel.harness import run_ranks  # noqa: E402
from tests.inference.parallel.megatron_checks import MODEL_SEED, run_megatron_cases  # noqa: E402

LAYOUTS = [(2, 2), (2, 1)]


@pytest.fixture(scope="module")
def rollouts():
    """Engine rollouts (recorded routing), the padded batch, its targets and random ones."""
    model = build_model(get_preset("tiny-moe"), seed=MODEL_SEED)
    engine = LLMEngine(model, EngineConfig(record_routing=True, block_size=4, num_kv_blocks=64, max_step_tokens=32))
    results = engine.generate([[5, 9, 13, 17, 21], [40, 41], [100, 7, 7, 8, 300, 301, 2]],
                              SamplingParams(max_new_tokens=5, ignore_eos=True))
    seqs = [r.prompt_token_ids + r.output_token_ids for r in results]
    seq_len = -(-max(map(len, seqs)) // 4) * 4           # sequence parallelism splits seq over tp
    tokens = np.zeros((len(seqs), seq_len), dtype=np.int64)
    for b, s in enumerate(seqs):
        tokens[b, :len(s)] = s
    recorded = padded_targets([r.routing for r in results], seq_len, order="sb")
    gen = torch.Generator().manual_seed(2)
    forced = torch.rand(recorded.shape[0], recorded.shape[1], model.config.num_experts, generator=gen)
    forced = forced.topk(model.config.topk, dim=-1).indices.numpy()
    return model, results, seqs, tokens, recorded, forced


@pytest.fixture(scope="module")
def ranks(rollouts):
    _, _, _, tokens, _, forced = rollouts
    return run_ranks(run_megatron_cases, 2, LAYOUTS, tokens, forced, timeout=240)


@pytest.mark.parametrize("tp,ep", LAYOUTS)
def test_sharded_export_computes_our_logits_on_every_rank(rollouts, ranks, tp, ep):
    model, _, seqs, _, _, _ = rollouts
    for rank, out in enumerate(ranks):
        logits = out[f"tp{tp}-ep{ep}/logits"]
        for b, s in enumerate(seqs):
            ref, _ = model.forward_reference(torch.tensor(s))
            np.testing.assert_allclose(logits[b, :len(s)], ref.numpy(), atol=1e-4, rtol=0, err_msg=f"rank {rank}")


@pytest.mark.parametrize("tp,ep", LAYOUTS)
def test_each_rank_routes_its_sequence_parallel_slice_of_the_recording(rollouts, ranks, tp, ep):
    _, results, seqs, tokens, recorded, forced = rollouts
    batch, seq_len = tokens.shape
    checked = 0
    for out in ranks:
        r = int(out[f"tp{tp}-ep{ep}/tp_rank"])
        free, replayed = out[f"tp{tp}-ep{ep}/free"], out[f"tp{tp}-ep{ep}/forced"]
        want_forced = np.sort(sequence_parallel_slice(forced, r, tp), axis=-1)
        assert free.shape == replayed.shape == want_forced.shape
        assert np.array_equal(replayed, want_forced), f"rank {r}: replay did not force its slice"
        rows = np.sort(sequence_parallel_slice(recorded, r, tp), axis=-1)
        first = r * seq_len // tp * batch                 # order "sb": row = s * batch + b
        for i in range(rows.shape[1]):
            s, b = divmod(first + i, batch)
            if s < len(seqs[b]) - 1:                      # a recorded row (padding routes anything)
                assert np.array_equal(free[:, i], rows[:, i]), f"rank {r} row {i} (token {s} of sequence {b})"
                checked += 1
    assert checked == sum(len(s) - 1 for s in seqs)
