"""The fused small-ops switch on CPU: the knob's modes, which modules take which kernel,
and that the CPU path is unchanged (the kernels run on CUDA tensors only; their numerics
are checked in tests/inference/kernels and tests/gpu/test_fused_small_ops_cuda.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.kernels.router_topk import triton
from inference.kernels.small_ops import fused_small_ops_enabled
from inference.presets import build_model, get_preset
from inference.request import SamplingParams
from tests.inference.model.paged_steps import Chunk, PagedSteps


def sigmoid_no_groups():
    """tiny-moe-sigmoid with plain (not group-limited) routing and partial rotary."""
    base = get_preset("tiny-moe-sigmoid")
    return dataclasses.replace(base, name="tiny-sigmoid-flat", rotary_dim=8,
                               router=dataclasses.replace(base.router, num_groups=1, topk_groups=1))


def test_modes_resolve_by_device():
    assert not fused_small_ops_enabled("auto", "cpu") and not fused_small_ops_enabled("off", "cpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        fused_small_ops_enabled("on", "cpu")
    with pytest.raises(ValueError, match="fused_small_ops must be one of"):
        fused_small_ops_enabled("yes", "cpu")
    with pytest.raises(ValueError, match="fused_small_ops must be one of"):
        EngineConfig(fused_small_ops="fast")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        LLMEngine(build_model(get_preset("tiny-moe"), seed=0), EngineConfig(fused_small_ops="on"))


@pytest.mark.skipif(triton is None, reason="triton not installed")
def test_which_modules_take_the_kernels():
    model = build_model(sigmoid_no_groups(), seed=0)
    c = model.config
    counts = model.set_fused_small_ops(True)
    assert counts == {"routers": c.num_moe_layers, "half_logits": 0, "attention": c.num_layers,
                      "residual_norms": 2 * c.num_layers}          # no bf16 GEMM probe on CPU
    assert model.fused_residual_norms
    assert model.set_fused_small_ops(False) == {"routers": 0, "half_logits": 0, "attention": 0, "residual_norms": 0}
    assert not any(getattr(m, "fused", False) or getattr(m, "fused_rotary", False) for m in model.modules())
    # Group-limited routing keeps the torch router; a model without q/k norm still fuses rotary.
    grouped = build_model(get_preset("tiny-moe-sigmoid"), seed=0).set_fused_small_ops(True)
    assert grouped["routers"] == 0 and grouped["attention"] == 4
    # Zero-centred norms (Qwen3-Next-style hybrids): no attention or residual-norm kernel.
    hybrid = build_model(get_preset("tiny-hybrid-gdn"), seed=0)
    counts = hybrid.set_fused_small_ops(True)
    assert counts["attention"] == 0 and counts["residual_norms"] == 0 and counts["routers"] > 0


def test_fused_residual_loop_equals_the_plain_loop(monkeypatch):
    """``_forward_fused_norms`` (add + norm pairs across layer boundaries) on CPU, where each
    pair is the torch add and norm: bitwise the plain forward, logits and routing."""
    config = sigmoid_no_groups()
    sequences = [[5, 9, 2, 7, 11, 3], [8, 1, 4]]
    plain_model, fused_model = build_model(config, seed=3), build_model(config, seed=3)

    def fused_forward(input_ids, positions, ctx):
        h = fused_model.embed_tokens(input_ids)
        return fused_model._forward_fused_norms(h, fused_model.rotary.tables(positions), ctx)

    monkeypatch.setattr(fused_model, "forward", fused_forward)
    plain, fused = PagedSteps(plain_model, sequences), PagedSteps(fused_model, sequences)
    for chunks, pad in (([Chunk(0, 0, 4), Chunk(1, 0, 3)], 1), ([Chunk(0, 4, 2)], 2)):
        (ref_logits, ref_routing), (logits, routing) = plain.step(chunks, pad), fused.step(chunks, pad)
        for a, b in zip(logits + routing, ref_logits + ref_routing):
            assert torch.equal(a, b)


def test_cpu_engine_is_unchanged_with_the_flags_set():
    """With every flag forced on, a CPU engine takes the torch paths (CUDA tensors only):
    the same tokens and routing as with them off."""
    prompts = [[5, 6, 7, 8, 9], [3, 4, 10]]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    outputs = []
    for forced in (False, True):
        model = build_model(sigmoid_no_groups(), seed=1)
        engine = LLMEngine(model, EngineConfig(num_kv_blocks=32, max_requests=2, record_routing=True))
        for m in model.modules():
            if hasattr(m, "fused"):
                m.fused = m.half_logits = forced
            if hasattr(m, "fused_rotary"):
                m.fused_rotary = forced
        model.fused_residual_norms = forced
        results = sorted(engine.generate(prompts, [params] * 2), key=lambda r: r.prompt_token_ids)
        outputs.append([(r.output_token_ids, r.routing.tolist()) for r in results])
    assert outputs[0] == outputs[1]
