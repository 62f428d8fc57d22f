"""Hybrid checkpoints (Qwen3-Next, Qwen3.5-MoE multimodal and text-only, Nemotron-H in both
tensor layouts), tiny and random, saved by transformers' save_pretrained: our reference
forward and our paged forward (chunks + decodes, states in a StatePool) give transformers'
logits and routing; config semantics (MoE layers over the full layer list, layer kinds);
MTP layers and the vision tower skipped with a log line and never routed; 512 experts reach
routing.npz as int16; unsupported settings refused clearly."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from tests.inference.hf.families import assert_routing_matches
from tests.inference.hf.hybrid_families import hf_hybrid_routing, make_hybrid_model, randomize, transformers
from tests.inference.model.paged_steps import Chunk, PagedSteps

pytest.importorskip("safetensors")

from inference.hf_loader import HFCheckpointError, load_hf_config, load_hf_model  # noqa: E402
from inference.run_outputs import routing_meta_for  # noqa: E402
from routing_replay import load_routing  # noqa: E402
from routing_replay.dtypes import numpy_dtype, routing_dtype  # noqa: E402
from routing_replay.outputs import save_routing  # noqa: E402

TOKENS = [5, 17, 99, 23, 42, 8, 150, 3, 77, 64, 31, 12, 140, 9, 56, 101, 44, 6, 120, 88, 15]


def _save(hf, path, **kwargs):
    hf.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="module", params=["qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text", "nemotron_h",
                                        "nemotron_h_fused"])
def checkpoint(request, tmp_path_factory):
    name = request.param
    path = tmp_path_factory.mktemp(name)
    if name == "qwen3_5_moe_text":
        config = transformers.Qwen3_5MoeTextConfig(**make_hybrid_model("qwen3_5_moe").config.text_config.to_dict())
        hf = transformers.Qwen3_5MoeForCausalLM(config).eval()
        randomize(hf, seed=0)
    else:
        hf = make_hybrid_model(name.removesuffix("_fused"))
    _save(hf, path, **({"save_original_format": False} if name.endswith("_fused") else {}))
    return name, hf, path


def test_reference_forward_matches_transformers(checkpoint, caplog):
    name, hf, path = checkpoint
    with caplog.at_level(logging.INFO, logger="inference.hf.loader"):
        ours = load_hf_model(path)
    if name == "qwen3_5_moe":
        assert "skipping 21 tensors of the vision tower" in caplog.text
    logits, ids, scores = hf_hybrid_routing(hf, TOKENS)
    ref_logits, routing = ours.forward_reference(torch.tensor(TOKENS))
    torch.testing.assert_close(ref_logits, logits, atol=1e-4, rtol=0)
    assert len(ids) == ours.config.num_moe_layers
    assert assert_routing_matches(routing.numpy(), ids, scores) == 0


def test_paged_forward_matches_transformers(checkpoint):
    """Two sequences, chunked prefill then decodes in one batch, through the paged path."""
    _, hf, path = checkpoint
    ours = load_hf_model(path)
    seqs = [TOKENS, TOKENS[3:16]]
    run = PagedSteps(ours, seqs, block_size=4)
    expected = [hf_hybrid_routing(hf, s) for s in seqs]
    steps = [[Chunk(0, 0, 6), Chunk(1, 0, 9)], [Chunk(0, 6, 12), Chunk(1, 9, 1)]]
    steps += [[Chunk(0, 18 + j, 1), Chunk(1, 10 + j, 1)] for j in range(3)]
    per_seq = [([], []), ([], [])]
    for chunks in steps:
        logits, routing = run.step(chunks, pad=1)
        for ch, lg, rt in zip(chunks, logits, routing):
            per_seq[ch.seq][0].append(lg)
            per_seq[ch.seq][1].append(rt)
    for s, (hf_logits, ids, scores) in enumerate(expected):
        torch.testing.assert_close(torch.cat(per_seq[s][0]), hf_logits, atol=1e-4, rtol=0)
        assert assert_routing_matches(torch.cat(per_seq[s][1]).numpy(), ids, scores) == 0


def test_config_semantics(tmp_path):
    _save(make_hybrid_model("qwen3_next"), tmp_path / "next")
    c = load_hf_config(tmp_path / "next")
    assert c.layer_types == ("gated_deltanet",) * 3 + ("full_attention",)
    assert c.moe_layer_indices == (0, 2, 3) and c.dense_layers == (1,)          # mlp_only_layers=[1]
    assert c.attention_layer_indices == (3,) and c.recurrent_layer_indices == (0, 1, 2)
    assert c.attention_output_gate and c.zero_centered_norms and c.rope_dim == 2 and c.qk_norm == "per_head"
    assert (c.shared_expert_intermediate_size, c.shared_expert_gate) == (24, True)
    assert (c.gated_deltanet.num_k_heads, c.gated_deltanet.num_v_heads, c.gated_deltanet.head_k_dim) == (2, 4, 8)
    _save(make_hybrid_model("qwen3_5_moe"), tmp_path / "q35")
    assert load_hf_config(tmp_path / "q35").moe_layer_indices == (0, 1, 2, 3)
    _save(make_hybrid_model("nemotron_h"), tmp_path / "nem")
    n = load_hf_config(tmp_path / "nem")                   # M E * E - M E
    assert n.layer_types == ("mamba2", "none", "full_attention", "none", "none", "mamba2", "none")
    assert n.mlp_types == ("none", "moe", "none", "moe", "dense", "none", "moe")
    assert n.moe_layer_indices == (1, 3, 6) and n.attention_layer_indices == (2,) and n.dense_layers == (4,)
    assert not n.use_rope and n.expert_activation == "relu2"
    r = n.router
    assert (r.score_function, r.use_expert_bias, r.num_groups, r.topk_groups, r.group_score_topk,
            r.scaling_factor) == ("sigmoid", True, 2, 1, 2, 2.5)
    assert (n.mamba2.num_heads, n.mamba2.head_dim, n.mamba2.state_size, n.mamba2.n_groups) == (4, 8, 8, 2)
    assert n.mamba2.dt_min == 0.001 and n.mamba2.dt_max is None


def _add_mtp(path, config_key: str) -> int:
    """MTP tensors as Qwen3-Next / Nemotron-H store them (``mtp.*``), declared in config.json."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(path / "model.safetensors"))
    mtp = {"mtp.fc.weight": torch.ones(4, 4), "mtp.layers.0.input_layernorm.weight": torch.ones(4),
           "mtp.norm.weight": torch.ones(4)}
    save_file({**tensors, **mtp}, str(path / "model.safetensors"))
    raw = json.loads((path / "config.json").read_text())
    raw[config_key] = 1
    (path / "config.json").write_text(json.dumps(raw))
    return len(mtp)


