"""Sharded layers on 2 and 4 gloo ranks equal the single-process model (fp32): every block,
whole forwards, greedy tokens, routing (global expert ids), replay and the paged KV path;
and every rank of a replica holds bit-identical replicated outputs (same logits, same
routing), which is what lets each rank sample and schedule alike.

Each world size is one launch of its ranks running every case (see ``rank_checks``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from inference.presets import build_model
from tests.inference.parallel.harness import run_ranks
from tests.inference.parallel.rank_checks import (CONFIGS, SEEDS, Case, assert_case_matches, assert_replicas_identical,
                                                  linear_inputs, model_outputs, prompt, run_cases)

CASES = {
    2: [Case("tiny", 2, 1), Case("tiny", 2, 2), Case("rich", 2, 2), Case("sigmoid", 2, 1), Case("tiny", 1, 1),
        Case("oss", 2, 2), Case("mla", 2, 1)],
    4: [Case("tiny", 4, 2), Case("rich", 4, 4), Case("rich", 2, 2), Case("sigmoid", 4, 2), Case("tiny", 4, 1),
        Case("oss", 4, 2), Case("mla", 4, 4)],
}


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


@pytest.mark.parametrize("world_size", sorted(CASES))
def test_biased_linears_over_the_world(world_results, world_size):
    inputs = linear_inputs()
    want = F.linear(inputs["x"], inputs["weight"], inputs["bias"]).numpy()
    for rank, out in enumerate(world_results(world_size)):
        for key in ("row", "row_deferred", "column"):
            np.testing.assert_allclose(out[f"linear/{key}"], want, rtol=1e-5, atol=1e-5, err_msg=f"rank {rank}: {key}")


@pytest.mark.parametrize("world_size,index", _case_ids(),
                         ids=[f"world{w}-{CASES[w][i].name}" for w, i in _case_ids()])
def test_case_matches_single_process(world_results, expected, world_size, index):
    assert_case_matches(CASES[world_size][index], world_results(world_size), expected)


@pytest.mark.parametrize("world_size", sorted(CASES))
def test_replicated_outputs_identical_on_every_rank_of_a_replica(world_results, world_size):
    assert assert_replicas_identical(CASES[world_size], world_results(world_size)) > 0
