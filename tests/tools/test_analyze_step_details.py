"""tools/analyze_step_details.py: tables, JSON numbers, plots and comparisons of step_details files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

from tools.analyze_step_details import default_labels, main

REPO = Path(__file__).resolve().parents[2]
RUN_INFERENCE = REPO / "tools" / "run_inference.py"
PHASES = ("gather", "store", "reconstruct", "finalize")
OPTIONAL_ENTRY_KEYS = ("prefill_tokens", "decode_tokens", "finished_requests", "preempted_requests", "time_s",
                       "gpu_forward_ms")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- synthetic runs
def make_entries(seed: int, num_steps: int = 60, routing_scale: float = 1.0, step_scale: float = 1.0) -> list[dict]:
    """Prefill steps, then mixed steps, then decode steps (mostly graphs, every 4th eager)."""
    rng = np.random.default_rng(seed)
    entries, clock = [], 0.0
    for step in range(num_steps):
        prefill = int(rng.integers(1, 4)) if step < 20 else 0
        decode = int(rng.integers(1, 16)) if step >= 6 else 0
        prefill_tokens = prefill * int(rng.integers(8, 64))
        active = prefill_tokens + decode
        graph = prefill == 0 and step % 4 != 0
        step_ms = step_scale * (float(rng.gamma(4.0, 2.0)) + 0.05 * active)
        phases = routing_scale * rng.exponential([0.05, 0.01, 0.3, 0.05])
        clock += step_ms / 1000.0 + float(rng.uniform(0.0, 0.002))  # host gap between steps
        entries.append({
            "step": step, "prefill_requests": prefill, "decode_requests": decode, "active_tokens": active,
            "padded_tokens": 1 << (active - 1).bit_length() if graph else active, "cuda_graph": graph,
            "step_time_ms": step_ms, **{f"routing_{p}_ms": float(v) for p, v in zip(PHASES, phases)},
            "prefill_tokens": prefill_tokens, "decode_tokens": decode, "finished_requests": int(step % 7 == 6),
            "preempted_requests": 0, "time_s": clock, "gpu_forward_ms": 0.9 * step_ms,
        })
    return entries


def write_step_details(path: Path, entries: list[dict], record_routing: bool = True) -> Path:
    meta = {"schema_version": 1, "kind": "step_details", "device": "cpu", "created": "2025-01-01T00:00:00",
            "model": {"name": "tiny-moe", "num_layers": 4, "num_experts": 8, "topk": 2,
                      "moe_layer_indices": [1, 2, 3]},
            "engine": {"block_size": 16, "cuda_graphs": True, "record_routing": record_routing}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps({"meta": meta, "summary": {"num_steps": len(entries)}, "step_details": entries}))
    return path


def kind(entry: dict) -> str:
    if entry["prefill_requests"] == 0:
        return "decode"
    return "prefill" if entry["decode_requests"] == 0 else "mixed"


def group(entry: dict) -> str:
    return f"{kind(entry)}/{'graph' if entry['cuda_graph'] else 'eager'}"


def run_json(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "analysis.json"
    assert main([*args, "--json", str(out)]) == 0
    return orjson.loads(out.read_bytes())


@pytest.fixture
def entries() -> list[dict]:
    return make_entries(seed=3)


@pytest.fixture
def run_file(tmp_path: Path, entries: list[dict]) -> Path:
    return write_step_details(tmp_path / "run_a" / "step_details.json", entries)


# ----------------------------------------------------------------------------- report + numbers
def test_table_lists_every_step_kind_present(run_file: Path, entries: list[dict],
                                             capsys: pytest.CaptureFixture) -> None:
    assert main([str(run_file)]) == 0
    out = capsys.readouterr().out
    row_heads = {line.split()[0] for line in out.splitlines() if line.strip()}
    present = {group(e) for e in entries}
    assert present == {"prefill/eager", "mixed/eager", "decode/graph", "decode/eager"}
    assert present <= row_heads
    assert not {"prefill/graph", "mixed/graph"} & row_heads
    for phase in PHASES:
        assert f" {phase} " in out


def test_decode_only_run_shows_no_prefill_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    entries = [e for e in make_entries(seed=4) if kind(e) == "decode"]
    assert main([str(write_step_details(tmp_path / "d.json", entries))]) == 0
    out = capsys.readouterr().out
    assert "decode/graph" in out and "prefill/" not in out and "mixed/" not in out


def test_json_phase_statistics_match_numpy(tmp_path: Path, run_file: Path, entries: list[dict]) -> None:
    phases = run_json(tmp_path, str(run_file))["runs"][0]["phases"]
    groups = {g: [e for e in entries if group(e) == g] for g in {group(e) for e in entries}}
    assert set(phases["by_group"]) == set(groups)
    for name, members in {**groups, "all": entries}.items():
        stats = phases["all"] if name == "all" else phases["by_group"][name]
        step = np.array([e["step_time_ms"] for e in members])
        assert stats["steps"] == len(members)
        assert stats["step_time_ms"]["mean"] == pytest.approx(step.mean())
        assert stats["step_time_ms"]["p99"] == pytest.approx(np.percentile(step, 99))
        for phase in PHASES:
            values = np.array([e[f"routing_{phase}_ms"] for e in members])
            got = stats["phases"][phase]
            assert got["mean"] == pytest.approx(values.mean())
            assert got["p50"] == pytest.approx(np.median(values))
            assert got["p99"] == pytest.approx(np.percentile(values, 99))
            assert got["share"] == pytest.approx(values.sum() / step.sum())
        routing = sum(np.array([e[f"routing_{p}_ms"] for e in members]) for p in PHASES)
        assert stats["routing_ms"]["share"] == pytest.approx(routing.sum() / step.sum())


def test_json_summary_throughput(tmp_path: Path, run_file: Path, entries: list[dict]) -> None:
    summary = run_json(tmp_path, str(run_file))["runs"][0]["summary"]
    step_s = sum(e["step_time_ms"] for e in entries) / 1000.0
    decode_steps = [e for e in entries if kind(e) == "decode"]
    assert summary["num_steps"] == len(entries)
    assert summary["total_tokens"] == sum(e["active_tokens"] for e in entries)
    assert summary["tokens_per_s"] == pytest.approx(summary["total_tokens"] / step_s)
    assert summary["decode_tokens_per_s"] == pytest.approx(
        sum(e["active_tokens"] for e in decode_steps) / (sum(e["step_time_ms"] for e in decode_steps) / 1000.0))
    assert summary["wall_time_s"] == pytest.approx(entries[-1]["time_s"])
    assert summary["time_source"] == "time_s"


def test_throughput_windows_of_steps(tmp_path: Path, run_file: Path, entries: list[dict]) -> None:
    windows = run_json(tmp_path, str(run_file), "--window-steps", "7")["runs"][0]["throughput"]
    assert len(windows) == -(-len(entries) // 7)
    previous_end = entries[0]["time_s"] - entries[0]["step_time_ms"] / 1000.0
    for index, window in enumerate(windows):
        members = entries[7 * index: 7 * index + 7]
        tokens = sum(e["active_tokens"] for e in members)
        duration = members[-1]["time_s"] - previous_end
        assert window["steps"] == len(members) and window["tokens"] == tokens
        assert window["tokens_per_s"] == pytest.approx(tokens / duration)
        assert window["decode_tokens_per_s"] == pytest.approx(sum(e["decode_tokens"] for e in members) / duration)
        previous_end = members[-1]["time_s"]


def test_throughput_windows_of_seconds(tmp_path: Path, run_file: Path, entries: list[dict]) -> None:
    width = 0.05
    windows = run_json(tmp_path, str(run_file), "--window-s", str(width))["runs"][0]["throughput"]
    assert sum(w["tokens"] for w in windows) == sum(e["active_tokens"] for e in entries)
    for window in windows:
        assert window["end_s"] - window["start_s"] <= width + 1e-9
        members = [e for e in entries if window["start_s"] < e["time_s"] <= window["end_s"] + 1e-12]
        assert window["tokens"] == sum(e["active_tokens"] for e in members)
    assert windows[-1]["end_s"] == pytest.approx(entries[-1]["time_s"])


def test_missing_optional_fields_are_tolerated(tmp_path: Path, entries: list[dict]) -> None:
    for entry in entries:
        for key in OPTIONAL_ENTRY_KEYS:
            entry.pop(key)
    path = tmp_path / "bare.json"
    path.write_bytes(orjson.dumps({"meta": {"schema_version": 1, "kind": "step_details"}, "step_details": entries}))
    run = run_json(tmp_path, str(path), "--window-steps", "10")["runs"][0]
    cumulative = np.cumsum([e["step_time_ms"] / 1000.0 for e in entries])
    assert run["summary"]["time_source"] == "cumulative_step_time"
    assert run["summary"]["wall_time_s"] == pytest.approx(cumulative[-1])
    assert run["summary"]["decode_tokens"] == sum(e["decode_requests"] for e in entries)
    first = run["throughput"][0]
    assert first["tokens_per_s"] == pytest.approx(sum(e["active_tokens"] for e in entries[:10]) / cumulative[9])


def test_run_without_steps_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_step_details(tmp_path / "empty.json", [])
    summary = run_json(tmp_path, str(path))["runs"][0]["summary"]
    assert summary["num_steps"] == 0 and summary["tokens_per_s"] is None and summary["decode_tokens_per_s"] is None
    assert "all" in capsys.readouterr().out


# ----------------------------------------------------------------------------- comparison
def test_comparison_of_two_runs_gives_ratios_to_the_first(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    off_entries = make_entries(seed=5, routing_scale=0.0)
    on_entries = make_entries(seed=5, routing_scale=2.0, step_scale=1.25)
    off = write_step_details(tmp_path / "off.json", off_entries, record_routing=False)
    on = write_step_details(tmp_path / "on.json", on_entries)
    analysis = run_json(tmp_path, str(off), str(on), "--labels", "off,on")
    assert [r["label"] for r in analysis["runs"]] == ["off", "on"]
    assert analysis["comparison"]["baseline"] == "off"
    metrics = {m["metric"]: m for m in analysis["comparison"]["metrics"]}

    def decode_rate(entries: list[dict]) -> float:
        steps = [e for e in entries if kind(e) == "decode"]
        return sum(e["active_tokens"] for e in steps) / sum(e["step_time_ms"] for e in steps)

    def mean_step(entries: list[dict], which: str) -> float:
        return float(np.mean([e["step_time_ms"] for e in entries if kind(e) == which]))

    decode_ratio = metrics["decode_tokens_per_s"]["ratios"][1]
    assert decode_ratio == pytest.approx(decode_rate(on_entries) / decode_rate(off_entries))
    assert decode_ratio == pytest.approx(1 / 1.25)
    for which in ("prefill", "decode", "mixed"):
        ratio = metrics[f"mean_step_time_ms/{which}"]["ratios"][1]
        assert ratio == pytest.approx(mean_step(on_entries, which) / mean_step(off_entries, which))
    assert metrics["routing_share"]["values"][0] == 0.0
    assert metrics["routing_share"]["values"][1] > 0.0
    assert metrics["routing_share"]["ratios"] == [None, None]  # undefined against a zero baseline
    out = capsys.readouterr().out
    assert "comparison" in out and "on/off" in out and "0.800x" in out


def test_default_labels_use_the_run_folder() -> None:
    assert default_labels(["x/run_off/step_details.json", "y/run_on/step_details.json"]) == ["run_off", "run_on"]
    assert default_labels(["a/b.json", "c/d.json"]) == ["b", "d"]
    assert default_labels(["a/s.json", "b/s.json"]) == ["s#0", "s#1"]


def test_labels_must_match_the_files(run_file: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main([str(run_file), "--labels", "a,b"])
    assert info.value.code == 2


# ----------------------------------------------------------------------------- plots
def test_plots_are_written_as_png(tmp_path: Path, run_file: Path, capsys: pytest.CaptureFixture) -> None:
    other = write_step_details(tmp_path / "run_b" / "step_details.json", make_entries(seed=9, num_steps=30))
    plots = tmp_path / "plots"
    assert main([str(run_file), str(other), "--plot-dir", str(plots)]) == 0
    names = {p.name for p in plots.iterdir()}
    assert names == {"steps_run_a.png", "steps_run_b.png", "phase_share.png", "throughput.png", "stages.png",
                     "subphases.png"}
    for path in plots.iterdir():
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert "phase_share.png" in capsys.readouterr().err


def test_plot_dir_without_matplotlib_is_a_clear_error(tmp_path: Path, run_file: Path, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert main([str(run_file), "--plot-dir", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err
    assert "needs matplotlib" in err and 'pip install -e ".[plot]"' in err
    assert not (tmp_path / "plots").exists()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name,content", [
    ("results.jsonl", b'{"id": "0", "prompt_token_ids": [1], "output_token_ids": [], "finish_reason": "stop"}\n'),
    ("routing_meta.json", b'{"schema_version": 1, "moe_layer_indices": [1], "num_layers": 2, "num_experts": 4}'),
    ("notes.txt", b"hello"),
])
def test_non_step_details_file_is_rejected(tmp_path: Path, run_file: Path, name: str, content: bytes,
                                           capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / name
    bad.write_bytes(content)
    assert main([str(run_file), str(bad)]) == 2
    captured = capsys.readouterr()
    assert f"{bad} is not a step_details file" in captured.err
    assert captured.out == ""


def test_corrupted_step_details_is_rejected(tmp_path: Path, entries: list[dict],
                                            capsys: pytest.CaptureFixture) -> None:
    entries[10]["routing_gather_ms"] = -1.0
    path = write_step_details(tmp_path / "neg.json", entries)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "step_details[10].routing_gather_ms" in err


def test_missing_file_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nope" / "step_details.json"
    assert main([str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


# ----------------------------------------------------------------------------- as a script, on a real run
def test_script_writes_json_to_stdout(run_file: Path, entries: list[dict]) -> None:
    done = subprocess.run([sys.executable, str(REPO / "tools" / "analyze_step_details.py"), str(run_file),
                           "--json", "-"], cwd=REPO, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    analysis = orjson.loads(done.stdout)  # nothing but JSON on stdout
    assert analysis["runs"][0]["summary"]["num_steps"] == len(entries)


def test_real_cpu_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    command = [sys.executable, str(RUN_INFERENCE), "--record-routing", "--num-requests", "4", "--prompt-len", "8",
               "--output-len", "4", "--output-dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    document = orjson.loads((out / "step_details.json").read_bytes())
    entries = document["step_details"]
    analysis = run_json(tmp_path, str(out / "step_details.json"))
    summary = analysis["runs"][0]["summary"]
    assert analysis["runs"][0]["label"] == "out"
    assert summary["num_steps"] == len(entries) > 0
    assert summary["total_tokens"] == sum(e["active_tokens"] for e in entries) >= 4 * 8
    assert summary["routing_share"] > 0.0  # recording was on, so some routing host time was spent
    if document.get("summary", {}).get("tokens_per_s") is not None:  # the writer's own summary agrees
        assert summary["tokens_per_s"] == pytest.approx(document["summary"]["tokens_per_s"])
    assert "prefill/" in capsys.readouterr().out



# ----------------------------------------------------------------------------- schema v2: stages and sub-phases
@pytest.fixture(scope="module")
def engine_step_details(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real version-2 file: the tiny engine with asynchronous scheduling and recording."""
    from inference.config import EngineConfig
    from inference.engine import LLMEngine
    from inference.presets import build_model, get_preset
    from inference.request import SamplingParams

    model = build_model(get_preset("tiny-moe"), seed=0)
    engine = LLMEngine(model, EngineConfig(block_size=4, num_kv_blocks=64, max_requests=4, max_step_tokens=16,
                                           record_routing=True, async_scheduling=True))
    rng = np.random.default_rng(5)
    engine.generate([rng.integers(2, 512, size=int(rng.integers(3, 20))).tolist() for _ in range(6)],
                    SamplingParams(max_new_tokens=5, ignore_eos=True))
    path = tmp_path_factory.mktemp("v2") / "step_details.json"
    engine.step_log.write(path, {"device": "cpu"})
    return path


