"""RoutingRecorder against an independent oracle.

The test drives a tiny paged "engine" (block allocator, token->block/offset tensors,
random router outputs written into staging) and keeps, per request, the routing each
position got the first time it was computed: that is what the sampled tokens came from,
so it is what the recorder must return, whatever happened to the blocks afterwards.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from routing_replay import RoutingRecorder, expected_num_rows, numpy_dtype

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=needs_cuda)])
def device(request) -> str:
    return request.param


def make_recorder(device: str, *, num_kv_blocks: int = 16, block_size: int = 4,
                  num_experts: int = 8, max_step_tokens: int = 32) -> RoutingRecorder:
    return RoutingRecorder(num_kv_blocks=num_kv_blocks, block_size=block_size, num_moe_layers=3,
                           topk=2, num_experts=num_experts, max_step_tokens=max_step_tokens,
                           device=device)


class PagedSim:
    """Minimal paged engine plus oracle. Freed blocks are reused first (LIFO), so stale
    rows get overwritten as soon as possible."""

    def __init__(self, recorder: RoutingRecorder, seed: int = 0) -> None:
        self.rec = recorder
        self.rng = np.random.default_rng(seed)
        self.free = list(range(recorder.num_kv_blocks - 1, -1, -1))
        self.blocks: dict[str, list[int]] = {}
        self.oracle: dict[str, list[np.ndarray]] = {}

    def random_rows(self, n: int) -> np.ndarray:
        shape = (n, self.rec.num_moe_layers, self.rec.topk)
        rows = self.rng.integers(0, self.rec.num_experts, size=shape)
        return rows.astype(numpy_dtype(self.rec.dtype))

    def step(self, work: list[tuple[str, int, int]], padding: int = 0) -> np.ndarray:
        """Compute `(key, first_position, num_tokens)` chunks; returns the staging rows."""
        bs = self.rec.block_size
        tokens = [(key, pos) for key, first, n in work for pos in range(first, first + n)]
        rows = self.random_rows(len(tokens) + padding)
        to_block, to_offset = [], []
        for i, (key, pos) in enumerate(tokens):
            blocks = self.blocks.setdefault(key, [])
            while len(blocks) <= pos // bs:
                blocks.append(self.free.pop())
            to_block.append(blocks[pos // bs])
            to_offset.append(pos % bs)
            seen = self.oracle.setdefault(key, [])
            assert pos <= len(seen), "positions are computed in order"
            if pos == len(seen):
                seen.append(rows[i])
        to_block += [self.rec.dummy_block] * padding
        to_offset += [0] * padding
        n = len(to_block)
        self.rec.staging[:n].copy_(torch.from_numpy(rows))
        dev = self.rec.device
        self.rec.gather(torch.tensor(to_block, dtype=torch.int64, device=dev),
                        torch.tensor(to_offset, dtype=torch.int64, device=dev))
        return rows

    def release(self, key: str) -> None:
        self.free.extend(reversed(self.blocks.pop(key)))

    def preempt(self, key: str, num_rows: int) -> None:
        self.rec.snapshot_preempted(key, self.blocks.get(key, []), num_rows)
        if key in self.blocks:
            self.release(key)

    def finish(self, key: str, num_rows: int, start: int = 0) -> None:
        self.rec.reconstruct(key, self.blocks[key], num_rows, start=start)
        self.release(key)

    def expected(self, key: str, num_rows: int, start: int = 0) -> np.ndarray:
        return np.stack(self.oracle[key][:num_rows])[start:]


@dataclass
class SimRequest:
    key: str
    prompt_len: int
    max_new: int
    generated: int = 0
    computed: int = 0

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.generated


def run_random_schedule(sim: PagedSim, rng: np.random.Generator, num_requests: int,
                        budget: int, preempt_prob: float) -> tuple[dict, dict]:
    """Chunked prefill + decode under a token budget with random preemptions. Returns the
    recorder's results and the expected row count per request."""
    waiting = deque(SimRequest(f"r{i}", int(rng.integers(1, 14)), int(rng.integers(1, 9)))
                    for i in range(num_requests))
    running: list[SimRequest] = []
    results: dict[str, np.ndarray] = {}
    num_rows: dict[str, int] = {}
    while waiting or running:
        while waiting and len(running) < 4:
            running.append(waiting.popleft())
        if len(running) > 1 and rng.random() < preempt_prob:
            victim = running.pop(int(rng.integers(len(running))))
            sim.preempt(victim.key, victim.computed)
            victim.computed = 0
            waiting.append(victim)
        work, left = [], budget
        for req in running:
            n = min(req.seq_len - req.computed, left)
            if n > 0:
                work.append((req, n))
                left -= n
        sim.step([(req.key, req.computed, n) for req, n in work], padding=int(rng.integers(0, 3)))
        for req, n in work:
            req.computed += n
            if req.computed < req.seq_len:
                continue
            req.generated += 1
            if req.generated == req.max_new:
                num_rows[req.key] = expected_num_rows(req.prompt_len, req.generated)
                assert num_rows[req.key] == req.computed
                sim.finish(req.key, num_rows[req.key])
                running.remove(req)
        results.update(sim.rec.poll())
    results.update(sim.rec.wait_all())
    return results, num_rows


