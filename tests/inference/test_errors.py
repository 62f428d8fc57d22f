"""inference.errors: allocation failures become AllocationError naming the component, and
missing optional dependencies name the pip extra."""

from __future__ import annotations

import sys

import pytest
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.errors import AllocationError, MissingDependencyError, allocating, require


def test_a_real_cpu_allocation_failure_names_the_component():
    with pytest.raises(AllocationError) as info:
        with allocating("KV cache", "lower --num-kv-blocks"):
            torch.empty(1 << 62, dtype=torch.uint8)
    message = str(info.value)
    assert message.startswith("KV cache: allocation failed (") and message.endswith("; lower --num-kv-blocks")
    assert "enforce fail" not in message and info.value.component == "KV cache"


@pytest.mark.parametrize("error", [MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                   RuntimeError("CUDA error: out of memory")])
def test_out_of_memory_errors_are_translated(error):
    with pytest.raises(AllocationError, match="^CUDA graphs: allocation failed"):
        with allocating("CUDA graphs"):
            raise error


@pytest.mark.parametrize("error", [RuntimeError("shape mismatch"), ValueError("allocation of 3 is odd")])
def test_other_errors_pass_through(error):
    with pytest.raises(type(error), match=str(error)):
        with allocating("weights"):
            raise error


def test_engine_names_the_kv_cache_when_it_cannot_be_allocated(tiny_model):
    with pytest.raises(AllocationError, match="^KV cache: allocation failed.*num_kv_blocks"):
        LLMEngine(tiny_model, EngineConfig(block_size=16, num_kv_blocks=1 << 40, max_requests=4, max_step_tokens=64))


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(MissingDependencyError) as info:
        require("safetensors", "hf", "--hf-checkpoint")
    assert "--hf-checkpoint needs the optional dependency 'safetensors'" in str(info.value)
    assert 'pip install -e ".[hf]"' in str(info.value)
    assert require("math", "none", "arithmetic").sqrt(4) == 2
