"""Dask scheduler and worker processes started by their command lines, and ended by pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def dask_processes(tmp: Path, workers: int, threads: int = 1) -> Iterator[str]:
    """``dask scheduler`` and ``workers`` ``dask worker`` processes; yields the scheduler address.

    Every process started here is ended here, by its pid, with a bounded wait.
    """
    scheduler_file = tmp / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    started: list[subprocess.Popen] = []
    try:
        started.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
             "--no-dashboard", "--scheduler-file", str(scheduler_file)],
            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "scheduler.log", "w")))
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        for i in range(workers):
            started.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", str(threads),
                 "--nworkers", "1", "--no-dashboard", "--memory-limit", "2GiB", "--host", "127.0.0.1"],
                env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / f"worker{i}.log", "w")))
        yield address
    finally:
        for proc in reversed(started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(started):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
