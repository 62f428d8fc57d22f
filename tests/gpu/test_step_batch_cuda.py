"""StepBatch on CUDA: pinned staging, one non-blocking copy per step, no host sync, and a GPU
that lags the host by more than the staging ring still sees every step's own inputs."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from inference.step_batch import StepBatch
from tests.inference import step_batch_cases as cases

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _batch(hybrid: bool, min_saved: int | None = None) -> StepBatch:
    extra = {} if min_saved is None else dict(min_bytes_saved_per_op=min_saved)
    return StepBatch(max_step_tokens=cases.MAX_TOKENS, max_requests=cases.MAX_REQUESTS,
                     max_blocks_per_request=cases.MAX_BLOCKS, block_size=cases.BLOCK, dummy_block_id=cases.DUMMY_BLOCK,
                     device=torch.device("cuda"), dummy_state_slot=cases.DUMMY_SLOT if hybrid else None, **extra)


@pytest.mark.parametrize("hybrid", [False, True], ids=["attention", "hybrid"])
@pytest.mark.parametrize("min_saved", [None, 0, 200], ids=["default", "always-split", "sometimes"])
def test_a_lagging_gpu_sees_each_steps_own_inputs(hybrid, min_saved):
    batch = _batch(hybrid, min_saved)
    gen = cases.StepCases(seed=21 + hybrid, hybrid=hybrid, device=torch.device("cuda"))
    assert all(slot.buffer.is_pinned() for slot in batch._slots)
    steps, snapshots = [], []
    torch.cuda.synchronize()
    for i in range(60):
        case = gen.step()                        # its TokenFeed is made outside the no-sync check
        if i % 10 == 0:
            torch.cuda._sleep(20_000_000)         # the GPU falls behind the host by many steps
        torch.cuda.set_sync_debug_mode("error")
        try:
            batch.prepare(case.chunks, **case.kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        steps.append(case)
        snapshots.append(cases.snapshot(batch))   # enqueued behind this step's copy and unpack
    torch.cuda.synchronize()
    bad = [(case.kind, cases.mismatches(case, snap)) for case, snap in zip(steps, snapshots)]
    assert [b for b in bad if b[1]] == []


class _Uploads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.host_to_device, self.on_device = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default:
            if args[1].device.type == "cpu" and args[0].is_cuda:
                assert args[1].is_pinned()
                self.host_to_device.append(args[1].numel())
            elif args[0].is_cuda:
                self.on_device += 1
        return func(*args, **(kwargs or {}))


def test_a_decode_step_is_one_host_to_device_copy():
    batch, gen = _batch(False), cases.StepCases(seed=2, hybrid=False, device=torch.device("cuda"))
    for _ in range(10):
        case = gen.step("padded decode")
        counter = _Uploads()
        with counter:
            batch.prepare(case.chunks, **case.kwargs)
        padded = case.kwargs["num_padded_tokens"]
        assert counter.host_to_device == [8 * 10 * padded + 4 * padded * cases.MAX_BLOCKS]
        assert counter.on_device == 1
        torch.cuda.synchronize()
        assert cases.mismatches(case, cases.snapshot(batch)) == []