@pytest.mark.parametrize("seed", range(4))
def test_random_schedule_matches_oracle(device, seed):
    rec = make_recorder(device, num_kv_blocks=40, max_step_tokens=24)
    sim = PagedSim(rec, seed)
    results, num_rows = run_random_schedule(sim, np.random.default_rng(seed + 100),
                                            num_requests=12, budget=16, preempt_prob=0.3)
    assert set(results) == set(num_rows)
    for key, rows in results.items():
        assert rows.dtype == numpy_dtype(rec.dtype)
        np.testing.assert_array_equal(rows, sim.expected(key, num_rows[key]), err_msg=key)
    assert rec.num_pending == 0


def test_blocks_reused_right_after_reconstruct(device):
    rec = make_recorder(device)
    sim = PagedSim(rec)
    sim.step([("a", 0, 7)])
    blocks_of_a = list(sim.blocks["a"])
    sim.finish("a", 7)
    sim.step([("b", 0, 8)])  # LIFO allocator: b gets a's blocks and overwrites every row
    assert sim.blocks["b"] == blocks_of_a
    result = rec.wait_all()["a"]
    np.testing.assert_array_equal(result, sim.expected("a", 7))
    assert not np.array_equal(result, sim.expected("b", 7))


def test_prefix_sharing_lists_producer_blocks(device):
    rec = make_recorder(device)
    sim = PagedSim(rec)
    sim.step([("a", 0, 9)])
    shared = sim.blocks["a"][:2]
    # Prefix-cache hit on a's first two full blocks: b computes only its suffix.
    sim.blocks["b"] = list(shared)
    sim.oracle["b"] = list(sim.oracle["a"][:8])
    suffix = sim.step([("b", 8, 4)])
    rec.reconstruct("b", sim.blocks["b"], 12)
    rec.reconstruct("a", sim.blocks["a"], 9)
    results = rec.wait_all()
    np.testing.assert_array_equal(results["b"][:8], sim.expected("a", 8))
    np.testing.assert_array_equal(results["b"][8:], suffix)
    np.testing.assert_array_equal(results["a"], sim.expected("a", 9))


def test_preemption_snapshot_wins_over_recompute(device):
    rec = make_recorder(device)
    sim = PagedSim(rec)
    first = sim.step([("a", 0, 6)])
    sim.preempt("a", 6)
    sim.step([("x", 0, 8)])  # another request takes and overwrites a's old blocks
    recomputed = sim.step([("a", 0, 10)])
    assert not np.array_equal(recomputed[:6], first[:6])
    sim.finish("a", 10)
    result = rec.wait_all()["a"]
    np.testing.assert_array_equal(result[:6], first[:6])
    np.testing.assert_array_equal(result[6:], recomputed[6:10])


def test_repeated_preemption_keeps_earliest_rows(device):
    rec = make_recorder(device)
    sim = PagedSim(rec)
    run1 = sim.step([("a", 0, 6)])
    sim.preempt("a", 6)
    sim.step([("a", 0, 3)])
    sim.preempt("a", 3)  # covers nothing new
    run3 = sim.step([("a", 0, 10)])
    sim.preempt("a", 10)
    run4 = sim.step([("a", 0, 14)])
    sim.finish("a", 14)
    result = rec.wait_all()["a"]
    np.testing.assert_array_equal(result[:6], run1[:6])
    np.testing.assert_array_equal(result[6:10], run3[6:10])
    np.testing.assert_array_equal(result[10:], run4[10:14])
    np.testing.assert_array_equal(result, sim.expected("a", 14))


@pytest.mark.parametrize("start", [0, 3, 6, 9, 11])
def test_suffix_output_cuts_after_merging_snapshots(device, start):
    rec = make_recorder(device)
    sim = PagedSim(rec)
    sim.step([("a", 0, 7)])
    sim.preempt("a", 7)
    sim.step([("a", 0, 11)])
    sim.finish("a", 11, start=start)
    result = rec.wait_all()["a"]
    assert result.shape == (11 - start, rec.num_moe_layers, rec.topk)
    np.testing.assert_array_equal(result, sim.expected("a", 11, start))


def test_padding_rows_touch_only_the_dummy_block(device):
    rec = make_recorder(device)
    sim = PagedSim(rec)
    sim.step([("a", 0, 5)])
    before = rec.block_routing.cpu().clone()
    rows = sim.step([("a", 5, 2)], padding=6)
    after = rec.block_routing.cpu()
    block = sim.blocks["a"][1]  # positions 5 and 6 sit at offsets 1 and 2 of a's second block
    np.testing.assert_array_equal(after[block, 1:3].numpy(), rows[:2])
    untouched = torch.ones(before.shape[:2], dtype=torch.bool)
    untouched[block, 1:3] = False
    untouched[rec.dummy_block] = False
    assert torch.equal(after[untouched], before[untouched])
    # Padding rows race for the dummy slot (element-wise on CUDA): each element comes from
    # some padding row.
    dummy_row = after[rec.dummy_block, 0].numpy()
    assert (dummy_row[None] == rows[2:]).any(axis=0).all()


