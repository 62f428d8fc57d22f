"""Per-rank loading: TensorShard boxes, shards read straight from safetensors slices (no
rank reads more than its shards), split Hugging Face-style checkpoints through recipes, and
every problem reported before anything is read."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from inference.hf.common import TensorRecipe
from inference.model import MoEGPT
from inference.parallel import ParallelGroups, ParallelLayout, SafetensorsCheckpoint, ShardLoadError, TensorShard
from inference.parallel.loading import load_full, load_shards, shard_targets
from inference.presets import build_model
from tests.inference.parallel.rank_checks import CONFIGS, SEEDS


def test_tensor_shard_reads_ranges_in_order_and_pads_with_zeros():
    full = torch.arange(6 * 4).reshape(6, 4).float()
    shard = TensorShard.along(full.shape, dim0=[(4, 6), (0, 1)], dim1=[(1, 3)])
    assert shard.local_shape == (3, 2)
    assert torch.equal(shard.take(full), torch.cat([full[4:6, 1:3], full[0:1, 1:3]]))
    padded = TensorShard.along((5, 4), dim0=[(4, 8)])
    out = padded.take(full[:5])
    assert out.shape == (4, 4) and torch.equal(out[0], full[4]) and not out[1:].any()
    assert padded.numel_read() == 4
    with pytest.raises(ValueError, match="expects"):
        shard.take(full[:5])


@pytest.fixture(scope="module")
def rich_checkpoint(tmp_path_factory):
    model = build_model(CONFIGS["rich"], seed=SEEDS["rich"])
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file(state, str(path))
    return model, state, path


@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 2), (4, 2), (4, 4)])
def test_safetensors_slices_equal_full_tensor_shards_and_read_only_the_shard(rich_checkpoint, tp, ep):
    model, state, path = rich_checkpoint
    full_elements = sum(t.numel() for t in state.values() if t is not state.get("lm_head.weight"))
    layout = ParallelLayout(tp, tp, ep)
    for rank in range(layout.world_size):
        rank_model = MoEGPT(model.config, ParallelGroups.shard_only(layout, rank))
        from_memory = MoEGPT(model.config, ParallelGroups.shard_only(layout, rank))
        load_full(from_memory, state)
        with SafetensorsCheckpoint({name: path for name in state}) as ck:
            copied = load_shards(rank_model, {n: ck.source(n) for n in ck.files})
            read = ck.elements_read
        targets = list(shard_targets(rank_model))
        assert len(targets) > 20
        expected_read = sum(s.numel_read() for name, _, s, _ in targets if name in state)
        assert read == expected_read, "a rank must read exactly its shards' elements"
        assert copied == sum(t.numel() for name, t, _, _ in targets if name in state)
        if tp > 1:
            assert read < 0.75 * full_elements
        for (name, got, _, _), (_, want, _, _) in zip(targets, shard_targets(from_memory)):
            if name in state:
                assert torch.equal(got, want), name


def _split_hf_style(state: dict[str, torch.Tensor], config) -> tuple[dict[str, torch.Tensor], list[TensorRecipe]]:
    """Our fused tensors as separate q/k/v, gate/up and per-expert tensors, with recipes."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    split, recipes = {}, []
    for name, t in state.items():
        if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
            parts = dict(zip("qkv", t.split([q, kv, kv])))
            names = [f"hf.{name}.{p}" for p in "qkv"]
            split.update(zip(names, parts.values()))
            recipes.append(TensorRecipe(name, tuple((n, tuple(parts[n[-1]].shape)) for n in names)))
        elif name.endswith(".w13"):
            names = []
            for e in range(t.shape[0]):
                for half, piece in zip(("gate", "up"), t[e].chunk(2)):
                    split[f"hf.{name}.{e}.{half}"] = piece.contiguous()
                    names.append((f"hf.{name}.{e}.{half}", tuple(piece.shape)))
            recipes.append(TensorRecipe(name, tuple(names), "stack_pairs"))
        elif name.endswith(".w2"):
            names = [(f"hf.{name}.{e}", tuple(t[e].shape)) for e in range(t.shape[0])]
            split.update((n, t[e].contiguous()) for e, (n, _) in enumerate(names))
            recipes.append(TensorRecipe(name, tuple(names), "stack"))
        else:
            split[f"hf.{name}"] = t
            recipes.append(TensorRecipe(name, ((f"hf.{name}", tuple(t.shape)),)))
    return split, recipes