def test_stages_and_sub_phases_are_reported_and_add_up(engine_step_details: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "analysis.json"
    assert main([str(engine_step_details), "--json", str(out)]) == 0
    report = capsys.readouterr().out
    assert "engine stages" in report and "stage_launch" in report and "routing_reconstruct" in report
    entries = orjson.loads(engine_step_details.read_bytes())["step_details"]
    breakdown = orjson.loads(out.read_bytes())["runs"][0]["breakdown"]["all"]
    step_total = sum(e["step_time_ms"] for e in entries)
    for phase in ("stage_prepare", "stage_launch", "stage_complete", "routing_gather", "routing_finalize"):
        total = sum(e[f"{phase}_ms"] for e in entries)
        assert breakdown[phase]["total"] == pytest.approx(total)
        assert breakdown[phase]["share_of_step"] == pytest.approx(total / step_total)
        subs = breakdown[phase]["subs"]
        assert subs and sum(s["total"] for s in subs.values()) == pytest.approx(total)
        assert sum(s["share_of_phase"] for s in subs.values()) == pytest.approx(1.0)
    p99 = np.percentile([e["stage_launch_forward_ms"] for e in entries], 99)
    assert breakdown["stage_launch"]["subs"]["forward"]["p99"] == pytest.approx(p99)


def test_version_1_files_have_no_breakdown(run_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "analysis.json"
    assert main([str(run_file), "--json", str(out)]) == 0
    assert orjson.loads(out.read_bytes())["runs"][0]["breakdown"] == {}


def test_a_file_that_dropped_its_first_entries_says_so(tmp_path):
    from routing_replay.step_details import StepDetailsLog
    from tools.analyze_step_details import analyze, load_runs, render_report
    log = StepDetailsLog(max_entries=3)
    for step in range(8):
        log.record({"step": step, "prefill_requests": 0, "decode_requests": 2, "active_tokens": 2,
                    "padded_tokens": 2, "cuda_graph": False, "step_time_ms": 1.0, "routing_gather_ms": 0.0,
                    "routing_store_ms": 0.0, "routing_reconstruct_ms": 0.0, "routing_finalize_ms": 0.0})
    path = tmp_path / "step_details.json"
    log.write(path, {})
    runs = load_runs([path])
    assert runs[0].dropped == 5 and len(runs[0].entries) == 3
    assert "leave out the first 5 steps" in render_report(analyze(runs))
