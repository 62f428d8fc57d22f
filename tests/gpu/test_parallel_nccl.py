"""The multi-rank checks of tests/inference/parallel under NCCL, one rank per GPU (fp32):
sharded layers, whole forwards, greedy tokens, routing and the paged path equal the
single-GPU model; replicated outputs are bit-identical across a replica's GPUs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from inference.presets import build_model
from tests.inference.parallel.harness import run_ranks
from tests.inference.parallel.rank_checks import (CONFIGS, SEEDS, Case, assert_case_matches, assert_replicas_identical,
                                                  model_outputs, prompt, run_cases)

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA devices")
CASES = {2: [Case("tiny", 2, 2), Case("rich", 2, 2), Case("sigmoid", 2, 1)],
         4: [Case("tiny", 4, 2), Case("rich", 4, 4), Case("rich", 2, 2), Case("sigmoid", 4, 2)]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    models = {n: build_model(c, seed=SEEDS[n], dtype=torch.float32, device="cuda:0") for n, c in CONFIGS.items()}
    paths = {}
    for name, model in models.items():
        paths[name] = str(tmp_path_factory.mktemp("nccl") / f"{name}.safetensors")
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}, paths[name])
    cache = {}

    def expected(config: str, dp_rank: int):
        if (config, dp_rank) not in cache:
            m = models[config]
            cache[config, dp_rank] = model_outputs(m, prompt(m.config, dp_rank).to("cuda:0"))
        return cache[config, dp_rank]
    return paths, expected


@pytest.mark.parametrize("world_size", [2, 4])
def test_nccl_ranks_match_single_gpu(setup, world_size):
    if GPUS < world_size:
        pytest.skip(f"needs {world_size} CUDA devices, found {GPUS}")
    paths, expected = setup
    results = run_ranks(run_cases, world_size, CASES[world_size], paths, "cuda", backend="nccl", timeout=300)
    for case in CASES[world_size]:
        assert_case_matches(case, results, expected, rtol=1e-4, atol=1e-4)
    assert assert_replicas_identical(CASES[world_size], results) > 0