@pytest.mark.parametrize("name,key", [("qwen3_next", "mtp_num_hidden_layers"), ("nemotron_h", "num_nextn_predict_layers")])
def test_mtp_layers_are_skipped_and_never_routed(tmp_path, caplog, name, key):
    hf = make_hybrid_model(name)
    _save(hf, tmp_path)
    added = _add_mtp(tmp_path, key)
    with caplog.at_level(logging.INFO, logger="inference.hf.loader"):
        ours = load_hf_model(tmp_path)
    assert f"skipping {added} tensors of 1 next-token-prediction (MTP) layer(s)" in caplog.text
    _, routing = ours.forward_reference(torch.tensor(TOKENS))
    _, ids, scores = hf_hybrid_routing(hf, TOKENS)
    assert routing.shape[1] == len(ids) == ours.config.num_moe_layers
    assert assert_routing_matches(routing.numpy(), ids, scores) == 0


def test_undeclared_mtp_tensors_are_unexpected(tmp_path):
    _save(make_hybrid_model("qwen3_next"), tmp_path)
    _add_mtp(tmp_path, "unrelated_key")
    with pytest.raises(HFCheckpointError, match="unexpected tensor mtp.fc.weight"):
        load_hf_model(tmp_path)


def test_512_experts_reach_routing_npz_as_int16(tmp_path):
    """Qwen3-Next's 512 experts: ids above 255 survive the compact dtype and routing.npz."""
    hf = make_hybrid_model("qwen3_next", num_experts=512, num_experts_per_tok=10, mlp_only_layers=[])
    ours = load_hf_model(_save(hf, tmp_path / "ckpt"))
    assert routing_dtype(ours.config.num_experts) == torch.int16
    _, routing = ours.forward_reference(torch.tensor(TOKENS))
    rows = routing[:-1].numpy().astype(numpy_dtype(routing_dtype(512)))      # the last token is never routed
    save_routing(tmp_path / "out", {"r0": rows}, routing_meta_for(ours.config, block_size=4))
    loaded, meta = load_routing(tmp_path / "out")
    assert meta.dtype == "int16" and meta.moe_layer_indices == [0, 1, 2, 3] and meta.num_layers == 4
    assert np.array_equal(loaded["r0"], rows) and int(loaded["r0"].max()) > 255
    _, ids, scores = hf_hybrid_routing(hf, TOKENS)
    assert assert_routing_matches(loaded["r0"], ids, scores) == 0


def _config_json(tmp_path, name, **changes):
    make_hybrid_model(name).config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


@pytest.mark.parametrize("name,changes,needle", [
    ("nemotron_h", dict(moe_latent_size=16), "moe_latent_size"),
    ("nemotron_h", dict(mlp_hidden_act="silu"), "mlp_hidden_act 'silu' is not supported"),
    ("nemotron_h", dict(layers_block_type=["linear_attention", "sliding"]), "block types ['sliding']"),
    ("qwen3_next", dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    ("qwen3_next", dict(layer_types=["linear_attention", "sliding_attention", "full_attention", "full_attention"]),
     "layer_types ['sliding_attention'] not supported"),
])
def test_unsupported_settings_are_refused_clearly(tmp_path, name, changes, needle):
    with pytest.raises(HFCheckpointError) as info:
        load_hf_config(_config_json(tmp_path, name, **changes))
    assert needle in str(info.value)


def test_legacy_hybrid_override_pattern_is_read(tmp_path):
    raw = json.loads((_config_json(tmp_path, "nemotron_h") / "config.json").read_text())
    del raw["layers_block_type"]
    raw["hybrid_override_pattern"] = "ME*E-ME"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert load_hf_config(tmp_path).mlp_types == ("none", "moe", "none", "moe", "dense", "none", "moe")


@pytest.mark.parametrize("stream", [False, True])
def test_weight_sync_from_transformers_state_dicts(checkpoint, stream):
    """update_weights' HF path (loader recipes) gives every parameter the checkpoint's value,
    from the in-memory state dict (transformers 5 names: fused experts, no ``backbone.``)."""
    from inference.weight_sync import named_tensors_from_hf
    _, hf, path = checkpoint
    ours = load_hf_model(path)
    state = hf.state_dict()
    pairs = dict(named_tensors_from_hf(iter(state.items()) if stream else state, hf.config))
    expected = dict(ours.named_parameters())
    expected.update((n, b) for n, b in ours.named_buffers() if n.endswith("expert_bias"))
    assert pairs.keys() == expected.keys()
    for name, tensor in pairs.items():
        assert torch.equal(tensor.to(expected[name].dtype), expected[name]), name
