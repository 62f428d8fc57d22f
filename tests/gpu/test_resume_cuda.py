"""On CUDA (graphs on, bf16): a run interrupted by SIGTERM and resumed ends bit-identical
to an uninterrupted run, although the resumed attempt batches the requests differently."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from routing_replay import load_results, load_routing
from routing_replay.run_dir_schema import validate_run_dir

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--device", "cuda", "--record-routing", "--num-requests", "96", "--prompt-len", "24", "--output-len", "48",
        "--max-requests", "16", "--checkpoint-every", "1", "--log-level", "debug"]


def _cli(args: list, **kwargs) -> subprocess.Popen:
    # Keep what PYTHONPATH already holds (the GPU machine carries orjson in a wheel directory).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, str(ROOT / "tools" / "run_inference.py")] + [str(a) for a in args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, **kwargs)


@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.8", "--seed", "3"]], ids=["greedy", "sampled"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, sampling):
    ref, out = tmp_path / "ref", tmp_path / "out"
    done = _cli(ARGS + sampling + ["--output-dir", ref])
    assert done.wait(timeout=600) == 0, done.stderr.read()
    proc = _cli(ARGS + sampling + ["--output-dir", out])
    commits = 0
    while commits < 10:
        line = proc.stderr.readline()
        assert line, "the run ended before it was signalled"
        commits += " committed " in line
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=600)
    assert proc.returncode == 143 and validate_run_dir(out) == []
    resumed = _cli(ARGS + sampling + ["--output-dir", out, "--resume"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    ours, theirs = load_results(out), load_results(ref)
    assert [r["output_token_ids"] for r in ours] == [r["output_token_ids"] for r in theirs]
    a, b = load_routing(out)[0], load_routing(ref)[0]
    assert set(a) == set(b)
    for key in b:
        np.testing.assert_array_equal(a[key], b[key])
