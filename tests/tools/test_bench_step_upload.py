"""tools/bench_step_upload.py on CPU: one copy per step against the per-tensor scheme's one
per field, the bytes each carries, a table and JSON."""

from __future__ import annotations

import json

from tools import bench_step_upload


def test_cpu_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench_step_upload.main(["--max-step-tokens", "1024", "--max-model-len", "4096", "--context", "64",
                                   "--repetitions", "3", "--output", str(out)]) == 0
    rows = {r["step"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["decode 1", "decode 16", "decode 64", "decode 256", "mixed 64+960", "prefill 4x256"]
    assert all(r["uploads"] == 1 for r in rows.values())
    # Per-tensor: 11 copies per step (9 without pending inputs); decode 1 = 5 token fields of one row,
    # one whole block-table row (256 blocks), query_start_loc 2 rows, seq_lens 1, logits 1, feed 2 x 1.
    assert [r["per_tensor_uploads"] for r in rows.values()] == [11, 11, 11, 11, 11, 9]
    assert rows["decode 1"]["per_tensor_upload_bytes"] == 5 * 8 + 256 * 4 + 2 * 4 + 4 + 8 + 2 * 8
    # Packed: 10 lanes of one word and the same block-table row, in one copy and one unpack op
    # (+ the token feed's index_select and index_copy_).
    assert rows["decode 1"]["upload_bytes"] == 10 * 8 + 256 * 4 and rows["decode 1"]["device_ops"] == 3
    assert all(r["prepare_us"] > 0 and r["per_tensor_upload_us"] > 0 for r in rows.values())
    assert "decode 256" in capsys.readouterr().out
