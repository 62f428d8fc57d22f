"""Hybrid models under a layout: which layouts are accepted (only the MoE conditions apply)
and the exact reasons for the others; megatron keeps refusing them; the per-rank weights
of the plan counted by hand from the unsharded model; a transformers checkpoint loaded
shard by shard equals the single-process load on every rank."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from inference.megatron_export import UnsupportedForMegatron, megatron_config
from inference.model import MoEGPT
from inference.parallel import ParallelGroups, ParallelLayout, padded_vocab_size
from inference.parallel.loading import shard_targets
from inference.parallel.plan import rank_weight_elements
from inference.presets import get_preset

HYBRIDS = ("tiny-hybrid-gdn", "tiny-hybrid-mamba", "qwen3-next-80b-a3b-shape", "nemotron-3-nano-30b-a3b-shape")


@pytest.mark.parametrize("name", HYBRIDS)
@pytest.mark.parametrize("tp,ep", [(2, 2), (2, 1), (4, 2), (8, 8)])
def test_hybrids_accept_layouts_whatever_their_heads(name, tp, ep):
    """Attention is replicated: tp = 8 is fine for the tiny presets' 4 heads and 2 KV heads."""
    config, layout = get_preset(name), ParallelLayout(tp, tp, ep)
    assert layout.model_problems(config) == []
    assert not layout.megatron_compatible(config)
    with pytest.raises(UnsupportedForMegatron, match="megatron-core 0.16 builds Mamba layers only"):
        megatron_config(config, layout=layout)


def test_hybrid_refusals_name_each_moe_condition():
    config = get_preset("tiny-hybrid-gdn")                 # 8 experts of width 32, shared expert 64
    assert ParallelLayout(6, 6, 3).model_problems(config) == [
        "--expert-parallel-size 3 does not divide the 8 experts",
        "--tensor-parallel-size 6 does not divide the shared-expert width 64 (the shared expert is row-parallel)"]
    assert ParallelLayout(128, 128, 2).model_problems(config) == [
        "expert tensor-parallel size tp/ep = 64 does not divide moe_intermediate_size 32",
        "--tensor-parallel-size 128 does not divide the shared-expert width 64 (the shared expert is row-parallel)"]
    no_moe = dataclasses.replace(config, mlp_types=tuple("dense" for _ in config.mlp_types),
                                 dense_layers=tuple(range(config.num_layers)))
    assert no_moe.num_moe_layers == 0 and ParallelLayout(6, 6, 3).model_problems(no_moe) == []   # all replicated


def _expected_elements(config, layout: ParallelLayout) -> int:
    """From the unsharded model's names: experts and shared experts over tp ranks (ep x etp),
    vocabulary rows padded and split over tp, everything else whole."""
    with torch.device("meta"):
        full = MoEGPT(config)
    rows = padded_vocab_size(config.vocab_size, layout.tp) // layout.tp
    total = 0
    for name, p in full.named_parameters():
        if name.startswith(("embed_tokens.", "lm_head.")):
            total += rows * p.shape[1]
        elif name.endswith((".mlp.w13", ".mlp.w2")) or ".shared_expert." in name:
            assert p.numel() % layout.tp == 0
            total += p.numel() // layout.tp
        else:
            total += p.numel()
    return total


@pytest.mark.parametrize("name", HYBRIDS)
@pytest.mark.parametrize("tp,ep", [(2, 2), (4, 1), (8, 4)])
def test_plan_weights_counted_by_hand(name, tp, ep):
    config, layout = get_preset(name), ParallelLayout(tp, tp, ep)
    expected = _expected_elements(config, layout)
    assert [rank_weight_elements(config, layout, r) for r in (0, tp - 1)] == [expected] * 2


@pytest.fixture(scope="module", params=["qwen3_next", "qwen3_5_moe", "nemotron_h"])
def hf_checkpoint(request, tmp_path_factory):
    pytest.importorskip("safetensors")
    from inference.hf_loader import load_hf_model
    from tests.inference.hf.hybrid_families import make_hybrid_model
    path = tmp_path_factory.mktemp(request.param)
    make_hybrid_model(request.param).save_pretrained(path)
    return path, load_hf_model(path)


@pytest.mark.parametrize("tp,ep", [(2, 2), (2, 1), (4, 2)])
def test_hf_checkpoint_shards_equal_the_single_process_load(hf_checkpoint, tp, ep):
    from inference.hf_loader import load_hf_model
    path, single = hf_checkpoint
    full = {**dict(single.named_parameters()), **dict(single.named_buffers())}
    layout = ParallelLayout(tp, tp, ep)
    for rank in range(tp):
        model = load_hf_model(path, parallel=ParallelGroups.shard_only(layout, rank))
        split = 0
        for name, tensor, shard, _ in shard_targets(model):
            if name.endswith(("rotary.cos", "rotary.sin")):
                continue
            assert torch.equal(tensor, shard.take(full[name])), f"rank {rank}: {name}"
            split += tensor.numel() < full[name].numel()
        assert split > 0, "no tensor was split"
        assert model.attention_config == single.config          # attention replicated: every head
