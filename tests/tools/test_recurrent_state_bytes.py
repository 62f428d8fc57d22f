"""tools/recurrent_state_bytes.py: the table and JSON of state bytes per hybrid preset."""

from __future__ import annotations

import json

from tools import recurrent_state_bytes


def test_table_and_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert recurrent_state_bytes.main(["--block-size", "16", "--batch", "8", "--json", str(out)]) == 0
    rows = {r["model"]: r for r in json.loads(out.read_text())}
    assert "qwen3.5-35b-a3b-shape" in rows and "nemotron-3-nano-30b-a3b-shape" in rows
    nano = rows["nemotron-3-nano-30b-a3b-shape"]
    # 6 attention layers x K and V x 2 heads x 128 x 16 tokens x 2 bytes
    assert nano["kv_bytes_per_block_bf16"] == 6 * 2 * 2 * 128 * 16 * 2
    assert nano["checkpoint_bytes_fp32_state"] == 49_082_368
    assert nano["blocks_per_checkpoint"] == 49_082_368 / (6 * 2 * 2 * 128 * 16 * 2)
    assert nano["state_pool_bytes_at_batch"] == 8 * 49_082_368
    assert rows["qwen3.5-35b-a3b-shape"]["checkpoint_bytes_bf16_state"] == 30 * (32 * 128 * 128 * 2 + 8192 * 3 * 2)
    assert "nemotron-3-nano-30b-a3b-shape" in capsys.readouterr().out
