#!/usr/bin/env python
"""Issue 14 in one GPU run: kernel tests, then the quick decode benchmark with the fused
small ops on and off side by side (optionally the fused MoE tuner first).

    python tools/gpu_issue14.py            # from the repo root; results under $OUT (default ./out-gpu)
    python tools/gpu_issue14.py --tune     # also re-tune the fused MoE tiles (adds ~160 s)

Stages, each a subprocess with its own wall-clock limit (under 9 minutes in all):

1. tests (170 s): pytest on CUDA for the fused router / norm + rotary kernels, the GPU
   engine with the fused small ops on vs off (fp32 exact, bf16 agreement, no host sync),
   the fused MoE kernel tests and the GPU engine test (exact tokens and routing vs the fp32
   reference).
2. tune (160 s, only with --tune): ``tools/tune_fused_moe.py --time-budget 130``; the config
   files it writes into inference/kernels/configs/fused_moe/ are copied to $OUT/configs/.
3. bench (320 s): ``tools/bench_decode.py --quick --time-budget 250 --compare-backends ''
   --compare-small-ops off``: batches 1 / 64 / 256 with the fused small ops (auto = on) and
   again with them off, component breakdowns and top kernels at 64 and 256 for both;
   JSON per model in $OUT/bench/.

Logs are $OUT/<stage>.log; a short summary table is printed last (and kept in summary.txt).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_FILES = ["tests/inference/kernels/test_router_topk.py", "tests/inference/kernels/test_norm_rotary.py",
              "tests/gpu/test_fused_small_ops_cuda.py", "tests/inference/kernels/test_fused_moe.py",
              "tests/gpu/test_engine_cuda.py"]
BENCH_ARGS = ["--quick", "--time-budget", "250", "--compare-backends", "", "--compare-small-ops", "off"]
CONFIG_DIR = REPO / "inference" / "kernels" / "configs" / "fused_moe"


def run_stage(name: str, cmd: list[str], limit: int, out: Path) -> dict:
    """Run ``cmd`` with a hard limit; its whole process group is killed when it is reached."""
    log = out / f"{name}.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    print(f"=== {name}: {' '.join(cmd)} (limit {limit} s)", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = "timeout"
    seconds = time.perf_counter() - start
    print(f"=== {name}: rc={rc} in {seconds:.0f} s, log {log}", flush=True)
    return {"stage": name, "rc": rc, "seconds": seconds, "log": str(log)}


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.splitlines()[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "gpu"


def summary(stages: list[dict], out: Path, tune_report: Path) -> str:
    lines = ["", "================ issue 14 summary ================"]
    for s in stages:
        tail = Path(s["log"]).read_text(errors="replace").strip().splitlines()[-1:] if Path(s["log"]).exists() else []
        lines.append(f"{s['stage']:<6} rc={s['rc']!s:<8} {s['seconds']:5.0f} s  {tail[0][:110] if tail else ''}")
    if tune_report.exists():
        rep = json.loads(tune_report.read_text())
        lines.append(f"fused MoE (ms per layer; gmm = torch._grouped_mm, main's path), skipped {len(rep['skipped'])}:")
        lines.append(f"  {'shape':<14} {'T':>5} {'tuned':>8} {'heur':>8} {'gmm':>8} {'gmm/tuned':>9}")
        for r in sorted(rep["rows"], key=lambda r: (r["shape"], r["tokens"])):
            if r.get("tokens") not in (1, 16, 64, 256, 1024, 4096, 8192):
                continue
            t, h, g = r.get("tuned_ms"), r.get("heuristic_ms"), r.get("grouped_mm_ms")
            ratio = f"{g / t:9.2f}" if t and g else f"{'-':>9}"
            lines.append(f"  {r['shape']:<14} {r['tokens']:>5} {t or 0:8.4f} {h or 0:8.4f} {g or 0:8.4f} {ratio}"
                         + (f"  {r['error'][:60]}" if "error" in r else ""))
    for path in sorted((out / "bench").glob("decode_*.json")):
        rep = json.loads(path.read_text())
        ratios = " ".join(f"{b}:{v:.2f}" for b, v in rep.get("ratio_to_floor", {}).items() if v)
        lines.append(f"decode {rep['model']}: x floor {ratios}")
        for backend, c in rep.get("compare", {}).items():
            cr = " ".join(f"{b}:{v:.2f}" for b, v in c.get("ratio_to_floor", {}).items() if v)
            lines.append(f"  with {backend}: x floor {cr or c.get('error', '')}")
        for mode, c in rep.get("compare_small_ops", {}).items():
            cr = " ".join(f"{b}:{v:.2f}" for b, v in c.get("ratio_to_floor", {}).items() if v)
            lines.append(f"  small ops {mode}: x floor {cr or c.get('error', '')}")
        pf = rep.get("prefill", {})
        if "tokens_per_s" in pf:
            lines.append(f"  prefill {pf['tokens_per_s']:,.0f} tok/s = {pf['fraction_of_matmul_rate']:.0%} of the "
                         f"matmul rate ({rep['matmul_tflops']:.0f} TFLOP/s); copy {rep['copy_bandwidth_gb_s']:,.0f} GB/s")
        bd = rep.get("batches", {}).get("64", {}).get("breakdown", {})
        off = rep.get("compare_small_ops", {}).get("off", {}).get("batches", {}).get("64", {}).get("breakdown", {})
        for tag, b in (("", bd), (" small ops off", off)):
            if "rows" in b:
                top = sorted(b["rows"], key=lambda r: -r["ms"])[:6]
                lines.append(f"  batch 64{tag}: " + ", ".join(f"{r['component']} {r['ms']:.2f} ms"
                                                             + (f" (x{r['ratio']:.1f})" if r["ratio"] else "")
                                                             for r in top))
        for k in bd.get("top_kernels", [])[:5]:
            lines.append(f"    {k['ms_per_step']:.3f} ms {k['calls_per_step']:.0f}x {k['kernel'][:50]} "
                         f"[{k['component']}]")
        if rep.get("skipped"):
            lines.append(f"  skipped: {', '.join(rep['skipped'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    tune = "--tune" in (sys.argv[1:] if argv is None else argv)
    out = Path(os.environ.get("OUT", "out-gpu")).resolve()
    (out / "bench").mkdir(parents=True, exist_ok=True)
    py = sys.executable
    slug = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", gpu_name())
    tune_report = out / f"fused_moe_{slug.group(1).lower() if slug else 'gpu'}.json"
    stages = [run_stage("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES], 170, out)]
    if tune:
        stages.append(run_stage("tune", [py, "tools/tune_fused_moe.py", "--time-budget", "130",
                                         "--report", str(tune_report)], 160, out))
        (out / "configs").mkdir(exist_ok=True)
        for path in CONFIG_DIR.glob("*.json"):
            shutil.copy(path, out / "configs" / path.name)
    stages.append(run_stage("bench", [py, "tools/bench_decode.py", *BENCH_ARGS, "--output-dir", str(out / "bench")],
                            320, out))
    text = summary(stages, out, tune_report)
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    return 0 if all(s["rc"] == 0 for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
