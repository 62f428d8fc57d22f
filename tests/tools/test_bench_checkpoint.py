"""tools/bench_checkpoint.py on CPU with small settings: every mode runs, checkpointing
modes commit every request, the JSON has the numbers and the table comes last."""

from __future__ import annotations

import orjson

from tools.bench_checkpoint import main


def test_small_cpu_run_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--num-requests", "6", "--prompt-len", "8", "--output-len", "6",
                 "--max-requests", "3", "--repetitions", "1", "--output", str(out)]) == 0
    report = orjson.loads(out.read_bytes())
    assert report["device"] == "cpu" and report["model"] == "tiny-moe"
    assert set(report["modes"]) == {"off", "default", "every-1"}
    for mode, summary in report["modes"].items():
        run = summary["repetitions"][0]
        assert run["finished"] == 6 and run["committed"] == (0 if mode == "off" else 6)
        assert run["decode_steps"] > 0 and summary["mean_decode_step_ms_median"] > 0
    assert report["modes"]["off"]["step_time_vs_off"] == 0.0
    assert isinstance(report["default_within_target"], bool)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split()[0] == "mode" and lines[-1].startswith("default checkpointing within 0.5% of off")
