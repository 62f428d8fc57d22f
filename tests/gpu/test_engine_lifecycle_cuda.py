"""GPU lifecycle: refit keeps captured graphs valid; sleep releases everything but the
weights; close returns memory to its level before the engine, also over ten engines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.presets import build_model, get_preset
from inference.request import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
MiB = 1 << 20


def _config(**kw):
    cfg = dict(block_size=16, num_kv_blocks=1024, max_requests=16, max_step_tokens=256, dtype="float32",
               device="cuda", record_routing=True, cuda_graphs=True, async_scheduling=True)
    cfg.update(kw)
    return EngineConfig(**cfg)


def _serve(engine, prompts, max_new=6):
    return engine.generate(prompts, SamplingParams(max_new_tokens=max_new, ignore_eos=True))


def _prompts(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 512, size=int(rng.integers(5, 30))).tolist() for _ in range(n)]


def _allocated() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def test_refit_keeps_graphs_and_serves_the_new_weights_exactly():
    served = build_model(get_preset("tiny-moe"), seed=0, dtype=torch.float32, device="cuda")
    trained = build_model(get_preset("tiny-moe"), seed=1, dtype=torch.float32, device="cuda")
    engine = LLMEngine(served, _config())
    _serve(engine, _prompts(4, seed=1))
    graphs = dict(engine.graph_runner._graphs)
    engine.update_weights(trained.state_dict().items())
    assert engine.graph_runner._graphs == graphs, "graphs must not be re-captured"
    results = _serve(engine, _prompts(6, seed=2))
    assert any(e["cuda_graph"] for e in engine.step_log.entries)
    for r in results:
        seq = torch.tensor(r.prompt_token_ids + r.output_token_ids, device="cuda")
        logits, routing = trained.forward_reference(seq[:-1])
        assert logits[len(r.prompt_token_ids) - 1:].argmax(-1).tolist() == r.output_token_ids
        assert torch.equal(torch.from_numpy(r.routing.astype(np.int64)).cuda(), routing)
        assert r.weight_version == 1
    engine.close()


def test_sleep_close_and_ten_engines_in_a_row_leak_nothing():
    model = build_model(get_preset("tiny-moe"), seed=0, dtype=torch.float32, device="cuda")
    before = _allocated()
    engine = LLMEngine(model, _config())
    expected = [r.output_token_ids for r in _serve(engine, _prompts(4, seed=3))]
    awake = _allocated()
    assert awake > before + 8 * MiB, "the KV cache alone is larger than this"
    engine.sleep()
    asleep = _allocated()
    assert asleep - before < 1 * MiB, f"sleep kept {(asleep - before) / MiB:.2f} MiB"
    engine.wake_up()
    assert [r.output_token_ids for r in _serve(engine, _prompts(4, seed=3))] == expected
    engine.close()
    assert abs(_allocated() - before) < 1 * MiB
    levels = []
    for _ in range(10):
        with LLMEngine(model, _config()) as e:
            _serve(e, _prompts(2, seed=4))
        levels.append(_allocated())
    assert max(levels) - before < 1 * MiB, [(level - before) / MiB for level in levels]
