"""Experiment tracking: a real run on a real LocalCluster, recorded in MLflow (a SQLite tracking
store, MLflow 3's default kind) and TensorBoard, read back with MLflow's own client and
TensorBoard's own event reader, and compared with ``metrics.jsonl`` read as plain JSON lines."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client

from dasktrain import run_loop
from dasktrain.errors import ConfigError
from dasktrain.tracking import open_trackers
from tests.helpers import local_client, run_config

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with local_client(1) as c:
        yield c


def jsonl_records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The run's records of one kind, read the plain way."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


class Failing:
    """An observer of the test's own that raises at its first epoch record: the run must go on."""

    def __init__(self) -> None:
        self.steps = 0

    def started(self, event: dict[str, Any]) -> None: ...

    def step(self, record: dict[str, Any]) -> None:
        self.steps += 1

    def epoch(self, record: dict[str, Any]) -> None:
        raise RuntimeError("observer bug")

    def finished(self, event: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def test_mlflow_and_tensorboard_hold_the_runs_metrics(digits_store: Path, tmp_path: Path, client: Client,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tracked-run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = run_config(digits_store, out, data={"store": str(digits_store), "validation": {"fraction": 0.2}},
                        train={"epochs": 2, "batch_size": 200, "shards": 2, "seed": 1},
                        tracking={"mlflow": {"uri": uri, "experiment": "digits",
                                             "artifact_location": str(tmp_path / "artifacts")},
                                  "tensorboard": str(tmp_path / "tb")})
    assert config.digest() == config.model_copy(update={"tracking": type(config.tracking)()}).digest()

    # Epoch 0, then a resume to the end: one MLflow run, continued; TensorBoard's events of both calls.
    failing = Failing()
    with caplog.at_level(logging.WARNING, logger="dasktrain.tracking"):
        run_loop.train(config, client=client, until_epoch=1, observers=[failing])
    assert "Failing failed on a epoch record and is dropped" in caplog.text
    assert failing.steps == len(jsonl_records(out, "step")) > 0  # told every step up to its failure
    run_loop.train(config, client=client, resume=True)

    epochs = jsonl_records(out, "epoch")
    steps = jsonl_records(out, "step")
    assert [e["epoch"] for e in epochs] == [0, 1] and all("val_loss" in e for e in epochs)

    mlflow = MlflowClient(tracking_uri=uri)
    experiment = mlflow.get_experiment_by_name("digits")
    (run,) = mlflow.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked-run"
    assert run.data.params["train.batch_size"] == "200" and run.data.params["model.factory"] == "dasktrain.models:mlp"
    assert run.data.params["data.validation.fraction"] == "0.2"
    assert run.data.tags["dasktrain.config_digest"] == config.digest()

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in mlflow.get_metric_history(run.info.run_id, key))

    assert history("epoch/val_loss") == [(e["end_step"] - 1, e["val_loss"]) for e in epochs]
    assert history("epoch/val_accuracy") == [(e["end_step"] - 1, e["val_accuracy"]) for e in epochs]
    assert history("epoch/train_loss") == [(e["end_step"] - 1, e["train_loss"]) for e in epochs]
    assert history("step/loss") == [(s["global_step"], s["loss"]) for s in steps]
    assert history("step/lr") == [(s["global_step"], s["lr"]) for s in steps]
    assert not history("step/global_step") and not history("epoch/epoch")  # identifiers are not metrics

    artifacts = {a.path for a in mlflow.list_artifacts(run.info.run_id)}
    assert artifacts == {"config.yaml", "model.safetensors"}
    model = mlflow.download_artifacts(run.info.run_id, "model.safetensors", str(tmp_path / "download"))
    assert Path(model).read_bytes() == (out / "model.safetensors").read_bytes()

    board = EventAccumulator(str(tmp_path / "tb" / "tracked-run"))
    board.Reload()
    scalars = {tag: [(e.step, e.value) for e in board.Scalars(tag)] for tag in board.Tags()["scalars"]}
    # TensorBoard keeps scalars as float32.
    assert scalars["epoch/val_loss"] == [(e["end_step"] - 1, np.float32(e["val_loss"])) for e in epochs]
    assert scalars["step/loss"] == [(s["global_step"], np.float32(s["loss"])) for s in steps]


def test_a_missing_tracking_package_is_one_line_naming_the_extra(digits_store: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("mlflow", "mlflow.tracking", "mlflow.entities", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)  # what Python finds for a package not installed
    for tracking, key in (({"mlflow": {"uri": "sqlite:///x.db"}}, "tracking.mlflow"),
                          ({"tensorboard": str(tmp_path / "tb")}, "tracking.tensorboard")):
        config = run_config(digits_store, tmp_path / "run", tracking=tracking)
        with pytest.raises(ConfigError) as caught:
            open_trackers(config)
        message = str(caught.value)
        assert message.startswith(f"{key} is set, but ") and "\n" not in message
        assert message.endswith("pip install 'dasktrain[tracking]'")
    assert not (tmp_path / "tb").exists()


def test_an_unreachable_mlflow_server_is_one_line_at_once(digits_store: Path, tmp_path: Path) -> None:
    uri = "http://127.0.0.1:9"  # the discard port: nothing listens there
    config = run_config(digits_store, tmp_path / "run", tracking={"mlflow": {"uri": uri}})
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        open_trackers(config)
    assert time.monotonic() - started < 10  # not MLflow's own minutes of retries
    message = str(caught.value)
    assert message.startswith(f"tracking.mlflow.uri: {uri} cannot be reached (") and "\n" not in message
