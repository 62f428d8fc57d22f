"""The fused small-ops switch on CPU: the knob's modes, which modules take which kernel,
and that the CPU path is unchanged (the kernels run on CUDA tensors only; their numerics
are checked in tests/inference/kernels and tests/gpu/test_fused_small_ops_cuda.py).

The fused KV write in a model: a tiny model's paged forward (prefill, mixed and decode
steps with padding rows) with the norm + rotary kernel writing K/V gives bitwise the
logits, routing and caches of the same kernel followed by ``write_kv``, and matches the
full-sequence reference; the kernels run under Triton's interpreter in a subprocess."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from inference.config import EngineConfig, MLAConfig
from inference.engine import LLMEngine
from inference.kernels.router_topk import triton
from inference.kernels.small_ops import fused_small_ops_enabled
from inference.model.attention import GQAttention
from inference.presets import build_model, get_preset
from inference.request import SamplingParams
from tests.inference.kernels.harness import assert_interpreter_checks_pass, needs_triton, run_interpreter_checks
from tests.inference.model.kv_write_counts import counted_kv_writes
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
                      "kv_writes": c.num_layers, "residual_norms": 2 * c.num_layers}   # no bf16 GEMM probe on CPU
    assert model.fused_residual_norms
    assert model.set_fused_small_ops(True, kv_write=False)["kv_writes"] == 0
    assert not any(getattr(m, "fused_kv_write", False) for m in model.modules())
    assert model.set_fused_small_ops(False) == {"routers": 0, "half_logits": 0, "attention": 0, "kv_writes": 0,
                                                "residual_norms": 0}
    assert not any(getattr(m, "fused", False) or getattr(m, "fused_rotary", False)
                   or getattr(m, "fused_kv_write", False) for m in model.modules())
    # Group-limited routing keeps the torch router; a model without q/k norm still fuses rotary.
    grouped = build_model(get_preset("tiny-moe-sigmoid"), seed=0).set_fused_small_ops(True)
    assert grouped["routers"] == 0 and grouped["attention"] == grouped["kv_writes"] == 4
    # Zero-centred norms (Qwen3-Next-style hybrids): no attention, KV-write or residual-norm kernel.
    hybrid = build_model(get_preset("tiny-hybrid-gdn"), seed=0)
    counts = hybrid.set_fused_small_ops(True)
    assert counts["attention"] == counts["kv_writes"] == counts["residual_norms"] == 0 and counts["routers"] > 0
    # Latent attention keeps its own projection and cache write.
    latent = MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    mla_config = dataclasses.replace(get_preset("tiny-moe"), name="mla", mla=latent)
    mla = build_model(mla_config, seed=0).set_fused_small_ops(True)
    assert mla["attention"] == mla["kv_writes"] == 0


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
                m.fused_rotary = m.fused_kv_write = forced
        model.fused_residual_norms = forced
        results = sorted(engine.generate(prompts, [params] * 2), key=lambda r: r.prompt_token_ids)
        outputs.append([(r.output_token_ids, r.routing.tolist()) for r in results])
    assert outputs[0] == outputs[1]


KV_WRITE_SEQUENCES = [[5, 9, 2, 7, 11, 3], [8, 1, 4, 6, 2]]
KV_WRITE_STEPS = [  # prefill with padding, mixed, decode with padding (the interpreter is slow: few rows)
    ([Chunk(0, 0, 4), Chunk(1, 0, 2)], 1), ([Chunk(0, 4, 1), Chunk(1, 2, 2)], 1),
    ([Chunk(0, 5, 1), Chunk(1, 4, 1)], 1)]


def kv_write_configs():
    """Two-layer models (one dense, one MoE): per-head norm + partial rotary, and an
    OLMoE-style whole-projection norm with full rotary."""
    two = dict(num_layers=2, dense_layers=(0,))
    return {"per-head-partial": dataclasses.replace(sigmoid_no_groups(), **two),
            "full-norm": dataclasses.replace(get_preset("tiny-moe"), name="full", qk_norm="full", **two)}


def paged_run(config, kv_write: bool):
    """The schedule through the paged forward with the fused norm + rotary kernel (run on
    CPU tensors), K/V written by it (``kv_write``) or by ``write_kv``: per step (logits,
    routing), the caches, and how often each write path ran."""
    from unittest import mock
    model = build_model(config, seed=3)
    for m in model.modules():
        if isinstance(m, GQAttention):
            m.fused_rotary, m.fused_kv_write = True, kv_write
    steps = PagedSteps(model, KV_WRITE_SEQUENCES, block_size=4)
    with mock.patch.object(GQAttention, "_kernels_take", staticmethod(lambda x: True)), counted_kv_writes() as calls:
        outputs = [steps.step(chunks, pad) for chunks, pad in KV_WRITE_STEPS]
    return model, outputs, steps, calls


def check_kv_write_model(config) -> None:
    model, fused, steps, calls = paged_run(config, kv_write=True)
    _, unfused, ref_steps, ref_calls = paged_run(config, kv_write=False)
    writes = len(KV_WRITE_STEPS) * config.num_layers
    assert calls == {"write_kv": 0, "fused": writes} and ref_calls == {"write_kv": writes, "fused": 0}
    for (logits, routing), (ref_logits, ref_routing) in zip(fused, unfused):
        assert all(torch.equal(a, b) for a, b in zip(logits + routing, ref_logits + ref_routing))
    real = slice(0, steps.num_blocks)          # padding rows share the dummy block's slot
    for layer, (k, v) in steps.kv.items():
        ref_k, ref_v = ref_steps.kv[layer]
        assert torch.equal(k[real], ref_k[real]) and torch.equal(v[real], ref_v[real]) and k.abs().sum() > 0
    for s, seq in enumerate(KV_WRITE_SEQUENCES):      # rows of sequence s in step order = its positions
        logits = torch.cat([out[0][i] for out, (chunks, _) in zip(fused, KV_WRITE_STEPS)
                            for i, ch in enumerate(chunks) if ch.seq == s])
        routing = torch.cat([out[1][i] for out, (chunks, _) in zip(fused, KV_WRITE_STEPS)
                             for i, ch in enumerate(chunks) if ch.seq == s])
        ref_logits, ref_routing = model.forward_reference(torch.tensor(seq))
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(routing, ref_routing)


def check_interpreter_cases() -> int:
    configs = kv_write_configs()
    for config in configs.values():
        check_kv_write_model(config)
    return len(configs)


@needs_triton
def test_fused_kv_write_in_a_paged_forward_in_interpreter():
    assert_interpreter_checks_pass(__file__, len(kv_write_configs()))


if __name__ == "__main__":
    run_interpreter_checks(check_interpreter_cases)
