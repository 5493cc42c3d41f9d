"""The ``dasktrain`` command line, run as a real subprocess: ingest, a full example run, bad input.

Every bad input must end with exit code 1 and one ``error: ...`` line on stderr that names what is
wrong, without a traceback (DESIGN.md invariant 6).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from dasktrain.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from dasktrain.config import load_config
from dasktrain.ingest import example_arrays, store_summary, write_store
from dasktrain.metrics import read_metrics
from dasktrain.plan import SamplingPlan
from dasktrain.store import open_dataset

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits.yaml"
# Fail fast, one worker, no dashboard: the settings of every bad-input run.
SMALL = ("--set", "cluster.workers=1", "--set", "cluster.dashboard=false", "--set", "train.epochs=1")


def dasktrain(*args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the CLI as ``python -m dasktrain.cli`` from the repository root."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "COLUMNS")}
    env["NO_COLOR"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "dasktrain.cli", *map(str, args)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``error:`` line of a failed command (asserting exit code 1 and no traceback)."""
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 1, output
    assert "Traceback" not in result.stderr, output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, output
    return lines[0]


def run_config(store: Path, out: Path, *overrides: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    sets = [arg for o in overrides for arg in ("--set", o)]
    return dasktrain("run", DIGITS, "--set", f"data.store={store}", "--set", f"output_dir={out}", *SMALL, *sets,
                     timeout=timeout)


def read_store(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(arr[...]) for name, arr in group.arrays()}


# -- ingest -----------------------------------------------------------------------------------


def test_ingest_npy_pair(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(100, 3, 2)).astype(np.float32)
    y = np.arange(100) % 4
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    store = tmp_path / "store.zarr"
    result = dasktrain("ingest", store, "--inputs", tmp_path / "x.npy", "--targets", tmp_path / "y.npy",
                       "--chunk-size", 16, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"wrote {store}: 100 samples in 7 chunks of 16" in result.stdout
    summary = store_summary(store)
    assert summary["samples"] == 100 and summary["chunk_size"] == 16
    assert summary["arrays"] == {"inputs": {"dtype": "float32", "sample_shape": [3, 2]},
                                 "targets": {"dtype": "int64", "sample_shape": []}}
    group = zarr.open_group(str(store), mode="r")
    assert group["inputs"].chunks == (16, 3, 2)
    np.testing.assert_array_equal(group["inputs"][...], x)
    np.testing.assert_array_equal(group["targets"][...], y)


def test_ingest_npz_with_keys(tmp_path: Path) -> None:
    x = np.arange(40, dtype=np.float64).reshape(20, 2)
    y = np.linspace(0, 1, 20, dtype=np.float32)
    np.savez(tmp_path / "d.npz", X=x, Y=y)
    store = tmp_path / "store.zarr"
    result = dasktrain("ingest", store, "--npz", tmp_path / "d.npz", "--inputs-key", "X", "--targets-key", "Y",
                       "--chunk-size", 8, timeout=60)
    assert result.returncode == 0, result.stderr
    summary = store_summary(store)
    assert summary["samples"] == 20 and summary["arrays"]["inputs"]["dtype"] == "float64"
    arrays = read_store(store)
    np.testing.assert_array_equal(arrays["inputs"], x)
    np.testing.assert_array_equal(arrays["targets"], y)


@pytest.mark.parametrize("regression", [False, True])
def test_ingest_csv(tmp_path: Path, regression: bool) -> None:
    (tmp_path / "d.csv").write_text("a,label,b\n1.5,2,3\n4,0,5.25\n6,1,7\n")
    store = tmp_path / "store.zarr"
    args = ["--regression"] if regression else []
    result = dasktrain("ingest", store, "--csv", tmp_path / "d.csv", "--target-column", "label", *args, timeout=60)
    assert result.returncode == 0, result.stderr
    arrays = read_store(store)
    np.testing.assert_array_equal(arrays["inputs"], np.array([[1.5, 3], [4, 5.25], [6, 7]], dtype=np.float32))
    if regression:
        assert arrays["targets"].dtype == np.float32
        np.testing.assert_array_equal(arrays["targets"], [[2.0], [0.0], [1.0]])
    else:
        assert arrays["targets"].dtype == np.int64
        np.testing.assert_array_equal(arrays["targets"], [2, 0, 1])
    assert store_summary(store)["samples"] == 3


@pytest.mark.parametrize("image", [False, True])
def test_ingest_example_digits(tmp_path: Path, image: bool) -> None:
    store = tmp_path / "digits.zarr"
    result = dasktrain("ingest", store, "--example", "digits", "--chunk-size", 64, *(["--image"] if image else []),
                       timeout=60)
    assert result.returncode == 0, result.stderr
    summary = store_summary(store)
    assert summary["samples"] == 1797 and summary["chunk_size"] == 64
    assert summary["arrays"]["inputs"]["sample_shape"] == ([1, 8, 8] if image else [64])
    arrays = read_store(store)
    expected = example_arrays("digits", image=image)
    np.testing.assert_array_equal(arrays["inputs"], expected["inputs"])
    np.testing.assert_array_equal(arrays["targets"], expected["targets"])


def test_ingest_csv_with_a_non_number_names_line_and_column(tmp_path: Path) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text("x,y,label\n1,2,0\n3,oops,1\n")
    store = tmp_path / "store.zarr"
    line = error_line(dasktrain("ingest", store, "--csv", csv, timeout=60))
    assert str(csv) in line and "line 3" in line and "column 'y'" in line and "'oops'" in line
    assert not store.exists()


def test_ingest_keeps_an_existing_store_without_overwrite(tmp_path: Path) -> None:
    store = write_store(tmp_path / "store.zarr", {"inputs": np.zeros((10, 2), np.float32),
                                                  "targets": np.zeros(10, np.int64)}, chunk_size=5)
    before = read_store(store)
    (tmp_path / "d.csv").write_text("a,label\n1,1\n2,0\n")
    line = error_line(dasktrain("ingest", store, "--csv", tmp_path / "d.csv", timeout=60))
    assert str(store) in line and "already exists" in line and "--overwrite" in line
    after = read_store(store)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert store_summary(store)["samples"] == 10

    result = dasktrain("ingest", store, "--csv", tmp_path / "d.csv", "--overwrite", timeout=60)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(read_store(store)["targets"], [1, 0])


def test_ingest_wants_exactly_one_source(tmp_path: Path) -> None:
    result = dasktrain("ingest", tmp_path / "s.zarr", "--example", "digits", "--csv", tmp_path / "d.csv", timeout=60)
    assert result.returncode == 2 and "exactly one source" in result.stderr
    result = dasktrain("ingest", tmp_path / "s.zarr", timeout=60)
    assert result.returncode == 2 and "exactly one source" in result.stderr
    assert not (tmp_path / "s.zarr").exists()


# -- run --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
# -- bad input --------------------------------------------------------------------------------


def test_run_missing_store(tmp_path: Path) -> None:
    missing = tmp_path / "nope.zarr"
    line = error_line(run_config(missing, tmp_path / "run"))
    assert str(missing) in line and "does not exist" in line


def test_run_missing_array(digits_store: Path, tmp_path: Path) -> None:
    line = error_line(run_config(digits_store, tmp_path / "run", "data.inputs=nope"))
    assert str(digits_store) in line and "no array 'nope'" in line and "inputs" in line


def test_run_arrays_of_different_lengths(tmp_path: Path) -> None:
    store = tmp_path / "uneven.zarr"
    group = zarr.open_group(str(store), mode="w")
    group.create_array("inputs", shape=(100, 64), dtype="float32", chunks=(10, 64))[...] = 0.5
    group.create_array("targets", shape=(90,), dtype="int64", chunks=(10,))[...] = 1
    line = error_line(run_config(store, tmp_path / "run"))
    assert str(store) in line and "differ in length" in line
    assert "'inputs' has 100" in line and "'targets' has 90" in line


def test_run_model_that_does_not_fit_the_inputs(digits_store: Path, tmp_path: Path) -> None:
    line = error_line(run_config(digits_store, tmp_path / "run", "model.kwargs.in_features=65"))
    assert "'inputs'" in line and "(64,)" in line and str(digits_store) in line


def test_run_non_numeric_store(tmp_path: Path) -> None:
    store = tmp_path / "strings.zarr"
    group = zarr.open_group(str(store), mode="w")
    with warnings.catch_warnings():  # zarr: fixed-length strings have no v3 spec yet
        warnings.simplefilter("ignore")
        group.create_array("inputs", shape=(100, 64), dtype="<U3", chunks=(10, 64))[...] = "abc"
    group.create_array("targets", shape=(100,), dtype="int64", chunks=(10,))[...] = 1
    line = error_line(run_config(store, tmp_path / "run"))
    assert str(store) in line and "'inputs'" in line and "<U3" in line and "numeric" in line


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("train.bogus=1", ["unknown key 'train.bogus'"]),
        ("train.epochs=abc", ["'train.epochs'", "'abc'"]),
    ],
)
def test_run_bad_config_value(digits_store: Path, tmp_path: Path, override: str, fragments: list[str]) -> None:
    line = error_line(run_config(digits_store, tmp_path / "run", override))
    assert "digits.yaml" in line
    for fragment in fragments:
        assert fragment in line