@pytest.mark.parametrize("num_experts,dtype", [(300, torch.int16), (70000, torch.int32)])
def test_wide_expert_ids_survive(device, num_experts, dtype):
    rec = make_recorder(device, num_experts=num_experts)
    assert rec.dtype == dtype and rec.staging.dtype == dtype and rec.block_routing.dtype == dtype
    sim = PagedSim(rec)
    sim.step([("a", 0, 12)])
    sim.finish("a", 12)
    result = rec.wait_all()["a"]
    assert result.max() > 255
    np.testing.assert_array_equal(result, sim.expected("a", 12))


def test_results_own_their_memory(device):
    rec = make_recorder(device)
    sim = PagedSim(rec)
    sim.step([("a", 0, 5), ("b", 0, 5)])
    sim.finish("a", 5)
    sim.finish("b", 5)
    results = rec.wait_all()
    for rows in results.values():
        assert rows.flags.writeable and rows.flags.c_contiguous and rows.base is None
    assert not np.shares_memory(results["a"], results["b"])


def test_poll_discard_and_pending(device):
    rec = make_recorder(device)
    sim = PagedSim(rec)
    sim.step([("a", 0, 6), ("b", 0, 3)])
    sim.preempt("a", 6)
    rec.discard("a")  # aborted while preempted: its snapshot must not leak into a reuse of the key
    sim.finish("b", 3)
    assert rec.num_pending == 1
    done = rec.wait_all()
    assert set(done) == {"b"} and rec.num_pending == 0 and rec.poll() == {}
    sim.oracle.pop("a")
    sim.step([("a", 0, 4)])
    sim.finish("a", 4)
    np.testing.assert_array_equal(rec.wait_all()["a"], sim.expected("a", 4))


def test_empty_result_when_start_equals_rows(device):
    rec = make_recorder(device)
    sim = PagedSim(rec)
    sim.step([("a", 0, 4)])
    sim.finish("a", 4, start=4)
    assert rec.wait_all()["a"].shape == (0, rec.num_moe_layers, rec.topk)


def test_invalid_calls_are_rejected():
    rec = make_recorder("cpu")
    good = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError):
        rec.gather(good.to(torch.int32), good)
    with pytest.raises(ValueError):
        rec.gather(good, torch.zeros(3, dtype=torch.int64))
    too_many = torch.zeros(rec.max_step_tokens + 1, dtype=torch.int64)
    with pytest.raises(ValueError):
        rec.gather(too_many, too_many)
    with pytest.raises(ValueError):
        rec.reconstruct("a", [0], 5)  # 5 rows need 2 blocks of 4
    with pytest.raises(ValueError):
        rec.reconstruct("a", [0, rec.num_kv_blocks], 5)  # the dummy block is not a request's
    with pytest.raises(ValueError):
        rec.reconstruct("a", [0, 1], 5, start=6)
    rec.reconstruct("a", [0, 1], 5)
    with pytest.raises(ValueError):
        rec.reconstruct("a", [0, 1], 5)
    with pytest.raises(ValueError):
        rec.snapshot_preempted("a", [0, 1], 5)
    with pytest.raises(ValueError):
        expected_num_rows(3, 0)
    assert expected_num_rows(3, 1) == 3


@needs_cuda
def test_step_path_never_syncs_on_cuda():
    rec = make_recorder("cuda")
    n = 10
    to_block = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2], dtype=torch.int64, device="cuda")
    to_offset = torch.arange(n, device="cuda") % rec.block_size
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rec.staging[:n] = torch.randint(0, rec.num_experts, (n, 3, 2), device="cuda").to(rec.dtype)
        rec.gather(to_block, to_offset)
        rec.snapshot_preempted("a", [0, 1, 2], 6)
        rec.reconstruct("a", [0, 1, 2], 10)
        results = rec.poll()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    results.update(rec.wait_all())
    np.testing.assert_array_equal(results["a"], rec.staging[:n].cpu().numpy())


@needs_cuda
def test_gather_replays_inside_cuda_graph():
    rec = make_recorder("cuda")
    to_block = torch.zeros(4, dtype=torch.int64, device="cuda")
    to_offset = torch.zeros(4, dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        rec.gather(to_block, to_offset)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rec.gather(to_block, to_offset)
    for step in range(2):
        to_block.copy_(torch.tensor([3 + step] * 4))
        to_offset.copy_(torch.arange(4))
        rec.staging[:4] = torch.randint(0, rec.num_experts, (4, 3, 2), device="cuda").to(rec.dtype)
        graph.replay()
        assert torch.equal(rec.block_routing[3 + step], rec.staging[:4])
