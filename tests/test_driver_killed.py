"""The process running ``dasktrain run`` is SIGKILLed mid-epoch; ``--resume`` ends bitwise on the same weights."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from dasktrain.checkpoint import latest_checkpoint
from dasktrain.run_loop import train
from tests.helpers import local_client, run_config, saved_weights

pytestmark = pytest.mark.timeout(300)


def steps_written(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return -1
    steps = [json.loads(line)["global_step"] for line in path.read_text().splitlines()
             if line.strip().startswith('{"kind": "step"')]
    return max(steps, default=-1)


def end_tree(proc: psutil.Process, timeout: float = 20) -> None:
    """SIGKILL a process, then end the processes it had started (found by pid, before the kill)."""
    children = proc.children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=timeout)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        child.kill()
    psutil.wait_procs(alive, timeout=timeout)


def test_driver_killed_then_resumed_is_bitwise_equal(digits_store, tmp_path):
    config = run_config(digits_store, tmp_path / "run", optimizer={"name": "adamw", "lr": 0.003},
                        train={"epochs": 2, "batch_size": 32, "shards": 4, "seed": 5, "deterministic": True},
                        checkpoint={"every_steps": 5, "keep": 2})
    config_file = tmp_path / "run.yaml"
    config_file.write_text(config.to_yaml())
    run_dir = tmp_path / "run"
    cli = [sys.executable, "-m", "dasktrain.cli", "run", str(config_file)]

    proc = psutil.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while steps_written(run_dir) < 20 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert steps_written(run_dir) >= 20, "the run made no progress"
    finally:
        end_tree(proc)
    spe = 1797 // 32 + 1
    assert steps_written(run_dir) < 2 * spe - 1  # killed mid-run, not at the end
    assert latest_checkpoint(run_dir) is not None and not (run_dir / "model.safetensors").exists()

    resumed = subprocess.run([*cli, "--resume"], capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr

    clean = config.model_copy(update={"output_dir": str(tmp_path / "clean")})
    with local_client(1) as client:
        train(clean, client=client)
    got, want = saved_weights(run_dir), saved_weights(tmp_path / "clean")
    for key in want:
        assert torch.equal(got[key], want[key]), key
