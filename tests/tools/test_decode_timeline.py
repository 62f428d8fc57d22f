"""The decode timeline's arithmetic against a microsecond-grid count, and the profiled
serve on CPU (it brings the batch to decode, profiles the window and drains every request)."""

from __future__ import annotations

import numpy as np

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.presets import build_model, get_preset
from tools import decode_timeline as dt

SPANS = [dt.DeviceSpan("gemm", 0, 40), dt.DeviceSpan("norm", 30, 50),           # overlapping: busy once
         dt.DeviceSpan("Memcpy HtoD (Pinned -> Device)", 70, 72),                # a 20 us gap before it
         dt.DeviceSpan("topk", 72, 100), dt.DeviceSpan("Memcpy DtoH (Device -> Pinned)", 160, 161),
         dt.DeviceSpan("graph_kernel", 161, 200), dt.DeviceSpan("inside", 170, 180)]


def test_busy_idle_and_gaps_match_a_microsecond_grid():
    grid = np.zeros(200, dtype=bool)
    for s in SPANS:
        grid[int(s.start):int(s.end)] = True
    t = dt.gpu_timeline(SPANS, steps=2, gaps_shown=2)
    assert t["busy_ms_per_step"] * 2e3 == grid.sum() and t["idle_ms_per_step"] * 2e3 == (~grid).sum()
    assert t["window_ms_per_step"] * 2e3 == 200 and abs(t["idle_share"] - (~grid).mean()) < 1e-12
    assert t["largest_gaps"] == [{"us": 60, "after": "topk", "before": "Memcpy DtoH (Device -> Pinned)"},
                                 {"us": 20, "after": "norm", "before": "Memcpy HtoD (Pinned -> Device)"}]
    assert t["copies"] == {"HtoD": {"per_step": 0.5, "ms_per_step": 0.001},
                           "DtoH": {"per_step": 0.5, "ms_per_step": 0.0005}}
    lines = dt.format_timeline("1", t)
    assert "idle 0.040 ms per step" in lines[0] and len(lines) == 3 and "topk" in lines[1]


def test_nothing_profiled_reports_no_times():
    assert dt.gpu_timeline([], steps=4) == {"steps": 4, "spans": 0}
    assert dt.format_timeline("1", {"steps": 4, "spans": 0}) == []
    assert dt.copy_kind("Memset (Device)") is None and dt.copy_kind("Memcpy DtoD (Device -> Device)") == "DtoD"


def test_profiled_serve_decodes_the_window_and_drains_on_cpu():
    model = build_model(get_preset("tiny-moe"), seed=0)
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=64, max_requests=4, max_step_tokens=64, record_routing=True))
    t = dt.decode_timeline(engine, [[5, 6, 7, 8], [3, 4, 5]], steps=5)
    assert t["steps"] == 5 and not engine.has_unfinished()
    decode = [e for e in engine.step_log.entries if e["decode_requests"] == 2 and e["prefill_requests"] == 0]
    assert len(decode) >= dt.WARM_STEPS + 5
