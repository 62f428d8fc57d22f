"""Fused MoE tile configs: validation, the data-file format and lookup, the heuristic, and the
dispatcher's backend choice (on CPU; the CUDA choice is covered in test_fused_moe.py)."""

from __future__ import annotations

import json

import pytest
import torch

from inference import config as engine_config
from inference.kernels import MOE_BACKENDS, choose_moe_backend, moe_experts_fn, moe_experts_reference
from inference.kernels.fused_moe_configs import (
    CONFIG_DIR,
    FusedMoEConfig,
    GemmTiles,
    TunedEntry,
    config_file_name,
    default_config,
    fit_shared_memory,
    load_tuned_file,
    parse_tuned_file,
    smem_estimate,
    tuned_entry,
)
from tests.inference.kernels.moe_cases import make_moe

CONFIG = {"block_m": 16, "gate_up": {"block_n": 64, "block_k": 128, "group_m": 1, "num_warps": 4, "num_stages": 4},
          "down": {"block_n": 128, "block_k": 64, "group_m": 8, "num_warps": 8, "num_stages": 3}}


def test_config_round_trips_through_json():
    cfg = FusedMoEConfig.from_dict(json.loads(json.dumps(CONFIG)))
    assert cfg.to_dict() == CONFIG
    assert cfg.down == GemmTiles(128, 64, 8, 8, 3)


@pytest.mark.parametrize("bad", [
    {**CONFIG, "block_m": 24},
    {**CONFIG, "gate_up": {**CONFIG["gate_up"], "block_k": 8}},
    {**CONFIG, "down": {**CONFIG["down"], "num_warps": 3}},
    {**CONFIG, "down": {**CONFIG["down"], "unknown": 1}},
    {"block_m": 16, "gate_up": CONFIG["gate_up"]},
])
def test_bad_configs_are_rejected(bad):
    with pytest.raises(ValueError):
        FusedMoEConfig.from_dict(bad)


def test_tuned_file_parsing_rejects_bad_keys_and_empty_files():
    with pytest.raises(ValueError, match="token count"):
        parse_tuned_file(json.dumps({"configs": {"many": CONFIG}}))
    with pytest.raises(ValueError, match="non-empty"):
        parse_tuned_file(json.dumps({"configs": {}}))


def test_lookup_uses_the_nearest_token_bucket(tmp_path):
    small = {**CONFIG, "fused_ms": 0.1, "grouped_mm_ms": 0.2}
    large = {**CONFIG, "block_m": 64, "fused_ms": 1.0, "grouped_mm_ms": 0.5}
    name = config_file_name(64, 2048, 1024, torch.bfloat16, "NVIDIA H200")
    assert name == "E=64,H=2048,I=1024,dtype=bfloat16,device=NVIDIA_H200.json"
    (tmp_path / name).write_text(json.dumps({"meta": {}, "configs": {"16": small, "1024": large}}))
    load_tuned_file.cache_clear()
    lookup = lambda t: tuned_entry(t, 64, 2048, 1024, torch.bfloat16, "NVIDIA_H200", tmp_path)  # noqa: E731
    assert lookup(1).config.block_m == 16 and not lookup(1).prefers_grouped_mm
    assert lookup(600).config.block_m == 64 and lookup(600).prefers_grouped_mm
    assert lookup(100000).config.block_m == 64
    assert tuned_entry(1, 64, 2048, 1024, torch.float16, "NVIDIA_H200", tmp_path) is None


def test_grouped_mm_is_preferred_only_beyond_the_noise_margin():
    cfg = FusedMoEConfig.from_dict(CONFIG)
    assert not TunedEntry(cfg, fused_ms=1.0, grouped_mm_ms=0.99).prefers_grouped_mm
    assert TunedEntry(cfg, fused_ms=1.0, grouped_mm_ms=0.9).prefers_grouped_mm
    assert not TunedEntry(cfg).prefers_grouped_mm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("smem", [99 * 1024, 160 * 1024, 227 * 1024])
def test_heuristic_gives_valid_configs_that_fit_shared_memory(dtype, smem):
    elem = torch.empty((), dtype=dtype).element_size()
    block_ms = set()
    for num_tokens in (1, 7, 64, 256, 1000, 4096, 8192, 65536):
        for topk, num_experts in ((8, 64), (8, 128), (2, 8), (1, 257)):
            cfg = default_config(num_tokens, topk, num_experts, dtype, smem)
            block_ms.add(cfg.block_m)
            assert smem_estimate(cfg.block_m, cfg.gate_up, 2, elem) <= smem
            assert smem_estimate(cfg.block_m, cfg.down, 1, elem) <= smem
    assert 16 in block_ms and len(block_ms) >= 2  # decode and prefill get different tiles


def test_fit_shared_memory_drops_stages_then_k_tiles():
    cfg = FusedMoEConfig(128, GemmTiles(128, 128, 1, 8, 5), GemmTiles(128, 128, 1, 8, 5))
    fitted = fit_shared_memory(cfg, 2, 100 * 1024)
    assert fitted.gate_up.num_stages == 2 and fitted.gate_up.block_k < 128
    assert smem_estimate(128, fitted.gate_up, 2, 2) <= 100 * 1024


def test_committed_tuned_files_parse_and_match_their_names():
    files = sorted(CONFIG_DIR.glob("*.json"))
    if not files:
        pytest.skip("no tuned fused MoE config files committed yet")
    for path in files:
        entries = parse_tuned_file(path.read_text())
        fields = dict(part.split("=", 1) for part in path.stem.split(","))
        assert set(fields) == {"E", "H", "I", "dtype", "device"}
        assert entries and all(key >= 1 for key, _ in entries)


def test_cpu_backend_choice_and_pinned_backends_that_do_not_apply():
    x, ids, weights, w13, w2 = make_moe(3, 2, 8, 16, 8, seed=0)
    assert choose_moe_backend(x, ids, w13, w2) == "gathered"
    big = make_moe(40, 2, 8, 16, 8, seed=0)
    assert choose_moe_backend(big[0], big[1], big[3], big[4], "torch") == "dense"
    for pinned in ("fused_triton", "grouped_mm"):
        with pytest.raises(ValueError, match="does not apply"):
            choose_moe_backend(x, ids, w13, w2, pinned)
    with pytest.raises(ValueError, match="moe backend"):
        moe_experts_fn("cutlass")
    torch.testing.assert_close(moe_experts_fn("torch")(x, ids, weights, w13, w2),
                               moe_experts_reference(x, ids, weights, w13, w2), atol=1e-5, rtol=1e-5)


def test_engine_config_knows_the_same_backends():
    assert engine_config.MOE_BACKENDS == MOE_BACKENDS
    with pytest.raises(ValueError, match="moe_backend"):
        engine_config.EngineConfig(moe_backend="cutlass")