def test_recipes_read_split_checkpoints_shard_by_shard(rich_checkpoint, tmp_path):
    model, state, _ = rich_checkpoint
    split, recipes = _split_hf_style(state, model.config)
    path = tmp_path / "split.safetensors"
    save_file(split, str(path))
    layout = ParallelLayout(4, 4, 2)
    assert sum(r.combine == "stack_pairs" for r in recipes) == model.config.num_moe_layers
    for rank in range(layout.world_size):
        fused = MoEGPT(model.config, ParallelGroups.shard_only(layout, rank))
        load_full(fused, state)
        from_split = MoEGPT(model.config, ParallelGroups.shard_only(layout, rank))
        with SafetensorsCheckpoint({n: path for n in split}) as ck:
            load_shards(from_split, ck.recipe_sources(recipes))
            assert ck.elements_read < 0.5 * sum(t.numel() for t in split.values())
        for (name, a, _, _), (_, b, _, _) in zip(shard_targets(fused), shard_targets(from_split)):
            assert torch.equal(a, b), name


def test_every_problem_reported_before_loading(rich_checkpoint):
    model, state, _ = rich_checkpoint
    bad = dict(state)
    del bad["layers.1.mlp.w2"]
    bad["norm.weight"] = torch.ones(3)
    rank_model = MoEGPT(model.config, ParallelGroups.shard_only(ParallelLayout(2, 2, 2), 0))
    with torch.no_grad():
        rank_model.embed_tokens.weight.fill_(3.0)
    with pytest.raises(ShardLoadError) as info:
        load_full(rank_model, bad)
    assert len(info.value.problems) == 2
    assert "missing tensor layers.1.mlp.w2" in str(info.value) and "norm.weight has shape [3]" in str(info.value)
    assert (rank_model.embed_tokens.weight == 3.0).all(), "nothing may be loaded when a problem is found"


def test_transformed_recipes_are_read_whole_then_sharded(tmp_path):
    """A recipe's transform (GPT-OSS stores experts transposed, gate/up interleaved) may move
    any element anywhere: that tensor is read whole, transformed, then sliced."""
    model = build_model(CONFIGS["oss"], seed=SEEDS["oss"])
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}

    def interleave(w13: torch.Tensor) -> torch.Tensor:      # ours [E, 2I, H] -> stored [E, H, 2I] interleaved
        gate, up = w13.chunk(2, dim=1)
        return torch.stack([gate, up], dim=2).flatten(1, 2).transpose(1, 2).contiguous()

    def deinterleave(stored: torch.Tensor) -> torch.Tensor:
        t = stored.transpose(1, 2)
        return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)

    stored = {n: interleave(t) if n.endswith(".w13") else t for n, t in state.items()}
    path = tmp_path / "oss.safetensors"
    save_file(stored, str(path))
    recipes = [TensorRecipe(n, ((n, tuple(t.shape)),), transform=deinterleave if n.endswith(".w13") else None)
               for n, t in stored.items()]
    layout = ParallelLayout(4, 4, 2)
    for rank in range(layout.world_size):
        expected = MoEGPT(model.config, ParallelGroups.shard_only(layout, rank))
        load_full(expected, state)
        got = MoEGPT(model.config, ParallelGroups.shard_only(layout, rank))
        with SafetensorsCheckpoint({n: path for n in stored}) as ck:
            load_shards(got, ck.recipe_sources(recipes))
        for (name, a, _, _), (_, b, _, _) in zip(shard_targets(expected), shard_targets(got)):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("name,tp,ep", [("rich", 4, 2), ("oss", 2, 2), ("mla", 2, 1)])
def test_preset_weights_built_per_rank_are_the_single_process_weights_sharded(name, tp, ep):
    """``build_model(parallel=...)`` draws every full tensor as the single-process model does
    and keeps this rank's shard: the same weights without any rank building the full model."""
    full = build_model(CONFIGS[name], seed=SEEDS[name])
    state = {k: v for k, v in full.state_dict().items()}
    layout = ParallelLayout(tp, tp, ep)
    for rank in range(layout.world_size):
        groups = ParallelGroups.shard_only(layout, rank)
        expected = MoEGPT(full.config, groups)
        load_full(expected, state)
        got = build_model(full.config, seed=SEEDS[name], parallel=groups)
        pairs = list(zip(shard_targets(expected), shard_targets(got)))
        assert len(pairs) > 20
        for (name_a, a, _, _), (name_b, b, _, _) in pairs:
            assert name_a == name_b and torch.equal(a, b), name_a
