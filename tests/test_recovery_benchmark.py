"""The recovery benchmark runs end to end at toy size: real worker processes, a real SIGKILL per mode.

Only that it runs and counts its kills is checked, never how fast recovery is: these machines are
shared, and the figures are for the benchmark's own report (README, "Benchmarks").
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(240)
def test_recovery_benchmark_one_kill_in_each_mode(tmp_path):
    out = tmp_path / "recovery.json"
    # The benchmark's worker processes exit with it, however it ends (their nannies' parent
    # watchdog): a timeout here leaves nothing running.
    done = subprocess.run([sys.executable, "-m", "benchmarks.recovery", "--kills", "1", "--modes", "tree,collective",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("machine: ") for line in lines), done.stdout
    # mode, kills made, kills recovered, then the times: the row counts the kill as recovered
    for mode in ("tree", "collective"):
        assert any(re.match(rf"{mode}\s+1\s+1\s+\d+\.\d\d\s+\d+\.\d\d\s+\d+\.\d\d\s", line) for line in lines), \
            done.stdout
        summary = json.loads(out.read_text())["summary"][mode]
        assert summary["kills"] == summary["recovered"] == 1
