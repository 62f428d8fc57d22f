"""Hybrid models (Gated DeltaNet / Mamba2 layers) on 2 and 4 gloo ranks: only the MoE layers
are split (experts over EP, the shared expert row-parallel), everything else replicated.
The parallel engine serves exactly what the single-process engine serves (fp32): the same
greedy and seeded tokens and the same routing (global expert ids, read back by the replica
leader only), through prefix-cache hits restored from state checkpoints, chunked prefill and
preemption, with the block pool, state pool, checkpoint store and scheduler checked after
every step; from preset weights and from a transformers checkpoint loaded shard by shard."""

from __future__ import annotations

import numpy as np
import pytest

from tests.inference.parallel.engine_checks import EngineCase, run_engine_cases, serve_case
from tests.inference.parallel.harness import run_ranks

CASES = {
    2: [EngineCase("gdn", 2, 2, True), EngineCase("gdn", 2, 1, False), EngineCase("mamba", 2, 2, False),
        EngineCase("mamba", 2, 1, True), EngineCase("nemotron_h", 2, 2, True, tag="-hf")],
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


def _resolve(case: EngineCase, hf: dict[str, str]) -> EngineCase:
    if case.tag != "-hf":
        return case
    return EngineCase(f"hf:{hf[case.model]}", case.tp, case.ep, case.async_scheduling, case.engine, case.refit, case.tag)


@pytest.fixture(scope="module")
def world(hf_checkpoints):
    cache = {}

    def get(size: int):
        if size not in cache:
            cases = [_resolve(c, hf_checkpoints) for c in CASES[size]]
            cache[size] = (cases, run_ranks(run_engine_cases, size, cases, timeout=240))
        return cache[size]
    return get


def _requests(out: dict, case: str) -> set[str]:
    return {k.split("/")[1] for k in out if k.startswith(case + "/") and k.endswith("/tokens")}


def _ids():
    return [(w, i) for w in sorted(CASES) for i in range(len(CASES[w]))]


@pytest.mark.parametrize("world_size,index", _ids(), ids=[f"world{w}-{CASES[w][i].name}" for w, i in _ids()])
def test_parallel_hybrid_engine_serves_what_the_single_process_engine_serves(world, world_size, index):
    cases, results = world(world_size)
    case = cases[index]
    want = serve_case(case, None)                       # one replica: the single-process run
    ids = _requests(want, case.name)
    assert len(ids) == 8
    routed = 0
    for rank, out in enumerate(results):
        leader = bool(out[f"{case.name}/leader"])
        assert leader == (rank == 0) and _requests(out, case.name) == ids, f"rank {rank}"
        for rid in ids:
            where = f"{case.name} rank {rank} request {rid}"
            assert np.array_equal(out[f"{case.name}/{rid}/tokens"], want[f"{case.name}/{rid}/tokens"]), where
            assert (f"{case.name}/{rid}/routing" in out) == leader, f"{where}: only the leader reads routing back"
            if leader:
                assert np.array_equal(out[f"{case.name}/{rid}/routing"], want[f"{case.name}/{rid}/routing"]), where
                routed += 1
        assert int(out[f"{case.name}/checks"]) == int(out[f"{case.name}/launched"]) > 0, f"rank {rank}"
    assert routed == len(ids)
    leader = results[0]
    assert sum(int(leader[f"{case.name}/{i}/cached"]) for i in ids) > 0, "no prefix-cache hit (state checkpoint)"
    assert sum(int(leader[f"{case.name}/{i}/preemptions"]) for i in ids) > 0, "no preemption"
