"""config.json and checkpoint mapping of the newer families: MoE layer indices with dense
first layers, MTP layers skipped and never routed, interleaved and plain rotary layouts,
GPT-OSS layer types, latent KV size, expert ids above 255 through routing.npz, and clear
refusals."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from tests.inference.hf.families import assert_routing_matches, hf_routing, make_hf_model

pytest.importorskip("safetensors")

from inference.config import EngineConfig  # noqa: E402
from inference.engine import LLMEngine  # noqa: E402
from inference.hf_loader import HFCheckpointError, load_hf_config, load_hf_model  # noqa: E402
from inference.cache.kv_cache import KVCache  # noqa: E402
from inference.request import SamplingParams  # noqa: E402
from inference.run_outputs import write_run_outputs  # noqa: E402
from routing_replay import load_routing  # noqa: E402


def _add_mtp_layer(path, num_layers: int) -> int:
    """Append tensors of one next-token-prediction layer (as DeepSeek-V3 / GLM-4.5 store it:
    decoder layer ``num_layers``), copied from the last layer plus its own projections."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(path / "model.safetensors"))
    last = f"model.layers.{num_layers - 1}."
    mtp = {k.replace(last, f"model.layers.{num_layers}."): v.clone() for k, v in tensors.items() if k.startswith(last)}
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight"):
        mtp[f"model.layers.{num_layers}.{name}"] = torch.ones(4)
    save_file({**tensors, **mtp}, str(path / "model.safetensors"))
    return len(mtp)


