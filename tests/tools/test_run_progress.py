"""Progress and debug logging of a CLI run: the progress line is updated as steps run (not
only when requests finish) and --log-level debug logs each step's scheduler decisions."""

from __future__ import annotations

import re


def test_progress_lines_and_step_decisions(cli, tmp_path):
    run = cli.run(["--num-requests", "6", "--prompt-len", "8", "--output-len", "6", "--max-requests", "2",
                   "--progress", "--log-level", "debug", "--output-dir", tmp_path / "out"])
    assert run.status == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("[")]
    assert lines, run.stderr
    first, last = lines[0], lines[-1]
    assert re.search(r"0/6 done \| running 2 waiting \d+ \| \d+ tokens, [\d,.]+ tok/s \| ETA --", first), first
    assert "6/6 done" in last and "ETA 0:00" in last
    steps = [line for line in run.stderr.splitlines() if re.search(r"step \d+: admitted", line)]
    assert steps and "admitted 2, preempted 0" in steps[0]
    finished = sum(len(re.findall(r"'\d+'", line.split("finished ")[1])) for line in steps)
    admitted = sum(int(re.search(r"admitted (\d+)", line).group(1)) for line in steps)
    assert finished == 6 and admitted == 6
