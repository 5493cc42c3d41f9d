"""Ctrl-C and a killed driver, as a terminal user meets them, with the default local Prefect API.

``dasktrain run`` is started in a process group of its own and interrupted the way a terminal
does it (SIGINT to the whole group): it must exit within 10 s with one line saying where to go on
from, leave no process behind (its local Prefect server included), record the flow run as
crashed, and resuming must then end bitwise where an uninterrupted run ends. A driver killed
with SIGKILL must not leave its Prefect server running either.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from dasktrain.config import load_config
from dasktrain.run_loop import train
from tests.helpers import local_client, saved_weights

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parent.parent
DASKTRAIN = str(Path(sys.executable).parent / "dasktrain")


def run_args(store: Path, out: Path) -> list[str]:
    return ["examples/digits.yaml", "--set", f"data.store={store}", "--set", f"output_dir={out}",
            "--set", "train.epochs=4", "--set", "train.deterministic=true", "--set", "checkpoint.every_steps=5",
            "--set", "cluster.workers=2", "--set", "cluster.dashboard=false"]


def local_api_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp / "prefect-home")  # no profile on this machine can name a server
    return env


def start(args: list[str], tmp: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([DASKTRAIN, "run", *args], cwd=REPO, env=local_api_env(tmp), start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def wait_for_steps(proc: subprocess.Popen[bytes], out: Path, steps: int, log: Path) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 150
    while not (metrics.exists() and metrics.read_text().count('"kind": "step"') >= steps):
        assert proc.poll() is None, f"the run ended early:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {steps} steps in time:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)


def end_all(processes: list[psutil.Process], grace_s: float = 10.0) -> list[psutil.Process]:
    """The processes still running after ``grace_s`` (zombies aside); each one is then killed, by pid.

    A worker process and the multiprocessing helpers it shares with its siblings leave a moment
    after the driver: their exit is awaited with a deadline, not checked at one instant."""
    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + grace_s
    left = [p for p in processes if running(p)]
    while left and time.monotonic() < deadline:
        psutil.wait_procs(left, timeout=0.5)
        left = [p for p in left if running(p)]
    for p in left:
        p.kill()
    return left


def test_ctrl_c_exits_fast_leaves_nothing_and_resumes_bitwise(digits_store, tmp_path):
    out, log = tmp_path / "runs" / "run", tmp_path / "run.log"
    proc = start(run_args(digits_store, out), tmp_path, log)
    try:
        wait_for_steps(proc, out, 12, log)
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert any("prefect" in " ".join(p.cmdline()) for p in descendants)  # the local server is a child
        interrupted = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=30)
        took = time.monotonic() - interrupted
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 130 and took < 10, (code, took, text[-3000:])
    assert "Traceback" not in text, text[-3000:]
    assert text.strip().splitlines()[-1].startswith("interrupted: the run stopped; last good checkpoint"), text[-2000:]
    assert not end_all(descendants), "processes left behind"
    with sqlite3.connect(tmp_path / "runs" / ".prefect" / "prefect.db") as db:
        assert [row[0] for row in db.execute("select state_type from flow_run")] == ["CRASHED"]

    # The resume goes through the library on one cluster with the uninterrupted run (the CLI's
    # --resume has its own test, test_driver_killed.py): what matters here is what Ctrl-C left.
    overrides = [f"data.store={digits_store}", "train.epochs=4", "train.deterministic=true", "checkpoint.every_steps=5"]
    resumed = load_config(REPO / "examples" / "digits.yaml", [*overrides, f"output_dir={out}"])
    config = load_config(REPO / "examples" / "digits.yaml", [*overrides, f"output_dir={tmp_path / 'whole'}"])
    starts: list[int] = []

    def note_start(event: dict) -> None:
        if event["kind"] == "start":
            starts.append(event["start_step"])

    with local_client(2) as client:
        assert train(resumed, client=client, resume=True, on_event=note_start).completed
        train(config, client=client)
    assert starts and starts[0] >= 10, starts  # it went on from a checkpoint Ctrl-C left, not from scratch
    # Deterministic mode: the same bits as an uninterrupted run, whatever the driver went through.
    whole, got = saved_weights(tmp_path / "whole"), saved_weights(out)
    for key in whole:
        assert torch.equal(got[key], whole[key]), key


def test_killed_driver_takes_its_prefect_server_along(digits_store, tmp_path):
    out, log = tmp_path / "runs" / "run", tmp_path / "run.log"
    proc = start(run_args(digits_store, out), tmp_path, log)
    descendants: list[psutil.Process] = []
    try:
        wait_for_steps(proc, out, 3, log)
        descendants = psutil.Process(proc.pid).children(recursive=True)
        (server,) = [p for p in descendants if "prefect" in " ".join(p.cmdline())]
        proc.kill()
        proc.wait(timeout=10)
        gone, alive = psutil.wait_procs([server], timeout=15)
        assert server in gone, "the local Prefect server outlived its driver"
    finally:
        if proc.poll() is None:
            proc.kill()
        end_all(descendants, grace_s=0)  # the orphaned workers of the killed driver
