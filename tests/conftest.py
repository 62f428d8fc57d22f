"""Shared fixtures: the tiny preset model and an independent full-sequence reference."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The tests run tiny models: intra-op threads only add overhead (10x on a loaded 2-core
# machine). Set before torch is imported, so CLI subprocesses inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from inference.config import EngineConfig  # noqa: E402
from inference.engine import LLMEngine  # noqa: E402
from inference.presets import build_model, get_preset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model():
    torch.manual_seed(0)
    return build_model(get_preset("tiny-moe"), seed=0, dtype=torch.float32)


@pytest.fixture(scope="session")
def sigmoid_model():
    return build_model(get_preset("tiny-moe-sigmoid"), seed=1, dtype=torch.float32)


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def scheduling(request) -> bool:
    """Every engine-level test runs with synchronous and asynchronous scheduling."""
    return request.param


@pytest.fixture
def make_engine(tiny_model, scheduling):
    """Engines of the tiny model; ``sequence_cache.check_invariants()`` (and the scheduler's)
    run after every step of every engine it makes."""
    def make(model=None, detokenizer=None, **overrides) -> LLMEngine:
        kwargs = dict(block_size=4, num_kv_blocks=256, max_requests=16, max_step_tokens=64,
                      async_scheduling=scheduling)
        kwargs.update(overrides)
        engine = LLMEngine(model or tiny_model, EngineConfig(**kwargs), detokenizer=detokenizer)
        return _checked(engine)
    return make


def _checked(engine: LLMEngine) -> LLMEngine:
    step = engine.step

    def step_and_check():
        results = step()
        engine.sequence_cache.check_invariants()      # the block pool's (and a hybrid's state pool's)
        engine.scheduler.check_invariants()
        return results

    engine.step = step_and_check
    return engine


def reference_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None,
                     ignore_eos: bool = False) -> list[int]:
    """Independent greedy decoding: recompute the whole sequence without KV cache every step."""
    tokens = list(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits, _ = model.forward_reference(torch.tensor(tokens))
        nxt = int(logits[-1].argmax())
        out.append(nxt)
        tokens.append(nxt)
        if nxt == eos and not ignore_eos:
            break
        if len(tokens) >= model.config.max_position_embeddings:
            break
    return out


def reference_routing(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """Top-k ids [prompt + output - 1, moe_layers, topk] of a full-sequence forward, fp32."""
    seq = torch.tensor(prompt + output[:-1])
    _, routing = model.forward_reference(seq)
    return routing


@pytest.fixture
def reference():
    class Ref:
        greedy = staticmethod(reference_greedy)
        routing = staticmethod(reference_routing)
    return Ref
