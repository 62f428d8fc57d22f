"""The engine on 2 and 4 gloo ranks (tensor, expert and data parallel) serves exactly what the
single-process engine serves (fp32): the same tokens and routing (global expert ids, read
back by each replica's leader only), through prefix-cache hits, chunked prefill and
preemption, in synchronous and asynchronous scheduling, through the padded (graph-shaped)
decode path, from preset weights and from a Hugging Face checkpoint loaded shard by shard,
before and after ``update_weights``. Ranks
given different requests raise instead of hanging."""

from __future__ import annotations

import pytest

from tests.inference.parallel.engine_checks import (
    EngineCase,
    case_indices,
    check_ranks_serve_the_reference,
    request_ids,
    run_diverging,
    single_runs,
    world_runs,
)
from tests.inference.parallel.harness import run_ranks

CASES = {
    2: [EngineCase("tiny", 2, 1, True, refit=True), EngineCase("tiny", 2, 2, False),
        EngineCase("rich", 2, 2, True), EngineCase("tiny", 1, 1, True, tag="-dp2"),
        EngineCase("oss", 2, 2, True, engine=(("padded_decode", True),), tag="-padded")],
    4: [EngineCase("tiny", 2, 2, True, tag="-dp2"), EngineCase("sigmoid", 4, 2, False),
        EngineCase("mla", 4, 4, True, tag="-hf")],
}


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """Two families saved by transformers (GQA with per-head q/k norm; MLA), shared by both sides."""
    from tests.inference.hf.families import make_hf_model
    paths = {}
    for family in ("glm4_moe", "deepseek_v3"):
        path = tmp_path_factory.mktemp(family)
        make_hf_model(family).save_pretrained(path)
        paths[family] = str(path)
    return paths


@pytest.fixture(scope="module")
def world(hf_checkpoints):
    return world_runs(CASES, lambda case: hf_checkpoints["deepseek_v3" if case.model == "mla" else "glm4_moe"])


@pytest.fixture(scope="module")
def single():
    return single_runs()


@pytest.mark.parametrize("world_size,index", case_indices(CASES),
                         ids=[f"world{w}-{CASES[w][i].name}" for w, i in case_indices(CASES)])
def test_parallel_engine_serves_what_the_single_process_engine_serves(world, single, world_size, index):
    cases, results = world(world_size)
    case = cases[index]
    dp = world_size // case.tp
    checked = check_ranks_serve_the_reference(case, results, lambda dp_rank, dp: single(case, dp_rank, dp), dp)
    assert checked >= len(request_ids(single(case, 0, dp), case.name))


@pytest.mark.parametrize("world_size", sorted(CASES))
def test_workload_exercises_prefix_hits_chunks_and_preemption(world, world_size):
    cases, results = world(world_size)
    leader = results[0]
    for case in cases:
        ids = request_ids(leader, case.name)
        assert sum(int(leader[f"{case.name}/{i}/cached"]) for i in ids) > 0, f"{case.name}: no prefix-cache hit"
        # request 1 copies request 0 and is admitted in the step that computes its blocks
        assert int(leader[f"{case.name}/1/cached"]) > 0, f"{case.name}: the group's copy hit nothing"
        if dict(case.engine).get("padded_decode"):
            assert int(leader[f"{case.name}/padded_steps"]) > 0, f"{case.name}: no padded decode step"
        if case.tp == world_size:      # one replica serves the whole workload
            assert sum(int(leader[f"{case.name}/{i}/preemptions"]) for i in ids) > 0, f"{case.name}: no preemption"


@pytest.mark.parametrize("mode,step", [("prompt", 0), ("sampling", 4)])
def test_ranks_that_diverge_raise_on_every_rank(mode, step):
    results = run_ranks(run_diverging, 2, mode, timeout=120)
    for rank, out in enumerate(results):
        assert bool(out["raised"]), f"rank {rank} did not notice the divergence"
        assert f"diverged by step {step}" in str(out["message"]), f"rank {rank}: {out['message']}"
