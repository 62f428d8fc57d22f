"""GPU engine with ``skinny_linear_max_tokens`` on vs off: the attention projections of
steps up to the threshold run the skinny GEMM kernel (captured in the decode graphs of
those sizes, counted), larger steps keep cuBLAS; in fp32 the same tokens and routing as
off, both exact against the full-sequence reference (which never takes the kernel), no
host sync in steady-state decode; in bf16, the same routing away from near-ties."""

from __future__ import annotations

import dataclasses
from unittest import mock

import numpy as np
import pytest
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.kernels import skinny_linear as sk
from inference.presets import build_model, get_preset
from inference.request import SamplingParams
from tests.gpu.engine_checks import assert_graph_decode_without_host_sync, assert_same_results_as_the_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CONFIGS = {"tiny-moe": get_preset("tiny-moe"),
           "biased-full-norm": dataclasses.replace(get_preset("tiny-moe"), name="biased", qk_norm="full",
                                                   attention_bias=True, o_proj_bias=True)}
THRESHOLD = 4


def _prompts(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 512, size=int(rng.integers(3, 40))).tolist() for _ in range(n)]


def _engine(model, max_tokens, dtype="float32"):
    return LLMEngine(model, EngineConfig(block_size=16, num_kv_blocks=256, max_requests=16, max_step_tokens=256,
                                         dtype=dtype, device="cuda", record_routing=True, cuda_graphs=True,
                                         async_scheduling=True, skinny_linear_max_tokens=max_tokens))


def _generate(model, max_tokens, prompts, dtype="float32"):
    """(engine, results, rows of every kernel launch: engine build and graph capture included)."""
    rows, real = [], sk._launch
    with mock.patch.object(sk, "_launch", lambda x, *a: (rows.append(x.shape[0]), real(x, *a))[1]):
        engine = _engine(model, max_tokens, dtype)
        params = [SamplingParams(max_new_tokens=4 + i % 7, ignore_eos=True) for i in range(len(prompts))]
        results = sorted(engine.generate(prompts, params), key=lambda r: prompts.index(r.prompt_token_ids))
    assert any(e["cuda_graph"] for e in engine.step_log.entries)
    return engine, results, rows


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_tokens_and_routing_equal_with_the_kernel_on_and_off(name):
    model = build_model(CONFIGS[name], seed=0, dtype=torch.float32, device="cuda")
    prompts = _prompts(12, seed=1)
    on, skinny, rows = _generate(model, THRESHOLD, prompts)
    assert on.skinny_linear == {"max_tokens": THRESHOLD, "projections": 2 * model.config.num_layers}
    # Decode graph sizes 1, 2, 4 captured the kernel; larger sizes and prefill steps did not.
    assert rows and max(rows) <= THRESHOLD and {1, 2, 4} <= set(rows)
    off, plain, off_rows = _generate(model, 0, prompts)
    assert off_rows == []
    assert_same_results_as_the_reference(model, skinny, plain)


def test_skinny_decode_has_no_host_sync():
    model = build_model(CONFIGS["tiny-moe"], seed=0, dtype=torch.float32, device="cuda")
    engine = _engine(model, 16)
    for i, p in enumerate(_prompts(8, seed=2)):
        engine.add_request(p, SamplingParams(max_new_tokens=12, ignore_eos=True), request_id=str(i))
    assert_graph_decode_without_host_sync(engine, warm_steps=4, checked_steps=6)


def test_bf16_routing_agrees_away_from_near_ties():
    """bf16: the kernel sums in another order than cuBLAS (both fp32 accumulation, one
    rounding). The prompts' prefill steps are longer than the threshold (cuBLAS in both
    runs), so the first tokens are the same; the first decode step (16 rows: the kernel)
    then routes the first generated token the same on nearly every request (a random tiny
    model's bf16 router is full of near-ties)."""
    model = build_model(CONFIGS["biased-full-norm"], seed=0, dtype=torch.bfloat16, device="cuda")
    prompts = _prompts(16, seed=3)
    _, skinny, rows = _generate(model, 16, prompts, "bfloat16")
    _, plain, _ = _generate(model, 0, prompts, "bfloat16")
    assert rows and max(rows) <= 16
    assert all(a.output_token_ids[0] == b.output_token_ids[0] for a, b in zip(skinny, plain))
    same = sum(np.array_equal(a.routing[len(a.prompt_token_ids)], b.routing[len(b.prompt_token_ids)])
               for a, b in zip(skinny, plain))
    assert same >= 0.75 * len(prompts), same
