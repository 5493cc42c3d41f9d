"""More user-fixable errors through the CLI: each is one ``error:`` line and exit 1, and nothing
is left damaged (a factory that raises, a non-UTF-8 CSV, a full disk); a metrics file whose
last line was torn mid-write (a killed driver, a full disk) is read by ``report`` and ``--resume``;
a checkpoint damaged after it was written is set aside by ``--resume``, which goes on from the
one before it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dasktrain.checkpoint import latest_checkpoint, load_checkpoint
from dasktrain.metrics import read_metrics
from dasktrain.run_loop import train
from tests import helpers
from tests.test_cli import dasktrain, error_line, run_config

pytestmark = pytest.mark.timeout(240)


def test_factory_that_raises_is_named(digits_store: Path, tmp_path: Path) -> None:
    line = error_line(run_config(digits_store, tmp_path / "run", "model.factory=tests.faulty:raising_factory"))
    assert "tests.faulty:raising_factory" in line and "this factory always fails" in line


def test_csv_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    csv = tmp_path / "latin1.csv"
    csv.write_bytes(b"a,b,label\n1,2,0\n3,\xe94,1\n")
    line = error_line(dasktrain("ingest", tmp_path / "out.zarr", "--csv", csv))
    assert str(csv) in line and "not UTF-8" in line and "offset 18" in line
    assert not (tmp_path / "out.zarr").exists()


def test_torn_last_metrics_line_is_read_by_report_and_resume(digits_store: Path, tmp_path: Path) -> None:
    config = helpers.run_config(digits_store, tmp_path / "half", train={"epochs": 2, "batch_size": 100, "shards": 2})
    with helpers.local_client(1) as client:
        train(config, client=client, until_epoch=1)
        with open(tmp_path / "half" / "metrics.jsonl", "a") as fh:
            fh.write('{"kind": "step", "global_step": 9')  # a driver killed mid-write
        report = dasktrain("report", tmp_path / "half")
        assert report.returncode == 0, report.stderr
        assert train(config, client=client, resume=True).completed
    epochs = [r["epoch"] for r in read_metrics(tmp_path / "half") if r["kind"] == "epoch"]
    assert epochs == [0, 1]


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 1.5 MiB tmpfs (root only): room for one checkpoint of the model below, not two."""
    mount = tmp_path / "runs" / "run"
    mount.mkdir(parents=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(digits_store: Path, tiny_disk: Path) -> None:
    # 85k parameters: a checkpoint (weights + AdamW's two moments) takes about 1 MiB.
    line = error_line(run_config(digits_store, tiny_disk, "model.kwargs.hidden=[256,256]", "checkpoint.every_steps=4",
                                 "checkpoint.keep=5", "cluster.workers=2"))
    assert "No space left on device" in line
    newest = latest_checkpoint(tiny_disk)
    assert newest is not None and load_checkpoint(newest).step == 4
    records = read_metrics(tiny_disk)
    assert [r["global_step"] for r in records if r["kind"] == "step"][:4] == [0, 1, 2, 3]


def test_resume_sets_a_damaged_checkpoint_aside_and_goes_on_from_the_one_before(
        digits_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = helpers.run_config(digits_store, tmp_path / "run", train={
        "epochs": 2, "batch_size": 100, "shards": 2, "seed": 3, "deterministic": True},
        checkpoint={"every_steps": 4, "keep": 3})
    whole = config.model_copy(update={"output_dir": str(tmp_path / "whole")})
    with helpers.local_client(1) as client:
        train(whole, client=client)
        train(config, client=client, until_epoch=1)  # 18 steps per epoch: checkpoints 8, 12, 16, 18
        newest = latest_checkpoint(tmp_path / "run")
        assert newest is not None and newest.name == "step-00000018"
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated after the rename
        with caplog.at_level("WARNING", logger="dasktrain.checkpoint"):
            result = train(config, client=client, resume=True)
    assert result.completed
    assert any("step-00000018 cannot be read" in r.getMessage() for r in caplog.records), caplog.text
    assert (tmp_path / "run" / "checkpoints" / ".step-00000018.damaged").is_dir()
    got, expected = helpers.saved_weights(tmp_path / "run"), helpers.saved_weights(tmp_path / "whole")
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_scheduler_of_an_address_cluster_killed_mid_run_is_one_line(digits_store: Path, tmp_path: Path) -> None:
    import signal
    import time

    import psutil

    from tests.processes import dask_processes

    out, log = tmp_path / "run", tmp_path / "run.log"
    with dask_processes(tmp_path, 2) as address:
        (scheduler,) = [p for p in psutil.Process().children() if "dask_scheduler" in " ".join(p.cmdline())]
        root = Path(__file__).resolve().parents[1]
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "dasktrain"), "run", str(root / "examples" / "digits.yaml"),
             "--set", f"data.store={digits_store}", "--set", f"output_dir={out}", "--set", "cluster.kind=address",
             "--set", f"cluster.address={address}", "--set", "train.epochs=30", "--set", "cluster.dashboard=false"],
            cwd=root, env={**os.environ, "NO_COLOR": "1"}, stdout=log.open("w"), stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count('"step"') > 5):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            scheduler.send_signal(signal.SIGKILL)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert code == 1 and "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "lost the Dask scheduler" in errors[0], text[-3000:]