@pytest.mark.timeout(180)
def test_run_more_workers_than_shards(digits_store: Path, tmp_path: Path) -> None:
    line = error_line(run_config(digits_store, tmp_path / "run", "cluster.workers=3", "train.shards=2"))
    assert "cluster.workers=3" in line and "train.shards=2" in line


@pytest.mark.timeout(180)
def test_run_nan_loss_names_the_step_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    # One shard, no validation split: the plan streams the store's chunks, and the step that
    # first draws a sample of a chunk is found with the plan API, as the workers will compute it.
    arrays = example_arrays("digits")
    chunks = open_dataset(write_store(tmp_path / "clean.zarr", arrays, chunk_size=64), "inputs", "targets").chunks()
    plan = SamplingPlan(chunks, shards=1, batch_size=64, seed=0, shuffle_window=2)
    epoch = plan.epoch(0)
    first_use = {}
    for k in range(plan.steps_per_epoch):
        for i in epoch.global_batch(k):
            first_use.setdefault(int(i) // 64, k)
    bad_chunk, bad_step = min(((c, k) for c, k in first_use.items() if k >= 3), key=lambda ck: ck[1])
    chunk = chunks[bad_chunk]
    arrays["inputs"][chunk.start : chunk.stop] = np.nan
    store = write_store(tmp_path / "nan.zarr", arrays, chunk_size=64)

    out = tmp_path / "run"
    line = error_line(run_config(store, out, "data.validation=null", "train.shards=1",
                                 "checkpoint.every_steps=1", "checkpoint.keep=2"))
    assert f"global step {bad_step} " in line and "nan" in line
    newest = latest_checkpoint(out)
    assert newest is not None and str(newest) in line
    assert 0 < load_checkpoint(newest).step <= bad_step
    assert len(list_checkpoints(out)) == 2
    ckpt = load_checkpoint(newest)
    tensors = list(ckpt.model.values()) + [v for s in ckpt.optimizer["state"].values() for v in s.values()
                                           if isinstance(v, torch.Tensor)]
    assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors)
    # The run stopped before the bad step's update: no step record at or past it.
    assert all(r["global_step"] < bad_step for r in read_metrics(out) if r["kind"] == "step")


