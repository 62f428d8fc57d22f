"""What each gloo rank runs in the engine-level multi-rank tests, and the workload both
sides share: the same requests served by a tensor/expert-parallel ``LLMEngine`` on every
rank of a replica (DP replicas serve their own share), with prefix-cache hits, chunked
prefill and preemption, synchronous and asynchronous scheduling, checked invariants after
every step. The test serves the same workload with the single-process engine and compares."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.hf_loader import load_hf_model
from inference.parallel import ParallelGroups, ParallelLayout
from inference.presets import build_model
from inference.request import RequestResult, SamplingParams
from tests.inference.parallel.harness import run_ranks
from tests.inference.parallel.rank_checks import CONFIGS, SEEDS


@dataclass(frozen=True)
class EngineCase:
    """A model (a ``rank_checks`` config, or ``hf:<dir>`` for a saved checkpoint), a layout
    and the scheduling mode; ``refit`` also serves after ``update_weights``."""

    model: str
    tp: int
    ep: int
    async_scheduling: bool
    engine: tuple[tuple[str, object], ...] = ()
    refit: bool = False
    tag: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        kind = "hf-" + self.model.rsplit("/", 1)[-1] if self.model.startswith("hf:") else self.model
        return f"{kind}-tp{self.tp}-ep{self.ep}-{'async' if self.async_scheduling else 'sync'}{self.tag}"

    def engine_config(self, device: str = "cpu") -> EngineConfig:
        """On CUDA, decode runs as CUDA graphs (NCCL collectives captured in them)."""
        base = dict(block_size=4, num_kv_blocks=22, max_requests=4, max_step_tokens=16, record_routing=True,
                    enable_prefix_caching=True, async_scheduling=self.async_scheduling, replica_check_interval=1,
                    device=device, cuda_graphs=device.startswith("cuda"))
        return EngineConfig(**{**base, **dict(self.engine)})


def workload(vocab: int, dp_rank: int = 0, dp: int = 1, seed: int = 5) -> list[tuple[list[int], SamplingParams]]:
    """Eleven requests: two pairs share a 12-token prefix (the second of each pair is admitted
    steps later: a prefix-cache hit, for two DP replicas too), one is longer than the step
    budget (chunked prefill), together they outgrow the KV cache (preemption), one samples
    with a seed, and the first prompt comes four times in a row (two copies on each of two
    DP replicas: an RL group, whose later copy hits blocks the same step computes).
    Replica ``dp_rank`` of ``dp`` serves every dp-th."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(2, vocab, size=12).tolist(), rng.integers(2, vocab, size=12).tolist()
    tails = [rng.integers(2, vocab, size=n).tolist() for n in (3, 5, 2, 4)]
    others = [rng.integers(2, vocab, size=n).tolist() for n in (30, 7, 9, 6)]
    prompts = [a + tails[0], b + tails[1], others[0], others[1], a + tails[2], b + tails[3], others[2], others[3]]
    params = [SamplingParams(max_new_tokens=8, ignore_eos=True) for _ in prompts]
    params[6] = SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=0.9, top_k=20, seed=17)
    requests = list(zip(prompts, params))
    requests[1:1] = [requests[0]] * 3               # indices 0-3: two copies per replica of two
    return requests[dp_rank::dp]


def serve(engine: LLMEngine, requests, prefix: str = "") -> tuple[dict[str, RequestResult], int]:
    """Serve ``requests`` step by step, checking the block pool, the sequence cache (a
    hybrid's state slots and checkpoints) and the scheduler after every step; returns
    results by id and the steps taken."""
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(prompt, params, request_id=f"{prefix}{i}")
    results, steps = {}, 0
    while engine.has_unfinished():
        for result in engine.step():
            results[result.request_id] = result
        engine.block_pool.check_invariants()
        engine.sequence_cache.check_invariants()
        engine.scheduler.check_invariants()
        steps += 1
        assert steps < 2000, "the engine made no progress"
    return results, steps


