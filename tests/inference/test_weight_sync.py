"""Trainer weights back into our names: megatron-core GPTModel (the inverse of the export,
bitwise) and Hugging Face state dicts (what the checkpoint loader loads, bitwise)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from inference.config import RouterConfig
from inference.presets import build_model, get_preset
from inference.weight_sync import named_tensors_from_hf, named_tensors_from_megatron

CASES = {
    "tiny-moe": get_preset("tiny-moe"),
    # sigmoid + expert bias + groups, per-head q/k norm, shared expert
    "tiny-moe-sigmoid": get_preset("tiny-moe-sigmoid"),
    # qkv bias, tied embeddings, gated shared expert
    "qwen2-like": dataclasses.replace(get_preset("tiny-moe"), attention_bias=True, tie_word_embeddings=True,
                                      shared_expert_intermediate_size=48, shared_expert_gate=True,
                                      router=RouterConfig(norm_topk_prob=False)),
    # GLM-4.5: partial rotary, qkv bias, sigmoid + expert bias, groups, shared expert
    "glm-like": dataclasses.replace(get_preset("tiny-moe-sigmoid"), rotary_dim=8, attention_bias=True),
    # GPT-OSS: sinks, o_proj bias, router bias, expert biases
    "gpt-oss-like": dataclasses.replace(
        get_preset("tiny-moe"), dense_layers=(), attention_bias=True, o_proj_bias=True, attention_sinks=True,
        layer_types=("sliding_attention", "full_attention") * 2, sliding_window=4, expert_activation="swiglu_oai",
        expert_bias=True, swiglu_limit=1.5, router=RouterConfig(norm_topk_prob=True, bias=True)),
}


def our_state(model) -> dict[str, torch.Tensor]:
    state = dict(model.named_parameters())
    state.update((n, b) for n, b in model.named_buffers() if n.endswith("expert_bias"))
    return state


def assert_bitwise(pairs, expected: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    got = dict(pairs)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        want = tensor.detach() if dtype is None or name.endswith("expert_bias") else tensor.detach().to(dtype)
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


# ---- megatron-core ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def megatron_runtime():
    pytest.importorskip("megatron.core")
    from inference.megatron_export import cpu_megatron_runtime
    with cpu_megatron_runtime():
        yield


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")   # megatron's own
@pytest.mark.parametrize("case", list(CASES))
def test_megatron_export_round_trips_bitwise(megatron_runtime, case):
    from inference.megatron_export import export_to_megatron
    from routing_replay.megatron import release_model
    model = build_model(CASES[case], seed=2)
    if model.config.router.use_expert_bias:
        assert any(n.endswith("expert_bias") for n in our_state(model))
    gpt = export_to_megatron(model)
    try:
        assert_bitwise(named_tensors_from_megatron(gpt, model.config), our_state(model))
    finally:
        release_model(gpt)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_megatron_bf16_wrapper_and_a_trained_step(megatron_runtime):
    """Float16Module is unwrapped; after an optimizer step the pairs loaded into our model
    compute what the megatron model computes (the mapping is right, not just invertible)."""
    from inference.megatron_export import causal_mask, export_to_megatron
    from routing_replay.megatron import release_model
    model = build_model(CASES["tiny-moe"], seed=4)
    wrapped = export_to_megatron(model, params_dtype=torch.bfloat16, routing_replay=False)
    assert type(wrapped).__name__ == "Float16Module"
    assert_bitwise(named_tensors_from_megatron(wrapped, model.config), our_state(model), torch.bfloat16)
    release_model(wrapped)
    gpt = export_to_megatron(model, routing_replay=False)
    tokens = torch.randint(2, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    args = (tokens, torch.arange(12)[None], causal_mask(1, 12))
    opt = torch.optim.SGD(gpt.parameters(), lr=0.5)
    gpt(*args).float().logsumexp(-1).mean().backward()
    opt.step()
    with torch.no_grad():
        expected = gpt(*args)[0]
        for name, tensor in named_tensors_from_megatron(gpt, model.config):
            our_state(model)[name].copy_(tensor)
    logits, _ = model.forward_reference(tokens[0])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    release_model(gpt)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_megatron_model_of_another_shape_is_refused_before_any_pair(megatron_runtime):
    from inference.megatron_export import export_to_megatron
    from routing_replay.megatron import release_model
    model = build_model(CASES["tiny-moe"], seed=0)
    gpt = export_to_megatron(model)
    other = dataclasses.replace(model.config, num_experts=4, moe_intermediate_size=16)
    with pytest.raises(ValueError, match="no megatron parameter.*local_experts"):
        named_tensors_from_megatron(gpt, dataclasses.replace(model.config, num_experts=16))
    with pytest.raises(ValueError, match="has no place in our model"):
        named_tensors_from_megatron(gpt, other)
    with pytest.raises(ValueError, match=r"linear_fc1.weight: megatron \[64, 64\], ours needs \[32, 64\]"):
        named_tensors_from_megatron(gpt, dataclasses.replace(model.config, moe_intermediate_size=16))
    with pytest.raises(TypeError, match="GPTModel"):
        named_tensors_from_megatron(torch.nn.Linear(2, 2), model.config)
    release_model(gpt)


# ---- Hugging Face ------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
from tests.inference.test_hf_loader import ARCHS, make_hf_model  # noqa: E402


@pytest.fixture(scope="module", params=list(ARCHS))
def hf_checkpoint(request, tmp_path_factory):
    from inference.hf_loader import load_hf_model
    model = make_hf_model(request.param, seed=3)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, path, our_state(load_hf_model(path))


def _saved_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_hf_saved_checkpoint_gives_what_the_loader_loads(hf_checkpoint):
    import json
    model, path, loaded = hf_checkpoint
    raw = json.loads((path / "config.json").read_text())
    saved = _saved_tensors(path)
    assert_bitwise(named_tensors_from_hf(saved, raw), loaded)
    items = sorted(saved.items(), reverse=True)          # experts before their router, down before gate/up
    assert_bitwise(named_tensors_from_hf(iter(items), raw), loaded)


def test_hf_in_memory_state_dict_and_a_shuffled_stream(hf_checkpoint):
    """transformers 5 keeps fused experts in memory (``experts.gate_up_proj``), unlike the
    classic per-expert tensors it saves; a trainer may also stream tensors in any order."""
    model, _, loaded = hf_checkpoint
    state = model.state_dict()
    assert_bitwise(named_tensors_from_hf(state, model.config), loaded)
    items = list(state.items())
    random.Random(0).shuffle(items)
    assert_bitwise(named_tensors_from_hf(iter(items), model.config), loaded)


def test_hf_bad_tensors_are_named(hf_checkpoint):
    from inference.hf.common import HFCheckpointError
    model, path, _ = hf_checkpoint
    state = _saved_tensors(path)
    name = "model.layers.0.self_attn.q_proj.weight"
    missing = {k: v for k, v in state.items() if k != name}
    with pytest.raises(HFCheckpointError, match=f"missing tensor {name}"):
        named_tensors_from_hf(missing, model.config)
    with pytest.raises(HFCheckpointError, match=f"tensor {name} has shape"):
        named_tensors_from_hf({**state, name: state[name][:-1]}, model.config)
    with pytest.raises(HFCheckpointError, match="unexpected tensor model.extra.weight"):
        named_tensors_from_hf({**state, "model.extra.weight": torch.zeros(1)}, model.config)
    with pytest.raises(HFCheckpointError, match=f"(?s)stream ended.*missing tensor {name}"):
        list(named_tensors_from_hf(iter(missing.items()), model.config))
    with pytest.raises(HFCheckpointError, match="(?s)stream ended.*unexpected tensor model.extra.weight"):
        list(named_tensors_from_hf(iter([("model.extra.weight", torch.zeros(1)), *state.items()]), model.config))
    with pytest.raises(HFCheckpointError, match="arrived twice"):
        list(named_tensors_from_hf(iter([*state.items(), (name, state[name])]), model.config))
