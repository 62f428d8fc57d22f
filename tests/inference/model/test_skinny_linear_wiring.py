"""``EngineConfig.skinny_linear_max_tokens`` through the engine and the model on CPU.

The option reaches every attention module (``MoEGPT.set_skinny_linear``); steps of at most
that many tokens call ``skinny_linear`` for ``qkv_proj`` and ``o_proj`` (its ``F.linear``
fallback on CPU: tokens and routing identical to the option off, and bitwise the same
logits), larger steps and the reference forward keep ``nn.Linear``. Under Triton's
interpreter (a subprocess, harness.py) the kernel itself runs inside a CPU engine: the same
tokens and routing as nn.Linear, log-probs within fp32 summation noise."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from inference.config import EngineConfig, MLAConfig
from inference.engine import LLMEngine
from inference.kernels import skinny_linear as sk
from inference.model.attention import GQAttention
from inference.presets import build_model, get_preset
from inference.request import SamplingParams
from tests.inference.kernels.harness import assert_interpreter_checks_pass, needs_triton, run_interpreter_checks

PROMPTS = [[5, 6, 7, 8, 9], [3, 4, 10]]
NEW_TOKENS = 5


def biased_config():
    """tiny-moe with q/k/v and o_proj biases (the kernel's bias operand)."""
    return dataclasses.replace(get_preset("tiny-moe"), name="tiny-biased", attention_bias=True, o_proj_bias=True)


@contextmanager
def spied(target: str = "skinny_linear"):
    """Rows of every call of ``inference.kernels.skinny_linear.<target>`` while inside."""
    rows, real = [], getattr(sk, target)

    def spy(x, *args, **kwargs):
        rows.append(x.shape[0])
        return real(x, *args, **kwargs)

    with mock.patch.object(sk, target, spy):
        yield rows


def generate(config, max_tokens: int, target: str = "skinny_linear"):
    """(per request: tokens, routing, log-probs), the engine's report, and the row count
    of every ``target`` call."""
    model = build_model(config, seed=1)
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=32, max_requests=2, record_routing=True,
                                           skinny_linear_max_tokens=max_tokens))
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    with spied(target) as rows:
        results = sorted(engine.generate(PROMPTS, [params] * 2), key=lambda r: r.prompt_token_ids)
    return [(r.output_token_ids, r.routing.tolist(), r.output_logprobs) for r in results], engine, rows


@pytest.mark.parametrize("bad", [-1, "2", 1.5, True, None])
def test_bad_thresholds_are_rejected(bad):
    with pytest.raises(ValueError, match="skinny_linear_max_tokens must be an int >= 0"):
        EngineConfig(skinny_linear_max_tokens=bad)
    with pytest.raises(ValueError, match="skinny_linear_max_tokens must be an int >= 0"):
        build_model(get_preset("tiny-moe"), seed=0).set_skinny_linear(bad)


def test_modules_report_the_option():
    model = build_model(biased_config(), seed=0)
    attention = [m for m in model.modules() if isinstance(m, GQAttention)]
    assert len(attention) == model.config.num_layers and all(m.skinny_linear_max_tokens == 0 for m in attention)
    assert model.set_skinny_linear(8) == {"max_tokens": 8, "projections": 2 * len(attention)}
    assert all(m.skinny_linear_max_tokens == 8 for m in attention)
    assert model.set_skinny_linear(0) == {"max_tokens": 0, "projections": 0}
    assert all(m.skinny_linear_max_tokens == 0 for m in attention)
    latent = MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    mla = build_model(dataclasses.replace(get_preset("tiny-moe"), name="mla", mla=latent), seed=0)
    assert mla.set_skinny_linear(8)["projections"] == 0     # latent attention keeps its projections


def test_cpu_engine_gives_the_same_outputs_with_the_option_on():
    off, off_engine, off_rows = generate(biased_config(), 0)
    on, on_engine, on_rows = generate(biased_config(), 16)
    assert off_engine.skinny_linear == {"max_tokens": 0, "projections": 0} and off_rows == []
    assert on_engine.skinny_linear["max_tokens"] == 16
    assert all(m.skinny_linear_max_tokens == 16 for m in on_engine.model.modules() if isinstance(m, GQAttention))
    assert on == off                    # the F.linear fallback: bitwise nn.Linear, log-probs included
    layers = biased_config().num_layers
    # 8 prompt tokens in one step, then decode steps of 2 rows (the last token of each
    # request is never fed back): every step fits under 16.
    assert len(on_rows) == 2 * layers * NEW_TOKENS and set(on_rows) <= {8, 2}


def test_steps_above_the_threshold_and_the_reference_keep_nn_linear():
    _, engine, rows = generate(biased_config(), 2)
    assert rows and set(rows) == {2}     # the 8-token prefill step stays on nn.Linear
    with spied() as reference_rows:
        engine.model.forward_reference(torch.tensor([4]))
    assert reference_rows == []


def check_kernel_in_engine() -> int:
    """The Triton kernel (interpreted) in place of nn.Linear in a CPU engine."""
    off, _, off_launches = generate(biased_config(), 0, target="_launch")
    on, _, launches = generate(biased_config(), 16, target="_launch")
    assert off_launches == [] and len(launches) == 2 * biased_config().num_layers * NEW_TOKENS
    for (tokens, routing, logprobs), (ref_tokens, ref_routing, ref_logprobs) in zip(on, off):
        assert tokens == ref_tokens and routing == ref_routing
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref_logprobs), rtol=1e-4, atol=1e-4)
    return 1


@needs_triton
def test_kernel_in_a_cpu_engine_in_interpreter():
    assert_interpreter_checks_pass(__file__, 1)


if __name__ == "__main__":
    run_interpreter_checks(check_kernel_in_engine)
