"""Sharded layers on 2 and 4 gloo ranks equal the single-process model (fp32): every block,
whole forwards, greedy tokens, routing (global expert ids), replay and the paged KV path;
and every rank of a replica holds bit-identical replicated outputs (same logits, same
routing), which is what lets each rank sample and schedule alike.

Each world size is one launch of its ranks running every case (see ``rank_checks``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from inference.presets import build_model
from tests.inference.parallel.harness import run_ranks
from tests.inference.parallel.rank_checks import CONFIGS, SEEDS, Case, model_outputs, prompt, run_cases

CASES = {
    2: [Case("tiny", 2, 1), Case("tiny", 2, 2), Case("rich", 2, 2), Case("sigmoid", 2, 1), Case("tiny", 1, 1)],
    4: [Case("tiny", 4, 2), Case("rich", 4, 4), Case("rich", 2, 2), Case("sigmoid", 4, 2), Case("tiny", 4, 1)],
}
EXACT = ("moe_routing", "routing", "greedy", "paged_routing")
# Outputs that collectives leave replicated: every rank of a replica must agree bit for bit.
REPLICATED = ("embed", "attention", "dense_mlp", "moe", "moe_replay", "logits_head", "logits", "routing",
              "greedy", "paged_logits", "paged_routing")


@pytest.fixture(scope="module")
def reference_models():
    return {name: build_model(cfg, seed=SEEDS[name], dtype=torch.float32) for name, cfg in CONFIGS.items()}


@pytest.fixture(scope="module")
def checkpoints(reference_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-checkpoints")
    paths = {}
    for name, model in reference_models.items():
        paths[name] = str(root / f"{name}.safetensors")
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, paths[name])
    return paths


@pytest.fixture(scope="module")
def world_results(checkpoints):
    """One launch per world size, on first use: ``{world_size: per-rank outputs}``."""
    cache: dict[int, list[dict[str, np.ndarray]]] = {}

    def get(size: int) -> list[dict[str, np.ndarray]]:
        if size not in cache:
            cache[size] = run_ranks(run_cases, size, CASES[size], checkpoints)
        return cache[size]
    return get


@pytest.fixture(scope="module")
def expected(reference_models):
    cache = {}

    def get(config: str, dp_rank: int):
        if (config, dp_rank) not in cache:
            model = reference_models[config]
            cache[config, dp_rank] = model_outputs(model, prompt(model.config, dp_rank))
        return cache[config, dp_rank]
    return get


def _case_ids():
    return [(w, i) for w in sorted(CASES) for i in range(len(CASES[w]))]


@pytest.mark.parametrize("world_size,index", _case_ids(), ids=[f"world{w}-{CASES[w][i].name}" for w, i in _case_ids()])
def test_case_matches_single_process(world_results, expected, world_size, index):
    results = world_results(world_size)
    case = CASES[world_size][index]
    for rank, out in enumerate(results):
        ref = expected(case.config, int(out[f"{case.name}/dp_rank"]))
        assert set(ref) == {k.split("/", 1)[1] for k in out if k.startswith(case.name + "/")} - {"dp_rank"}
        for key, want in ref.items():
            got = out[f"{case.name}/{key}"]
            where = f"{case.name} rank {rank}: {key}"
            assert got.shape == want.shape, where
            if key in EXACT:
                assert np.array_equal(got, want), f"{where} differs from the single-process run"
            else:
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5, err_msg=where)


@pytest.mark.parametrize("world_size", sorted(CASES))
def test_replicated_outputs_identical_on_every_rank_of_a_replica(world_results, world_size):
    size, results = world_size, world_results(world_size)
    checked = 0
    for case in CASES[size]:
        replicas: dict[int, list[dict]] = {}
        for out in results:
            replicas.setdefault(int(out[f"{case.name}/dp_rank"]), []).append(out)
        assert len(replicas) == size // case.tp and all(len(r) == case.tp for r in replicas.values())
        for members in replicas.values():
            for key in REPLICATED:
                first = members[0][f"{case.name}/{key}"]
                for other in members[1:]:
                    assert np.array_equal(first, other[f"{case.name}/{key}"]), f"{case.name}: {key} differs across TP ranks"
                    checked += 1
    assert checked > 0
