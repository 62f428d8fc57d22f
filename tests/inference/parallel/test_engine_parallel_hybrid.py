"""Hybrid models (Gated DeltaNet / Mamba2 layers) on 2 and 4 gloo ranks: only the MoE layers
are split (experts over EP, the shared expert row-parallel), everything else replicated.
The parallel engine serves exactly what the single-process engine serves (fp32): the same
greedy and seeded tokens and the same routing (global expert ids, read back by the replica
leader only), through prefix-cache hits restored from state checkpoints, chunked prefill and
preemption, with the block pool, state pool, checkpoint store and scheduler checked after
every step; from preset weights, after ``update_weights``, and from a transformers
checkpoint loaded shard by shard."""

from __future__ import annotations

import pytest

from inference.parallel import ParallelLayout
from inference.parallel.plan import memory_plan
from tests.inference.parallel.engine_checks import (
    EngineCase,
    case_indices,
    check_ranks_serve_the_reference,
    request_ids,
    single_runs,
    workload,
    world_runs,
)
from tests.inference.parallel.rank_checks import CONFIGS

CASES = {
    2: [EngineCase("gdn", 2, 2, True), EngineCase("gdn", 2, 1, False), EngineCase("mamba", 2, 2, False),
        EngineCase("mamba", 2, 1, True, refit=True), EngineCase("nemotron_h", 2, 2, True, tag="-hf")],
    4: [EngineCase("gdn", 4, 2, False), EngineCase("mamba", 4, 2, True), EngineCase("qwen3_next", 4, 4, False,
                                                                                     tag="-hf")],
}


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """transformers' tiny random hybrids, saved once and read by both sides."""
    from tests.inference.hf.hybrid_families import make_hybrid_model
    paths = {}
    for family in ("nemotron_h", "qwen3_next"):
        path = tmp_path_factory.mktemp(family)
        make_hybrid_model(family).save_pretrained(path)
        paths[family] = str(path)
    return paths


@pytest.fixture(scope="module")
def world(hf_checkpoints):
    return world_runs(CASES, lambda case: hf_checkpoints[case.model])


@pytest.fixture(scope="module")
def single():
    return single_runs()


@pytest.mark.parametrize("world_size,index", case_indices(CASES),
                         ids=[f"world{w}-{CASES[w][i].name}" for w, i in case_indices(CASES)])
def test_parallel_hybrid_engine_serves_what_the_single_process_engine_serves(world, single, world_size, index):
    cases, results = world(world_size)
    case = cases[index]
    want = single(case)
    ids = request_ids(want, case.name)
    assert len(ids) == len(workload(512)) + 2 * case.refit
    assert case.tp == world_size          # one replica: every rank serves the whole workload
    routed = check_ranks_serve_the_reference(case, results, lambda dp_rank, dp: single(case, dp_rank, dp), 1)
    assert routed == len(ids)
    leader = results[0]
    assert bool(leader[f"{case.name}/leader"])
    assert sum(int(leader[f"{case.name}/{i}/cached"]) for i in ids) > 0, "no prefix-cache hit (state checkpoint)"
    assert sum(int(leader[f"{case.name}/{i}/preemptions"]) for i in ids) > 0, "no preemption"


@pytest.mark.parametrize("world_size", sorted(CASES))
def test_memory_plan_is_what_every_rank_allocated(world, single, world_size):
    """Weights (experts divided, the rest whole), the whole KV cache and the replicated state
    pool plus checkpoints of the per-rank plan equal each rank's real allocations; the
    single-process engine allocates the same KV and state, and more weights."""
    cases, results = world(world_size)
    checked = 0
    for case in cases:
        if case.tag == "-hf":
            continue
        plans = memory_plan(CONFIGS[case.model], case.engine_config(), ParallelLayout(world_size, case.tp, case.ep))
        want = single(case)
        for rank, out in enumerate(results):
            got = {k: int(out[f"{case.name}/bytes/{k}"]) for k in ("weights", "kv", "state")}
            plan = plans[rank]
            assert got == {"weights": plan.weight_bytes, "kv": plan.kv_cache_bytes, "state": plan.state_bytes}, rank
            assert got["kv"] == int(want[f"{case.name}/bytes/kv"]) and got["state"] == int(
                want[f"{case.name}/bytes/state"]) > 0
            assert got["weights"] < int(want[f"{case.name}/bytes/weights"])
            checked += 1
    assert checked >= 2 * world_size
