"""tools/bench_recurrent.py on CPU: the recurrent and chunked rows agree and are reported."""

from __future__ import annotations

import json

from tools import bench_recurrent


def test_cpu_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench_recurrent.main(["--cpu", "--cpu-len", "40", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["layer"], r["impl"]) for r in rows} == {
        (layer, impl) for layer in ("gated delta rule", "mamba2 ssd") for impl in ("cpu recurrent", "cpu chunked")}
    assert all(r["us"] > 0 and r["max_err"] < 1e-3 for r in rows)
    assert "cpu chunked" in capsys.readouterr().out
