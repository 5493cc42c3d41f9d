"""Run directory safety (issue #13, items 2 and 4).

One writer per run directory: while a run trains into ``output_dir`` (run A, a separate process on
the test's cluster), a second ``train`` or a ``predict`` writing there is refused with one line
naming the holder, and A ends exactly as a lone run does. A lock left by a dead process is taken
over. And a run's identity covers its data: ``--resume`` against a store re-ingested with another
length, chunking, arrays or metadata is refused naming what changed, while the unchanged store
resumes bitwise.

Run A is slowed, not timed: its model (tests/sleepy.py) sleeps in every forward of one worker
while a flag file names that worker's pid; the test removes the flag once it has made its
checks, and A finishes at full speed. The weights do not depend on the sleeping.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch

from dasktrain import run_lock
from dasktrain.checkpoint import DATA_LAYOUT, DataChangedError, latest_checkpoint
from dasktrain.config import RunConfig
from dasktrain.inference import predict
from dasktrain.ingest import example_arrays, write_store
from dasktrain.metrics import read_metrics
from dasktrain.run_dir import prepare_run_dir
from dasktrain.run_lock import LOCK_FILE, Holder, RunDirLockedError
from dasktrain.run_loop import train
from tests.helpers import local_client, run_config, saved_weights

pytestmark = pytest.mark.timeout(240)

SLOW_S = 0.25
"""Seconds the flagged worker sleeps per forward while run A must still be running (2 forwards a step)."""
RUNNER = """
import sys
from distributed import Client
from dasktrain.config import load_config
from dasktrain.run_loop import train

with Client(sys.argv[2], timeout=60) as client:
    train(load_config(sys.argv[1]), client=client)
"""
"""Run A's process: train a config file on the cluster at an address."""


@pytest.fixture(scope="module")
def client():
    with local_client(2) as c:
        yield c


@pytest.fixture(scope="module")
def flag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The flag file of the sleepy model; absent (no worker sleeps) except while run A is held back."""
    return tmp_path_factory.mktemp("flag") / "slow-worker"


def config_for(store: Path | str, out: Path | str, flag: Path, epochs: int = 2) -> RunConfig:
    """A small deterministic run (29 steps an epoch on digits) whose model can be slowed by ``flag``."""
    return run_config(
        store, out,
        model={"factory": "tests.sleepy:sleepy_mlp",
               "kwargs": {"flag": str(flag), "seconds": SLOW_S, "in_features": 64, "out_features": 10, "hidden": [32]}},
        optimizer={"name": "adamw", "lr": 0.003},
        train={"epochs": epochs, "batch_size": 64, "shards": 4, "seed": 5, "deterministic": True},
        checkpoint={"every_steps": 10, "keep": 2},
    )


@pytest.fixture(scope="module")
def lone(digits_store, client, flag, tmp_path_factory) -> Path:
    """The run directory of the config trained alone, undisturbed: the reference weights."""
    out = tmp_path_factory.mktemp("lone") / "run"
    assert not flag.exists()
    train(config_for(digits_store, out, flag), client=client)
    return out


@contextmanager
def running(config: RunConfig, client, flag: Path, tmp: Path) -> Iterator[subprocess.Popen]:
    """Run A: ``config`` trained by a child process on the test's cluster, held back (one worker
    sleeps in each forward) until the block ends. Yields once A holds the run directory's lock;
    on leaving, lets A go at full speed and waits for it to end (ended by its pid if it hangs)."""
    slow_pid = sorted(client.run(os.getpid).values())[0]
    flag.write_text(str(slow_pid))
    config_file = tmp / "a.yaml"
    config_file.write_text(config.to_yaml())
    log_file = tmp / "a.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(config_file), client.scheduler.address],
                                env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        lock = Path(config.output_dir) / LOCK_FILE
        deadline = time.monotonic() + 90
        while not (lock.exists() and Holder.parse(lock.read_bytes()) is not None):
            assert proc.poll() is None, f"run A ended before taking its lock: {log_file.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "run A did not take its lock in 90 s"
            time.sleep(0.05)
        yield proc
    finally:
        flag.unlink(missing_ok=True)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
            raise AssertionError(f"run A did not end: {log_file.read_text()[-2000:]}") from None
    assert proc.returncode == 0, f"run A failed: {log_file.read_text()[-2000:]}"


def assert_names_holder(message: str, run_dir: Path, pid: int) -> None:
    assert "\n" not in message
    assert str(run_dir) in message and f"pid {pid} on {socket.gethostname()} since " in message, message


def assert_same_weights(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def dead_pid() -> int:
    """The pid of a process that has ended (a child started and waited for here)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)
    assert not psutil.pid_exists(child.pid)
    return child.pid


