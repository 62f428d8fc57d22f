"""The decode floor of tools/bench_families.py counts the KV a step really reads: MLA's
latent rows, and only the window of windowed layers."""

from __future__ import annotations

from inference.presets import get_preset
from tools.bench_families import kv_bytes_read


def test_latent_kv_is_counted_not_expanded_keys_and_values():
    moonlight = get_preset("moonlight-16b-a3b-shape")
    assert kv_bytes_read(moonlight, batch=64, context=576, elem=2) == 64 * 576 * 27 * (512 + 64) * 2


def test_windowed_layers_read_only_their_window():
    gpt_oss = get_preset("gpt-oss-20b-shape")          # 12 layers with a 128-token window, 12 full
    per_token_layer = 2 * 8 * 64 * 2
    assert kv_bytes_read(gpt_oss, batch=1, context=576, elem=2) == (12 * 128 + 12 * 576) * per_token_layer
    assert kv_bytes_read(gpt_oss, batch=1, context=100, elem=2) == 24 * 100 * per_token_layer
