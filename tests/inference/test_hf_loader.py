"""HF checkpoints (tiny, random, written by transformers' own save_pretrained) served by our
engine: greedy tokens and recorded routing equal transformers' forward of the same files."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from inference.config import EngineConfig  # noqa: E402
from inference.engine import LLMEngine  # noqa: E402
from inference.hf_loader import HFCheckpointError, load_hf_config, load_hf_model, load_tokenizer  # noqa: E402
from inference.request import SamplingParams  # noqa: E402

VOCAB = 160
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, eos_token_id=1, pad_token_id=0, bos_token_id=2)
ARCHS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=24)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=48,
                       shared_expert_intermediate_size=40, mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=24, intermediate_size=48,
                       head_dim=16, decoder_sparse_step=1, mlp_only_layers=[0], norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(num_experts=6, num_experts_per_tok=2, intermediate_size=24, norm_topk_prob=False)),
}


def make_hf_model(arch: str, seed: int = 0, **overrides):
    """A tiny transformers model with weights of realistic scale: 1/sqrt(fan_in) matrices
    give routers decisive logits (HF's 0.02 init would make every routing a near-tie) and
    norms away from 1 catch a norm mapped to the wrong place."""
    config_cls, model_cls, extra = ARCHS[arch]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else noise / math.sqrt(p.shape[-1]))
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, tmp_path_factory):
    model = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def _hf_topk_sets(hf_model, tokens: list[int], topk: int) -> list[torch.Tensor]:
    with torch.no_grad():
        out = hf_model(torch.tensor([tokens]), output_router_logits=True)
    return out.logits[0], [torch.topk(rl.float().softmax(-1), topk).indices.sort(-1).values for rl in out.router_logits]


def test_engine_matches_transformers(checkpoint):
    arch, hf_model, path = checkpoint
    model = load_hf_model(path)
    config = model.config
    engine = LLMEngine(model, EngineConfig(record_routing=True, block_size=4, num_kv_blocks=64, max_step_tokens=16))
    prompts = [[3, 50, 7, 99, 120], [11, 12], [150, 4, 4, 4, 8, 9, 10, 30, 31]]
    results = engine.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
    for r in results:
        seq = r.prompt_token_ids + r.output_token_ids
        logits, hf_sets = _hf_topk_sets(hf_model, seq, config.topk)
        # teacher-forced argmax of transformers = our greedy continuation
        assert logits[len(r.prompt_token_ids) - 1:-1].argmax(-1).tolist() == r.output_token_ids
        assert len(hf_sets) == config.num_moe_layers == r.routing.shape[1]
        ours = torch.as_tensor(r.routing.astype("int64")).sort(-1).values
        for j, hf in enumerate(hf_sets):
            assert torch.equal(ours[:, j], hf[:-1]), f"{arch}: MoE layer {j} routes differently"
        ref_logits, _ = model.forward_reference(torch.tensor(seq))
        torch.testing.assert_close(ref_logits, logits, atol=1e-4, rtol=0)


def test_config_semantics(checkpoint):
    arch, _, path = checkpoint
    config = load_hf_config(path)
    expected = {"mixtral": ((), "none", True, False, 0), "qwen2_moe": ((1,), "none", False, True, 40),
                "qwen3_moe": ((0,), "per_head", True, False, 0), "olmoe": ((), "full", False, False, 0)}[arch]
    assert (config.dense_layers, config.qk_norm, config.router.norm_topk_prob, config.attention_bias,
            config.shared_expert_intermediate_size) == expected
    assert config.shared_expert_gate == (arch == "qwen2_moe") and config.eos_token_id == 1


def test_decoder_sparse_step_picks_moe_layers(tmp_path):
    model = make_hf_model("qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[])
    model.save_pretrained(tmp_path)
    assert load_hf_config(tmp_path).moe_layer_indices == (1, 3)   # HF: (i + 1) % step == 0
    ours = load_hf_model(tmp_path)
    with torch.no_grad():
        hf = model(torch.tensor([[5, 6, 7, 8]])).logits[0]
    torch.testing.assert_close(ours.forward_reference(torch.tensor([5, 6, 7, 8]))[0], hf, atol=1e-4, rtol=0)


@pytest.mark.parametrize("save_kwargs", [dict(save_original_format=False), dict(max_shard_size="40KB")],
                         ids=["fused-experts", "sharded"])
def test_fused_and_sharded_layouts_load_the_same_weights(tmp_path, save_kwargs):
    model = make_hf_model("mixtral", seed=1)
    model.save_pretrained(tmp_path / "classic")
    model.save_pretrained(tmp_path / "other", **save_kwargs)
    names = json.loads((tmp_path / "other" / "model.safetensors.index.json").read_text())["weight_map"] \
        if "max_shard_size" in save_kwargs else None
    if names is not None:
        assert len(set(names.values())) > 1
    a, b = load_hf_model(tmp_path / "classic"), load_hf_model(tmp_path / "other")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_dtype_and_tied_embeddings(tmp_path):
    model = make_hf_model("olmoe", tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path, dtype=torch.bfloat16)
    assert ours.lm_head.weight.data_ptr() == ours.embed_tokens.weight.data_ptr()
    assert ours.embed_tokens.weight.dtype == torch.bfloat16 and ours.rotary.cos.dtype == torch.float32
    torch.testing.assert_close(ours.embed_tokens.weight.float(), model.model.embed_tokens.weight, atol=1e-2, rtol=1e-2)
    tokens = [7, 8, 9, 100]
    with torch.no_grad():
        hf_logits = model(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(load_hf_model(tmp_path).forward_reference(torch.tensor(tokens))[0], hf_logits,
                               atol=1e-4, rtol=0)


def _edit_checkpoint(path, drop: str, reshape: str, extra: str) -> None:
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(path / "model.safetensors"))
    del tensors[drop]
    tensors[reshape] = tensors[reshape][:-1]
    tensors[extra] = torch.zeros(3)
    save_file(tensors, str(path / "model.safetensors"))


def test_bad_tensors_are_all_listed(tmp_path):
    make_hf_model("qwen2_moe").save_pretrained(tmp_path)
    _edit_checkpoint(tmp_path, drop="model.layers.0.mlp.experts.3.up_proj.weight",
                     reshape="model.layers.2.self_attn.k_proj.weight", extra="model.layers.0.mlp.surprise.weight")
    with pytest.raises(HFCheckpointError) as info:
        load_hf_model(tmp_path)
    message = str(info.value)
    assert "missing tensor model.layers.0.mlp.experts.3.up_proj.weight (expected shape [24, 32])" in message
    assert "tensor model.layers.2.self_attn.k_proj.weight has shape [15, 32], expected [16, 32]" in message
    assert "unexpected tensor model.layers.0.mlp.surprise.weight" in message
    assert len(info.value.problems) == 3


def _write_config(path, **fields):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(fields))
    return path


@pytest.mark.parametrize("fields,needle", [
    (dict(model_type="llama"), "unsupported architecture 'llama'"),
    (dict(model_type="deepseek_v2"), "deepseek_v3 and kimi_k2 are"),
    (dict(model_type="gpt_oss"), "config.json lacks vocab_size"),
])
def test_unsupported_architectures(tmp_path, fields, needle):
    with pytest.raises(HFCheckpointError, match=needle):
        load_hf_config(_write_config(tmp_path, **fields))


def test_unsupported_settings_are_listed_together(tmp_path):
    config = make_hf_model("olmoe").config.to_dict()
    config.update(hidden_act="gelu", clip_qkv=8.0, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4})
    with pytest.raises(HFCheckpointError) as info:
        load_hf_config(_write_config(tmp_path, **config))
    assert len(info.value.problems) == 3
    assert all(word in str(info.value) for word in ("gelu", "clip_qkv", "dynamic"))


def test_pickle_checkpoints_are_never_loaded(tmp_path):
    make_hf_model("mixtral").config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(HFCheckpointError, match="pickle files are never loaded"):
        load_hf_model(tmp_path)
    with pytest.raises(HFCheckpointError, match="no config.json"):
        load_hf_config(tmp_path / "missing")


def test_load_tokenizer_reads_the_local_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"[UNK]": 0, "hello": 1, "routing": 2, "replay": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.encode("routing replay hello", add_special_tokens=False) == [2, 3, 1]
    assert tokenizer.decode([3, 2]) == "replay routing"
    with pytest.raises(HFCheckpointError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "nothing")