def test_second_train_is_refused_while_a_run_writes(digits_store, client, flag, lone, tmp_path):
    run_dir = tmp_path / "run"
    config = config_for(digits_store, run_dir, flag)
    with running(config, client, flag, tmp_path) as a:
        for resume in (False, True):
            with pytest.raises(RunDirLockedError) as refused:
                train(config, client=client, resume=resume)
            assert_names_holder(str(refused.value), run_dir, a.pid)
    assert_same_weights(saved_weights(run_dir), saved_weights(lone))
    records = read_metrics(run_dir)
    steps = [r["global_step"] for r in records if r["kind"] == "step"]
    assert steps == [r["global_step"] for r in read_metrics(lone) if r["kind"] == "step"]
    assert steps == sorted(set(steps)) and steps[0] == 0  # every step once: nothing from B
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1]
    assert not (run_dir / LOCK_FILE).exists()


def test_predict_into_a_running_run_is_refused(digits_store, client, flag, lone, tmp_path):
    run_dir = tmp_path / "run"
    config = config_for(digits_store, run_dir, flag)
    config_file = tmp_path / "predict.yaml"
    config_file.write_text(config.to_yaml())
    output = run_dir / "predictions.zarr"
    with running(config, client, flag, tmp_path) as a:
        with pytest.raises(RunDirLockedError) as refused:
            predict(client, config, lone, digits_store, output)
        assert_names_holder(str(refused.value), run_dir, a.pid)
        cli = subprocess.run(
            [sys.executable, "-m", "dasktrain.cli", "predict", str(config_file), "--checkpoint", str(lone),
             "--input", str(digits_store), "--output", str(output),
             "--set", "cluster.kind=address", "--set", f"cluster.address={client.scheduler.address}"],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "NO_COLOR": "1"})
        assert cli.returncode == 1, cli.stderr
        errors = [line for line in cli.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, cli.stderr
        assert_names_holder(errors[0], run_dir, a.pid)
        assert not output.exists()
    assert (run_dir / "model.safetensors").is_file() and not output.exists()


def test_stale_lock_is_taken_over(digits_store, client, flag, tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    gone = dead_pid()
    (run_dir / LOCK_FILE).write_bytes(Holder(gone, socket.gethostname(), "2026-01-01T00:00:00Z", "dasktrain run x.yaml").to_bytes())
    with caplog.at_level(logging.WARNING, logger="dasktrain.run_lock"):
        result = train(config_for(digits_store, run_dir, flag, epochs=1), client=client)
    assert result.completed
    assert any("stale" in r.getMessage() and f"pid {gone} " in r.getMessage() for r in caplog.records), caplog.text
    assert not (run_dir / LOCK_FILE).exists()


def test_resume_refuses_a_changed_store(client, flag, lone, tmp_path, caplog):
    arrays = example_arrays("digits")
    store = write_store(tmp_path / "digits.zarr", arrays, chunk_size=64)
    run_dir = tmp_path / "run"
    config = config_for(store, run_dir, flag)
    train(config, client=client, until_epoch=1)
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None
    recorded = json.loads((checkpoint / "state.json").read_text())[DATA_LAYOUT]["data.store"]
    assert recorded["arrays"]["inputs"] == {"shape": [1797, 64], "dtype": "float32", "chunks": [64, 64]}
    metrics = (run_dir / "metrics.jsonl").read_bytes()

    changes = [  # (arrays, chunk size, source attribute, what the refusal must say)
        ({k: v[:1000] for k, v in arrays.items()}, 64, "", "inputs shape (1797, 64) -> (1000, 64)"),
        (arrays, 32, "", "inputs chunks (64, 64) -> (32, 64)"),
        ({**arrays, "weights": np.ones(1797, np.float32)}, 64, "",
         "arrays ['inputs', 'targets'] -> ['inputs', 'targets', 'weights']"),
        (arrays, 64, "other.npz", "metadata fingerprint"),
    ]
    for new, chunk, source, expected in changes:
        write_store(store, new, chunk_size=chunk, overwrite=True, source=source)
        with pytest.raises(DataChangedError) as refused:
            train(config, client=client, resume=True)
        message = str(refused.value)
        assert "\n" not in message and expected in message, message
        assert f"data.store {store} changed since checkpoint {checkpoint.name}" in message, message
    assert latest_checkpoint(run_dir) == checkpoint and (run_dir / "metrics.jsonl").read_bytes() == metrics
    assert not (run_dir / LOCK_FILE).exists()

    write_store(store, arrays, chunk_size=64, overwrite=True)  # re-ingested as it was: the same layout
    # A checkpoint from before the layout was recorded: resumed, with a warning.
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    state = json.loads((checkpoint / "state.json").read_text())
    del state[DATA_LAYOUT]
    (old / "checkpoints" / checkpoint.name / "state.json").write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger="dasktrain.checkpoint"):
        assert prepare_run_dir(config.model_copy(update={"output_dir": str(old)}), old, resume=True) == state["step"]
    assert "records no data layout" in caplog.text

    assert train(config, client=client, resume=True).completed
    assert_same_weights(saved_weights(run_dir), saved_weights(lone))


# -- the lock alone: no cluster ----------------------------------------------------------------


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
    with run_lock.run_lock(tmp_path / "run") as held:
        assert held.flock and Holder.parse((tmp_path / "run" / LOCK_FILE).read_bytes()) == held.holder
        with pytest.raises(RunDirLockedError, match=f"pid {os.getpid()} "):
            run_lock.acquire(tmp_path / "run")
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    run_lock.acquire(tmp_path / "run").release()  # free again


def test_without_flock_the_file_alone_locks(tmp_path, monkeypatch, caplog):
    """Filesystems without flock (NFSv3 ``nolock``, Lustre ``noflock``): the pid and host decide."""

    def no_flock(fd: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock, "_flock", no_flock)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock_file = run_dir / LOCK_FILE
    host = socket.gethostname()

    lock_file.write_bytes(Holder(os.getppid(), host, "2026-01-01T00:00:00Z", "alive").to_bytes())
    with pytest.raises(RunDirLockedError, match=f"pid {os.getppid()} on {host}"):
        run_lock.acquire(run_dir)
    lock_file.write_bytes(Holder(1, "elsewhere", "2026-01-01T00:00:00Z", "far").to_bytes())
    with pytest.raises(RunDirLockedError, match="cannot be checked from here"):
        run_lock.acquire(run_dir)

    gone = dead_pid()
    lock_file.write_bytes(Holder(gone, host, "2026-01-01T00:00:00Z", "crashed").to_bytes())
    with caplog.at_level(logging.WARNING, logger="dasktrain.run_lock"):
        held = run_lock.acquire(run_dir)
    assert not held.flock and f"pid {gone} " in caplog.text
    assert Holder.parse(lock_file.read_bytes()) == held.holder
    held.release()
    assert not lock_file.exists()
