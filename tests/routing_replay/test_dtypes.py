import numpy as np
import pytest
import torch

from routing_replay import numpy_dtype, routing_dtype

CANDIDATES = (torch.uint8, torch.int16, torch.int32)


@pytest.mark.parametrize("num_experts", [1, 8, 255, 256, 257, 300, 32766, 32767, 32768, 70000])
def test_dtype_holds_every_id(num_experts):
    dtype = routing_dtype(num_experts)
    assert dtype in CANDIDATES
    ids = torch.arange(num_experts, dtype=torch.int64)
    assert torch.equal(ids.to(dtype).to(torch.int64), ids)


def test_one_byte_for_up_to_256_experts():
    assert all(routing_dtype(n).itemsize == 1 for n in (1, 64, 256))


@pytest.mark.parametrize("num_experts,dtype", [(256, torch.uint8), (257, torch.int16),
                                               (32767, torch.int16), (32768, torch.int32)])
def test_documented_boundaries(num_experts, dtype):
    assert routing_dtype(num_experts) == dtype


@pytest.mark.parametrize("bad", [0, -3])
def test_rejects_fewer_than_one_expert(bad):
    with pytest.raises(ValueError):
        routing_dtype(bad)


def test_rejects_non_int():
    with pytest.raises(TypeError):
        routing_dtype(8.0)


@pytest.mark.parametrize("dtype", CANDIDATES)
def test_numpy_dtype_matches_layout(dtype):
    values = torch.tensor([0, 1, torch.iinfo(dtype).max], dtype=dtype)
    converted = numpy_dtype(dtype)
    assert values.numpy().dtype == converted
    assert np.iinfo(converted).max == torch.iinfo(dtype).max


def test_numpy_dtype_rejects_floats():
    with pytest.raises(ValueError):
        numpy_dtype(torch.float32)
