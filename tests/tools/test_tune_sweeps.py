"""The tuners' shared shape loop: the time budget skips later shapes (listed in the
report), each finished shape is printed and the report is rewritten after it."""

from __future__ import annotations

import json
from dataclasses import dataclass

from tools.tune_sweeps import run_sweeps


@dataclass
class Shape:
    name: str


def _table(results):
    return "header\n" + "\n".join(f"row {r['name']}" for r in results)


def test_every_shape_is_swept_and_reported(tmp_path, capsys):
    out = tmp_path / "sub" / "report.json"
    seen = []

    def sweep(shape):
        if seen:   # the report already holds the earlier shapes when the next one starts
            assert [r["name"] for r in json.loads(out.read_text())["results"]] == seen
        seen.append(shape.name)
        return {"name": shape.name}

    results, skipped = run_sweeps([Shape("a"), Shape("b")], sweep, _table, 100.0, out, {"dtype": "bfloat16"})
    assert [r["name"] for r in results] == ["a", "b"] and skipped == []
    report = json.loads(out.read_text())
    assert report["dtype"] == "bfloat16" and report["results"] == results and report["skipped"] == []
    assert capsys.readouterr().out.splitlines() == ["row a", "row b"]


def test_shapes_past_the_time_budget_are_skipped():
    results, skipped = run_sweeps([Shape("a"), Shape("b")], lambda s: {"name": s.name}, _table, -1.0, None, {})
    assert results == [] and skipped == [{"name": "a"}, {"name": "b"}]
