"""The engine on 2 and 4 gloo ranks (tensor, expert and data parallel) serves exactly what the
single-process engine serves (fp32): the same tokens and routing (global expert ids, read
back by each replica's leader only), through prefix-cache hits, chunked prefill and
preemption, in synchronous and asynchronous scheduling, through the padded (graph-shaped)
decode path, from preset weights and from a Hugging Face checkpoint loaded shard by shard,
before and after ``update_weights``. Ranks
given different requests raise instead of hanging."""

from __future__ import annotations

import numpy as np
import pytest

from tests.inference.parallel.engine_checks import EngineCase, run_diverging, run_engine_cases, serve_case
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


def _resolve(case: EngineCase, hf: dict[str, str]) -> EngineCase:
    """HF cases name a family; the rank side gets its directory."""
    if case.tag != "-hf":
        return case
    family = "deepseek_v3" if case.model == "mla" else "glm4_moe"
    return EngineCase(f"hf:{hf[family]}", case.tp, case.ep, case.async_scheduling, case.engine, case.refit, case.tag)


@pytest.fixture(scope="module")
def world(hf_checkpoints):
    cache = {}

    def get(size: int):
        if size not in cache:
            cases = [_resolve(c, hf_checkpoints) for c in CASES[size]]
            cache[size] = (cases, run_ranks(run_engine_cases, size, cases, timeout=240))
        return cache[size]
    return get


@pytest.fixture(scope="module")
def single():
    cache = {}

    def get(case: EngineCase, dp_rank: int, dp: int):
        key = (case.name, case.model, dp_rank, dp)
        if key not in cache:
            cache[key] = serve_case(case, None, dp_rank, dp)
        return cache[key]
    return get


def _requests(out: dict, case: str) -> set[str]:
    return {k.split("/")[1] for k in out if k.startswith(case + "/") and k.endswith("/tokens")}


def _ids():
    return [(w, i) for w in sorted(CASES) for i in range(len(CASES[w]))]


@pytest.mark.parametrize("world_size,index", _ids(), ids=[f"world{w}-{CASES[w][i].name}" for w, i in _ids()])
def test_parallel_engine_serves_what_the_single_process_engine_serves(world, single, world_size, index):
    cases, results = world(world_size)
    case = cases[index]
    dp = world_size // case.tp
    checked = 0
    for rank, out in enumerate(results):
        dp_rank, leader = int(out[f"{case.name}/dp_rank"]), bool(out[f"{case.name}/leader"])
        want = single(case, dp_rank, dp)
        ids = _requests(want, case.name)
        assert ids and _requests(out, case.name) == ids, f"rank {rank}"
        for rid in ids:
            where = f"{case.name} rank {rank} request {rid}"
            assert np.array_equal(out[f"{case.name}/{rid}/tokens"], want[f"{case.name}/{rid}/tokens"]), where
            has_routing = f"{case.name}/{rid}/routing" in out
            assert has_routing == leader, f"{where}: only the replica leader reads routing back"
            if leader:
                assert np.array_equal(out[f"{case.name}/{rid}/routing"], want[f"{case.name}/{rid}/routing"]), where
                checked += 1
        if case.tp > 1:   # replica_check_interval=1: every launched step was agreed on
            assert int(out[f"{case.name}/checks"]) == int(out[f"{case.name}/launched"]) > 0, where
    assert checked >= len(_requests(single(case, 0, dp), case.name))


@pytest.mark.parametrize("world_size", sorted(CASES))
def test_workload_exercises_prefix_hits_chunks_and_preemption(world, world_size):
    cases, results = world(world_size)
    leader = results[0]
    for case in cases:
        ids = _requests(leader, case.name)
        assert sum(int(leader[f"{case.name}/{i}/cached"]) for i in ids) > 0, f"{case.name}: no prefix-cache hit"
        if dict(case.engine).get("padded_decode"):
            assert int(leader[f"{case.name}/padded_steps"]) > 0, f"{case.name}: no padded decode step"
        if case.tp == world_size:      # one replica serves all eight requests
            assert sum(int(leader[f"{case.name}/{i}/preemptions"]) for i in ids) > 0, f"{case.name}: no preemption"


@pytest.mark.parametrize("mode,step", [("prompt", 0), ("sampling", 4)])
def test_ranks_that_diverge_raise_on_every_rank(mode, step):
    results = run_ranks(run_diverging, 2, mode, timeout=120)
    for rank, out in enumerate(results):
        assert bool(out["raised"]), f"rank {rank} did not notice the divergence"
        assert f"diverged by step {step}" in str(out["message"]), f"rank {rank}: {out['message']}"