# -- the CLI's own plumbing, in process (no cluster) ------------------------------------------


def test_run_passes_flags_and_draws_every_event(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--set, --resume and --until-epoch reach train(); the YAML is read once and the flow gets
    the validated config with the checks the CLI made; every event kind is drawn; a stopped
    run's summary says how to go on."""
    import contextlib

    import dasktrain.config
    import dasktrain.flows.training
    import dasktrain.preflight
    from dasktrain.cli import app
    from dasktrain.metrics import MetricsLog
    from dasktrain.run_loop import RunResult

    calls = []

    def fake_train(config, *, client=None, resume=False, until_epoch=None, on_event=None):  # noqa: ANN001, ANN202
        calls.append((config, resume, until_epoch))
        run_dir = Path(config.output_dir)
        run_dir.mkdir(parents=True)
        epoch = {"kind": "epoch", "epoch": 0, "end_step": 3, "samples": 192, "train_loss": 1.5, "val_loss": 1.25,
                 "val_accuracy": 0.5, "time_s": 1.0, "samples_per_s": 192.0}
        metrics = MetricsLog(run_dir)
        metrics.write(epoch)
        metrics.close()
        on_event({"kind": "start", "start_step": 0, "end_step": 3, "steps_per_epoch": 3, "workers": ["a", "b"],
                  "dashboard": "http://127.0.0.1:1234/status", "run_dir": str(run_dir)})
        for t in range(3):
            on_event({"kind": "step", "global_step": t, "epoch": 0, "step": t, "loss": 2.0 - t / 2, "lr": 0.01,
                      "samples_per_s": 100.0})
        on_event({"kind": "regroup", "reason": "workers lost: ['b']", "global_step": 2, "generation": 1,
                  "lost": ["b"], "joined": [], "workers": 1, "end_step": 2})
        on_event(epoch)
        on_event({"kind": "end", "completed": False, "steps": 3, "epochs": [epoch]})
        return RunResult(run_dir, 3, False, [epoch])

    checked = object()  # what the CLI's preflight found (no data/digits.zarr is opened here)
    reads = []

    def fake_flow(config, overrides, resume, until_epoch):  # noqa: ANN001, ANN202
        # `run` runs the Prefect flow, whose stages test_flows.py tests; here only the CLI around it.
        # The config as read, handed over as a mapping (flow parameters are JSON), not a path to read again.
        assert isinstance(config, dict) and overrides == []
        assert dasktrain.flows.training.HANDED_PREFLIGHT is checked
        config = dasktrain.config.validate_config(config, source="flow parameter config")
        result = fake_train(config, resume=resume, until_epoch=until_epoch, on_event=dasktrain.flows.training.EVENT_HOOK)
        return {"run_dir": str(result.run_dir), "steps": result.steps, "completed": result.completed,
                "epochs": result.epochs}

    def counted_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        reads.append(args)
        return load_config(*args, **kwargs)

    monkeypatch.setattr(dasktrain.flows.training, "training_flow", fake_flow)
    monkeypatch.setattr(dasktrain.flows.training, "prefect_api", lambda db_dir: contextlib.nullcontext(str(db_dir)))
    monkeypatch.setattr(dasktrain.preflight, "preflight", lambda config: checked)
    monkeypatch.setattr(dasktrain.config, "load_config", counted_load)
    # The app sets up logging and the workers' environment for its process: keep them to this test.
    monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))
    monkeypatch.setattr(logging.root, "level", logging.root.level)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setenv("DASK_LOGGING", "{}")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(DIGITS), "--set", f"output_dir={out}", "-s", "train.epochs=4",
                                      "--resume", "--until-epoch", "1"], terminal_width=200)
    assert result.exit_code == 0, result.output
    ((config, resume, until_epoch),) = calls
    assert config.output_dir == str(out) and config.train.epochs == 4 and resume and until_epoch == 1
    assert len(reads) == 1  # the YAML, read once
    assert dasktrain.flows.training.HANDED_PREFLIGHT is None  # handed for the run only
    text = result.output
    assert "2 worker(s), 3 steps per epoch" in text
    assert "epoch 1/4  train loss 1.5000  val loss 1.2500  val accuracy 50.0%" in text
    assert "workers changed" in text and "1 worker(s) from global step 2" in text
    assert "stopped after epoch 1 of 4 (global step 3)" in text
    assert f"--set=output_dir={out} --set=train.epochs=4 --resume" in text
    assert "model:" not in text