def load_model(spec: str, groups: ParallelGroups | None, device: str = "cpu"):
    if spec.startswith("hf:"):
        return load_hf_model(spec[3:], parallel=groups, device=device)
    return build_model(CONFIGS[spec], seed=SEEDS[spec], parallel=groups, device=device)


def refit_state(spec: str) -> dict[str, torch.Tensor]:
    """Full weights of another seed: what a trainer hands ``update_weights``."""
    model = build_model(CONFIGS[spec], seed=SEEDS[spec] + 100)
    state = dict(model.named_parameters())
    state.update((n, b) for n, b in model.named_buffers() if n.endswith("expert_bias"))
    return state


def outputs(results: dict[str, RequestResult], prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for rid, r in results.items():
        out[f"{prefix}{rid}/tokens"] = np.array(r.output_token_ids)
        out[f"{prefix}{rid}/cached"] = np.array(r.num_cached_tokens)
        out[f"{prefix}{rid}/preemptions"] = np.array(r.num_preemptions)
        if r.routing is not None:
            out[f"{prefix}{rid}/routing"] = r.routing
    return out


def allocated_bytes(model, engine: LLMEngine, prefix: str) -> dict[str, np.ndarray]:
    """What this rank really allocated, for the memory plan's numbers: weights, KV cache and
    a hybrid's state pool plus state checkpoints."""
    state = engine._state
    recurrent = sum(t.nbytes for t in (state.state_pool, state.checkpoints) if t is not None)
    return {f"{prefix}bytes/weights": np.array(sum(p.numel() * p.element_size() for p in model.parameters())),
            f"{prefix}bytes/kv": np.array(engine.kv_cache.nbytes), f"{prefix}bytes/state": np.array(recurrent)}


def serve_case(case: EngineCase, groups: ParallelGroups | None, dp_rank: int = 0, dp: int = 1,
               device: str = "cpu") -> dict[str, np.ndarray]:
    """One case on this rank (``groups`` None: the single-process reference)."""
    model = load_model(case.model, groups, device)
    engine = LLMEngine(model, case.engine_config(device))
    requests = workload(model.config.vocab_size, dp_rank, dp)
    results, steps = serve(engine, requests)
    out = outputs(results, f"{case.name}/")
    out[f"{case.name}/steps"] = np.array(steps)
    if case.refit:
        engine.update_weights(refit_state(case.model).items())
        refit, _ = serve(engine, requests[:2], prefix="refit")
        out.update(outputs(refit, f"{case.name}/"))
    out[f"{case.name}/launched"] = np.array(len(engine.step_log))
    out[f"{case.name}/padded_steps"] = np.array(sum(e["padded_tokens"] > e["active_tokens"]
                                                    for e in engine.step_log.entries))
    if engine.replica is not None:
        out[f"{case.name}/checks"] = np.array(engine.replica.num_checks)
    out.update(allocated_bytes(model, engine, f"{case.name}/"))
    engine.close()
    return out


def run_engine_cases(rank: int, world_size: int, cases: list[EngineCase], device: str = "cpu") -> dict[str, np.ndarray]:
    """Rank side: every case's outputs, keyed ``case/request/what`` (``device="cuda"``:
    this rank's GPU, under NCCL)."""
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    results: dict[str, np.ndarray] = {}
    for case in cases:
        groups = ParallelGroups.build(ParallelLayout(world_size, case.tp, case.ep))
        results.update(serve_case(case, groups, groups.coords.dp_rank, groups.layout.dp, device))
        results[f"{case.name}/dp_rank"] = np.array(groups.coords.dp_rank)
        results[f"{case.name}/leader"] = np.array(groups.is_replica_leader)
    return results


def request_ids(out: dict[str, np.ndarray], case: str) -> set[str]:
    """The request ids whose tokens ``out`` (one rank's, or a single-process run's) holds for ``case``."""
    return {k.split("/")[1] for k in out if k.startswith(case + "/") and k.endswith("/tokens")}


def case_indices(cases: dict[int, list[EngineCase]]) -> list[tuple[int, int]]:
    """(world size, case index) of every case, for parametrizing a test over them."""
    return [(w, i) for w in sorted(cases) for i in range(len(cases[w]))]


def world_runs(cases: dict[int, list[EngineCase]], hf_dir: Callable[[EngineCase], str]):
    """``get(size)`` -> (resolved cases, every rank's outputs): the cases of a world size run
    once on that many gloo ranks, cached for the module's tests. A case tagged "-hf" names
    a family; the rank side gets its saved checkpoint, ``hf_dir(case)``, as ``hf:<dir>``."""
    cache: dict[int, tuple[list[EngineCase], list[dict[str, np.ndarray]]]] = {}

    def resolve(case: EngineCase) -> EngineCase:
        return replace(case, model=f"hf:{hf_dir(case)}") if case.tag == "-hf" else case

    def get(size: int):
        if size not in cache:
            resolved = [resolve(c) for c in cases[size]]
            cache[size] = (resolved, run_ranks(run_engine_cases, size, resolved, timeout=240))
        return cache[size]
    return get


def single_runs():
    """``get(case, dp_rank=0, dp=1)`` -> the single-process engine's outputs for replica
    ``dp_rank``'s share of the workload, cached."""
    cache: dict[tuple, dict[str, np.ndarray]] = {}

    def get(case: EngineCase, dp_rank: int = 0, dp: int = 1) -> dict[str, np.ndarray]:
        key = (case.name, case.model, dp_rank, dp)
        if key not in cache:
            cache[key] = serve_case(case, None, dp_rank, dp)
        return cache[key]
    return get


def check_ranks_serve_the_reference(case: EngineCase, results: list[dict[str, np.ndarray]],
                                    reference: Callable[[int, int], dict[str, np.ndarray]], dp: int) -> int:
    """Every rank served its replica's requests (``reference(dp_rank, dp)``) with the same
    tokens; only replica leaders read routing back, and theirs equals the reference's; with
    TP every launched step was agreed on. Returns how many requests' routing was compared."""
    checked = 0
    for rank, out in enumerate(results):
        dp_rank, leader = int(out[f"{case.name}/dp_rank"]), bool(out[f"{case.name}/leader"])
        want = reference(dp_rank, dp)
        ids = request_ids(want, case.name)
        assert ids and request_ids(out, case.name) == ids, f"rank {rank}"
        for rid in ids:
            where = f"{case.name} rank {rank} request {rid}"
            assert np.array_equal(out[f"{case.name}/{rid}/tokens"], want[f"{case.name}/{rid}/tokens"]), where
            has_routing = f"{case.name}/{rid}/routing" in out
            assert has_routing == leader, f"{where}: only the replica leader reads routing back"
            if leader:
                assert np.array_equal(out[f"{case.name}/{rid}/routing"], want[f"{case.name}/{rid}/routing"]), where
                checked += 1
        if case.tp > 1:   # replica_check_interval=1: every launched step was agreed on
            assert int(out[f"{case.name}/checks"]) == int(out[f"{case.name}/launched"]) > 0, f"rank {rank}"
    return checked


def run_diverging(rank: int, world_size: int, mode: str) -> dict[str, np.ndarray]:
    """Rank 1 is given a prompt that differs in one token (``mode="prompt"``: caught at step
    0, before any forward could hang on mismatched collectives), or samples differently
    (``"sampling"``: its tokens differ, caught at the next check, step 4). Every rank must
    raise ``ReplicaDivergenceError``."""
    from inference.replica import ReplicaDivergenceError
    groups = ParallelGroups.build(ParallelLayout(world_size, world_size))
    engine = LLMEngine(build_model(CONFIGS["tiny"], parallel=groups),
                       EngineConfig(block_size=4, num_kv_blocks=16, replica_check_interval=4))
    prompt = [5, 6, 7, 8, 9] if rank == 0 or mode != "prompt" else [5, 6, 7, 8, 10]
    seed = 3 if rank == 0 or mode != "sampling" else 4
    engine.add_request(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=1.0, seed=seed), "r")
    try:
        while engine.has_unfinished():
            engine.step()
    except ReplicaDivergenceError as exc:
        return {"raised": np.array(True), "message": np.array(str(exc))}
    return {"raised": np.array(False), "message": np.array("")}
