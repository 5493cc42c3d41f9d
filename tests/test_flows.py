"""The Prefect training flow on a real Prefect engine (the test harness's local server) and real
LocalClusters: stages, artifacts, a retried train stage, and bad input."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest
import torch
import zarr
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from dasktrain import run_loop
from dasktrain.errors import ConfigError, ShapeMismatchError
from dasktrain.flows import PrefectAPIError
from dasktrain.flows.training import run_training, training_flow
from dasktrain.ingest import example_arrays, write_store
from dasktrain.preflight import resolve_splits
from dasktrain.store import ATTRS_KEY
from tests.helpers import local_client, run_config, saved_weights

pytestmark = pytest.mark.timeout(180)

STAGES = ("prepare", "train", "evaluate", "publish")
ROOT = Path(__file__).resolve().parents[1]


def dasktrain(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a subprocess from the repository root, colours off."""
    env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dasktrain.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=150)


@pytest.fixture(scope="module", autouse=True)
def prefect_harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    # Its own store (not the session's digits_store): the prepare stage writes normalisation
    # statistics into the store's attributes.
    return write_store(tmp_path_factory.mktemp("data") / "digits.zarr", example_arrays("digits"), chunk_size=64)


def task_runs(flow_run_id: UUID) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r for r in runs}


def artifacts(flow_run_id: UUID) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def run_log_lines(flow_run_id: UUID, prefix: str, expected: int, timeout_s: float = 30) -> list[str]:
    """The flow run's log messages starting with ``prefix``, once ``expected`` of them reached the
    server (Prefect sends logs in batches, from a background thread) or ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            lines = [log.message for log in logs if log.message.startswith(prefix)]
            if len(lines) >= expected or time.monotonic() > deadline:
                return lines
            time.sleep(0.5)


def test_flow_end_to_end(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "digits-run"
    config = run_config(store, out, data={"store": str(store), "validation": {"fraction": 0.2}, "normalize": True})
    state = training_flow(config.model_dump(mode="json"), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    flow_run_id = state.state_details.flow_run_id

    runs = task_runs(flow_run_id)
    assert sorted(runs) == sorted(STAGES)
    assert all(runs[s].state.is_completed() for s in STAGES), {s: runs[s].state for s in STAGES}

    # Live progress: a line per epoch in the run's logs, and a progress artifact that reached 100.
    epoch_lines = run_log_lines(flow_run_id, "epoch ", 2)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val_losses = [r["val_loss"] for r in records if r["kind"] == "epoch"]
    assert len(epoch_lines) == 2 and [line.split(":")[0] for line in epoch_lines] == ["epoch 1/2", "epoch 2/2"]
    assert all(f"val loss {v:.4g}," in line for line, v in zip(epoch_lines, val_losses, strict=True)), epoch_lines

    # Keys from the output directory's name (no deployment): the same for every run into it.
    found = {a.key: a for a in artifacts(flow_run_id)}
    assert set(found) == {f"dasktrain-digits-run-{kind}" for kind in ("summary", "epochs", "curves", "progress")}
    found = {a.key.rpartition("-")[2]: a for a in found.values()}
    assert found["progress"].type == "progress" and float(found["progress"].data) == 100.0
    curves = found["curves"].data
    assert curves.startswith("![loss and accuracy curves](data:image/png;base64,") and curves.endswith(")")
    assert base64.b64decode(curves.split(",", 1)[1][:-1]) == (out / "curves.png").read_bytes()
    markdown = found["summary"].data
    assert config.digest() in markdown and str(store) in markdown and "1797 samples" in markdown
    assert "| workers | 2 |" in markdown and "| epochs | 2 of 2" in markdown
    assert str(out.resolve()) in markdown and "curves.png" in markdown and "validation accuracy" in markdown
    table = found["epochs"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert [row["epoch"] for row in table] == [0, 1] and all("val_accuracy" in row for row in table)

    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "model.safetensors").is_file()
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["split"] == "validation" and evaluation["accuracy"] > 0.8, evaluation
    assert summary["evaluation"]["accuracy"] == evaluation["accuracy"]

    predictions = zarr.open_group(str(out / "predictions.zarr"), mode="r")
    assert predictions["predictions"].shape == (1797, 10) and predictions["predictions"].chunks == (64, 10)
    labels = np.asarray(predictions["labels"][:])
    assert (labels == example_arrays("digits")["targets"]).mean() > 0.8

    stats = zarr.open_group(str(store), mode="r").attrs[ATTRS_KEY]["normalization"]
    assert stats["array"] == "inputs" and len(stats["mean"]) == 64 and stats["chunks"] == summary["train_chunks"]
    inputs = example_arrays("digits")["inputs"]
    train_rows = np.concatenate([inputs[c.start : c.stop] for c in resolve_splits(config).train_chunks])
    assert np.allclose(stats["mean"], train_rows.mean(axis=0), atol=1e-6)
    assert np.allclose(stats["std"], train_rows.std(axis=0, dtype=np.float64), atol=1e-6)

    # The same PNG without Prefect; batch inference from the CLI gives the flow's predictions.
    (out / "curves.png").unlink()
    done = dasktrain("report", out)
    assert done.returncode == 0 and "curves:" in done.stdout, done.stderr
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "run.yaml").write_text(config.to_yaml())
    done = dasktrain("predict", tmp_path / "run.yaml", "--checkpoint", out, "--input", store,
                     "--output", tmp_path / "again.zarr", "--set", "cluster.workers=1")
    assert done.returncode == 0, done.stdout + done.stderr
    again = zarr.open_group(str(tmp_path / "again.zarr"), mode="r")
    assert np.array_equal(np.asarray(again["labels"][:]), labels)
    assert np.allclose(np.asarray(again["predictions"][:]), np.asarray(predictions["predictions"][:]), atol=1e-5)


def test_train_stage_retried_resumes_from_its_checkpoint(store: Path, tmp_path: Path) -> None:
    flag = tmp_path / "fault.flag"

    def config_for(out: Path):
        # 36 steps per epoch; each worker fails at its 45th training forward pass (global step 44,
        # in epoch 1) while the flag is armed: after the epoch-0 checkpoint at step 36.
        return run_config(store, out, train={"epochs": 2, "batch_size": 50, "shards": 6, "seed": 3, "ledger": True},
                          model={"factory": "tests.faulty:faulty_mlp",
                                 "kwargs": {"flag": str(flag), "after": 45, "in_features": 64, "out_features": 10,
                                            "hidden": [32]}})

    with local_client(2) as client:
        run_loop.train(config_for(tmp_path / "clean"), client=client)

    flag.write_text("armed")
    faulty = config_for(tmp_path / "faulty")
    state = training_flow(faulty.model_dump(mode="json"), return_state=True)
    assert state.is_completed(), state.message
    assert not flag.exists() and Path(f"{flag}.fired").exists(), "the fault never fired"
    train_run = task_runs(state.state_details.flow_run_id)["train"]
    assert train_run.run_count == 2 and train_run.state.is_completed()

    clean, resumed = saved_weights(tmp_path / "clean"), saved_weights(tmp_path / "faulty")
    assert clean.keys() == resumed.keys()
    for key in clean:
        assert torch.equal(clean[key], resumed[key]), key

    # Every (step, shard) of epoch 0, finished before the fault, was computed once over both tries;
    # steps of epoch 1 before the fault were computed again after the resume from step 36.
    computed: Counter[tuple[int, int]] = Counter()
    for path in (tmp_path / "faulty" / "ledger").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            computed[(entry["step"], entry["shard"])] += 1
    assert {n for (step, _), n in computed.items() if step < 36} == {1}
    assert len([key for key in computed if key[0] < 36]) == 36 * 6
    assert any(n > 1 for (step, _), n in computed.items() if step >= 36)


def test_cluster_is_closed_when_a_stage_fails(tmp_path: Path) -> None:
    from distributed.deploy.spec import SpecCluster

    arrays = example_arrays("digits")
    arrays["inputs"][:] = np.nan  # the first step's loss is NaN: the train stage fails, not retried
    nan_store = write_store(tmp_path / "nan.zarr", arrays, chunk_size=64)
    state = training_flow(run_config(nan_store, tmp_path / "run").model_dump(mode="json"), return_state=True)
    assert state.is_failed() and "loss is nan" in (state.message or ""), state.message
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["train"].state.is_failed() and runs["train"].run_count == 1
    assert "evaluate" not in runs and "publish" not in runs
    # The flow's LocalCluster was closed in its finally: no cluster object of this process is running.
    assert all(c.status.name == "closed" for c in list(SpecCluster._instances)), list(SpecCluster._instances)


def test_label_out_of_range_fails_once_not_retried(tmp_path: Path) -> None:
    arrays = example_arrays("digits")
    arrays["targets"][5] = 12  # the model has 10 outputs: an error in the data, which a retry repeats
    bad = write_store(tmp_path / "labels.zarr", arrays, chunk_size=64)
    state = training_flow(run_config(bad, tmp_path / "run", train={"epochs": 1, "batch_size": 1797, "shards": 2})
                          .model_dump(mode="json"), return_state=True)
    assert state.is_failed() and "out of bounds" in (state.message or ""), state.message
    train_run = task_runs(state.state_details.flow_run_id)["train"]
    assert train_run.state.is_failed() and train_run.run_count == 1


@pytest.mark.parametrize(
    ("update", "error", "fragment"),
    [
        ({"model": {"factory": "dasktrain.models:mlp", "kwargs": {"in_features": 65, "out_features": 10}}},
         ShapeMismatchError, "(64,)"),
        ({"train": {"bogus": 1}}, ConfigError, "unknown key 'train.bogus'"),
    ],
)
def test_bad_config_fails_at_prepare_with_the_message(store: Path, tmp_path: Path, update, error, fragment) -> None:
    raw = run_config(store, tmp_path / "run").model_dump(mode="json")
    for section, values in update.items():
        raw[section] = {**raw[section], **values}
    with pytest.raises(error, match=None) as caught:
        training_flow(raw)
    assert fragment in str(caught.value)
    state = training_flow(raw, return_state=True)
    assert state.is_failed() and fragment in (state.message or "")
    runs = task_runs(state.state_details.flow_run_id)
    assert list(runs) == ["prepare"] and runs["prepare"].state.is_failed()
    assert fragment in (runs["prepare"].state.message or "")
    assert not (tmp_path / "run").exists()


def test_unreachable_api_url_is_named(store: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(run_config(store, tmp_path / "run").to_yaml())
    url = "http://127.0.0.1:9/api"
    with temporary_settings(updates={PREFECT_API_URL: url}):
        with pytest.raises(PrefectAPIError, match="PREFECT_API_URL=http://127.0.0.1:9/api cannot be reached"):
            run_training(config)
    assert not (tmp_path / "run").exists()
    done = dasktrain("run", config, env={"PREFECT_API_URL": url})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert f"PREFECT_API_URL={url} cannot be reached" in line