@pytest.mark.parametrize("name,layers,first_k", [("glm4_moe", 4, 1), ("deepseek_v3", 4, 2)])
def test_dense_first_layers_and_mtp_layers_are_not_moe_layers(tmp_path, caplog, name, layers, first_k):
    hf = make_hf_model(name, num_hidden_layers=layers, first_k_dense_replace=first_k)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    added = _add_mtp_layer(tmp_path, layers)
    config = load_hf_config(tmp_path)
    assert config.moe_layer_indices == tuple(range(first_k, layers))   # the MTP layer is not one of them
    with caplog.at_level(logging.INFO, logger="inference.hf.loader"):
        model = load_hf_model(tmp_path)
    assert f"skipping {added} tensors of 1 next-token-prediction (MTP) layer(s)" in caplog.text
    engine = LLMEngine(model, EngineConfig(record_routing=True, block_size=4, num_kv_blocks=32))
    [result] = engine.generate([[5, 6, 7, 8, 9]], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert result.routing.shape == (7, layers - first_k, config.topk)
    _, ids, scores = hf_routing(hf, result.prompt_token_ids + result.output_token_ids)
    assert len(ids) == layers - first_k
    assert assert_routing_matches(result.routing, ids, scores) == 0


def test_tensors_past_the_mtp_layers_are_still_unexpected(tmp_path):
    make_hf_model("glm4_moe", num_nextn_predict_layers=0).save_pretrained(tmp_path)
    _add_mtp_layer(tmp_path, 3)
    with pytest.raises(HFCheckpointError, match="unexpected tensor model.layers.3.eh_proj.weight"):
        load_hf_model(tmp_path)


@pytest.mark.parametrize("interleave", [True, False])
def test_deepseek_rotary_layouts_both_load(tmp_path, interleave):
    hf = make_hf_model("deepseek_v3", rope_interleave=interleave)
    hf.save_pretrained(tmp_path)
    tokens = [3, 9, 27, 81, 100, 4, 12]
    hf_logits, _, _ = hf_routing(hf, tokens)
    torch.testing.assert_close(load_hf_model(tmp_path).forward_reference(torch.tensor(tokens))[0], hf_logits,
                               atol=1e-4, rtol=0)


def test_config_semantics_of_each_family(tmp_path):
    expected = {  # family: (moe layers, rope dim, router, windows)
        "deepseek_v3": ((1, 2), 8, ("sigmoid", True, 4, 2, 2.5, 2), ()),
        "glm4_moe": ((1, 2), 8, ("sigmoid", True, 2, 1, 1.5, 2), ()),
        "gpt_oss": ((0, 1, 2), 8, ("softmax", False, 1, 1, 1.0, 0), (4, 0, 4)),
        "minimax_m2": ((0, 1, 2), 4, ("sigmoid", True, 1, 1, 1.0, 0), ()),
    }
    for name, (moe, rope_dim, router, windows) in expected.items():
        make_hf_model(name).save_pretrained(tmp_path / name)
        c = load_hf_config(tmp_path / name)
        r = c.router
        assert c.moe_layer_indices == moe and c.rope_dim == rope_dim, name
        assert (r.score_function, r.use_expert_bias, r.num_groups, r.topk_groups, r.scaling_factor,
                r.group_score_topk) == router, name
        if windows:
            assert tuple(c.window_of(i) for i in range(c.num_layers)) == windows
    assert load_hf_config(tmp_path / "gpt_oss").rope_scaling.factor == 4.0
    assert load_hf_config(tmp_path / "glm4_moe").qk_norm == "per_head"
    assert load_hf_config(tmp_path / "minimax_m2").qk_norm == "full"


def test_latent_kv_size_and_memory_plan(tmp_path):
    from tools.memory_plan import plan_memory
    from tools.run_setup import describe_memory_plan
    make_hf_model("deepseek_v3").save_pretrained(tmp_path)
    config = load_hf_config(tmp_path)
    assert config.kv_bytes_per_token == config.num_layers * (16 + 8)      # latent + rotary key, per layer
    cache = KVCache(config, num_blocks=5, block_size=4, dtype=torch.bfloat16, device="cpu")
    assert cache.nbytes == config.num_layers * 6 * 4 * 24 * 2
    assert KVCache.bytes_per_block(config, 4, torch.bfloat16) * 6 == cache.nbytes
    rows, latent = cache.per_layer[1]
    assert rows.shape == (6, 4, 1, 24) and latent.shape == (6, 4, 1, 16) and latent.data_ptr() == rows.data_ptr()
    engine_config = EngineConfig(num_kv_blocks=5, block_size=4, dtype="bfloat16")
    plan = describe_memory_plan(config, engine_config, plan_memory(config, engine_config, torch.device("cpu")), 1)
    assert f"{config.num_layers * 24 * 2} B/token" in plan and "MLA: latent 16 + rotary key 8" in plan


def test_expert_ids_above_255_survive_to_routing_npz(tmp_path):
    hf = make_hf_model("minimax_m2", num_local_experts=300, num_hidden_layers=2)
    hf.save_pretrained(tmp_path / "ckpt")
    engine = LLMEngine(load_hf_model(tmp_path / "ckpt"), EngineConfig(record_routing=True, block_size=4,
                                                                      num_kv_blocks=32))
    results = engine.generate([list(range(3, 40)), [7, 8, 9]], SamplingParams(max_new_tokens=4, ignore_eos=True),
                              request_ids=["a", "b"])
    write_run_outputs(tmp_path / "out", results, engine)
    routing, meta = load_routing(tmp_path / "out")
    assert meta.dtype == "int16" and meta.num_experts == 300
    assert max(int(routing[r].max()) for r in routing) > 255
    for r in results:
        assert np.array_equal(routing[r.request_id], r.routing)
        _, ids, scores = hf_routing(hf, r.prompt_token_ids + r.output_token_ids)
        assert assert_routing_matches(routing[r.request_id], ids, scores) == 0


def _config_json(tmp_path, name, **changes):
    make_hf_model(name).config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


@pytest.mark.parametrize("name,changes,needle", [
    ("gpt_oss", dict(quantization_config={"quant_method": "mxfp4"}), "quantized checkpoints are not supported (quantization_config: mxfp4)"),
    ("minimax_m2", dict(quantization_config={"quant_method": "fp8"}), "quantization_config: fp8"),
    ("deepseek_v3", dict(scoring_func="softmax"), "scoring_func 'softmax' is not supported"),
    ("deepseek_v3", dict(moe_layer_freq=2), "moe_layer_freq 2 is not supported"),
    ("glm4_moe", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "'longrope' is not supported"),
    ("glm4_moe", dict(first_k_dense_replace=3), "first_k_dense_replace 3 leaves no MoE layer"),
])
def test_unsupported_settings_are_refused_clearly(tmp_path, name, changes, needle):
    with pytest.raises(HFCheckpointError) as info:
        load_hf_config(_config_json(tmp_path, name, **changes))
    assert needle in str(info.value)
