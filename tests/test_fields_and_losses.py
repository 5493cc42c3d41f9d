"""Batches of several arrays (``data.fields``) and the loss kinds beyond the built-ins: ``loss:
model`` (the model's output carries the loss) and ``loss: module:callable`` (per-sample losses of
the user's own). Each trains on a real LocalCluster of 2 worker processes and is held to a plain
PyTorch loop written here, over the same global batches, within 1e-5; bad input is one line.

The user's code is in tests/user_models.py, plain torch, as a user would write it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
import zarr

from dasktrain import report
from dasktrain.config import validate_config
from dasktrain.errors import DasktrainError, DataError, ShapeMismatchError
from dasktrain.inference import evaluate, evaluation_split
from dasktrain.ingest import write_store
from dasktrain.metrics import read_metrics
from dasktrain.preflight import preflight, resolve_splits
from dasktrain.run_loop import train
from tests.helpers import local_client, plan_batches, run_config, saved_weights
from tests.reference import max_relative_error
from tests.test_cli import dasktrain, error_line
from tests.user_models import TwoInputs

pytestmark = pytest.mark.timeout(180)

SAMPLES, CLASSES = 300, 3
KWARGS = {"a_features": 4, "b_features": 3, "classes": CLASSES}
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three arrays: two sets of features, ``a`` and ``b``, each with part of the signal, and labels ``y``."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, CLASSES, size=SAMPLES)
    a = (rng.normal(size=(CLASSES, 4))[y] + rng.normal(scale=0.8, size=(SAMPLES, 4))).astype(np.float32)
    b = (rng.normal(size=(CLASSES, 3))[y] + rng.normal(scale=0.8, size=(SAMPLES, 3))).astype(np.float32)
    return write_store(tmp_path_factory.mktemp("data") / "three.zarr", {"a": a, "b": b, "y": y.astype(np.int64)},
                       chunk_size=25)


@pytest.fixture(scope="module")
def client():
    with local_client(2) as c:
        yield c


def fields_config(store: Path, out: Path, loss: str = "cross_entropy", returns_loss: bool = False,
                  fields: dict[str, str] | list[str] | None = None):
    return run_config(store, out, loss=loss, optimizer=SGD,
                      data={"fields": fields or {"a": "a", "b": "b"}, "targets": "y"},
                      model={"factory": "tests.user_models:two_inputs", "kwargs": {**KWARGS, "returns_loss": returns_loss}},
                      train={"epochs": 2, "batch_size": 40, "shards": 4, "seed": 3})


def plain_loop(config, batch_loss) -> dict[str, torch.Tensor]:
    """One process: SGD with momentum over the plan's global batches, ``batch_loss(model, a, b, y)``
    the mean over each batch."""
    group = zarr.open_group(str(config.data.store), mode="r")
    a, b, y = (torch.from_numpy(np.asarray(group[name][...])) for name in ("a", "b", "y"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)  # as every dasktrain process builds its model
        model = TwoInputs(**config.model.kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD["lr"], momentum=SGD["momentum"], foreach=False)
    for indices in plan_batches(config):
        rows = torch.from_numpy(indices)
        optimizer.zero_grad()
        batch_loss(model, a[rows], b[rows], y[rows]).backward()
        optimizer.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_dict_batch_of_three_arrays_equals_plain_loop(store, client, tmp_path):
    config = fields_config(store, tmp_path / "run")
    assert train(config, client=client).completed
    expected = plain_loop(config, lambda m, a, b, y: F.cross_entropy(m(a=a, b=b), y))
    assert max_relative_error(saved_weights(tmp_path / "run"), expected) < 1e-5


def test_positional_fields_equal_keyword_fields(store, client, tmp_path):
    config = fields_config(store, tmp_path / "run", fields=["a", "b"])  # model(a_rows, b_rows)
    train(config, client=client)
    expected = plain_loop(config, lambda m, a, b, y: F.cross_entropy(m(a, b), y))
    assert max_relative_error(saved_weights(tmp_path / "run"), expected) < 1e-5


def test_loss_from_the_model_equals_plain_loop(store, client, tmp_path):
    # The labels reach the model as a field; the model's mean loss times the samples joins the sum.
    config = fields_config(store, tmp_path / "run", loss="model", returns_loss=True,
                           fields={"a": "a", "b": "b", "labels": "y"})
    train(config, client=client)
    expected = plain_loop(config, lambda m, a, b, y: m(a, b, labels=y)["loss"])
    assert max_relative_error(saved_weights(tmp_path / "run"), expected) < 1e-5


def test_users_own_per_sample_loss_equals_plain_loop(store, client, tmp_path):
    config = fields_config(store, tmp_path / "run", loss="tests.user_models:weighted_cross_entropy")
    train(config, client=client)
    expected = plain_loop(config, lambda m, a, b, y: (F.cross_entropy(m(a, b), y, reduction="none")
                                                      * (1.0 + y.float() / 2.0)).mean())
    assert max_relative_error(saved_weights(tmp_path / "run"), expected) < 1e-5


def test_a_loss_of_the_wrong_shape_is_named(store, client, tmp_path):
    config = fields_config(store, tmp_path / "run", loss="tests.user_models:batch_mean_loss")
    with pytest.raises(DasktrainError, match=r"loss tests\.user_models:batch_mean_loss returned shape \(\) for a "
                                             r"batch of \d+ samples; it must return one loss per sample"):
        train(config, client=client)


def test_loss_model_with_a_model_that_returns_no_loss_is_named(store, tmp_path):
    config = fields_config(store, tmp_path / "run", loss="model", fields={"a": "a", "b": "b", "labels": "y"})
    with pytest.raises(ShapeMismatchError, match=r"loss: model needs the model to return its loss .* it returned "
                                                 r"a tensor of shape \(2, 3\)"):
        preflight(config)


def test_arrays_of_different_lengths_are_named(tmp_path):
    short = write_store(tmp_path / "short.zarr", {"a": np.zeros((10, 4), np.float32), "y": np.zeros(10, np.int64)},
                        chunk_size=5)
    group = zarr.open_group(str(short), mode="r+")
    group.create_array("b", shape=(9, 3), chunks=(5, 3), dtype="float32")
    config = fields_config(short, tmp_path / "run")
    with pytest.raises(DataError, match=r"arrays in store .*short\.zarr differ in length: 'a' has 10 samples, "
                                        r"'b' has 9"):
        preflight(config)


def test_a_field_not_in_the_store_is_one_line(store, tmp_path):
    config = fields_config(store, tmp_path / "run", fields={"a": "a", "b": "c"}).model_dump(mode="json")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    line = error_line(dasktrain("run", path))
    assert "has no array 'c'" in line and "three.zarr" in line and "'a'" in line  # names the arrays present


# -- metrics of the user's own ---------------------------------------------------------------------

def metrics_config(store: Path, out: Path, *metrics: str, **train_keys: object):
    config = fields_config(store, out).model_dump(mode="json")
    config["data"]["validation"] = {"fraction": 0.25}
    config["metrics"] = list(metrics)
    config["train"].update(train_keys)
    return validate_config(config)


def top2_of_final_weights(config) -> float:
    """Top-2 accuracy of the saved model on the validation rows, computed here with torch."""
    group = zarr.open_group(str(config.data.store), mode="r")
    splits = resolve_splits(config)
    rows = np.concatenate([np.arange(c.start, c.stop) for c in splits.val_chunks])
    a, b, y = (torch.from_numpy(np.asarray(group[name][...])[rows]) for name in ("a", "b", "y"))
    model = TwoInputs(**config.model.kwargs)
    model.load_state_dict(saved_weights(config.output_dir))
    with torch.no_grad():
        return float((model(a, b).topk(2, dim=1).indices == y.unsqueeze(1)).any(dim=1).double().mean())


@pytest.mark.parametrize("reduce", ["tree", "collective"])
def test_own_metric_is_reduced_over_workers_into_the_epoch_records(store, client, tmp_path, reduce):
    config = metrics_config(store, tmp_path / "run", "tests.user_models:top2_hits", reduce=reduce)
    train(config, client=client)
    epochs = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "epoch"]
    assert all("val_top2_hits" in r for r in epochs), epochs
    expected = top2_of_final_weights(config)
    assert 0.0 < expected < 1.0
    assert epochs[-1]["val_top2_hits"] == pytest.approx(expected, abs=1e-12)
    assert [r["val_top2_hits"] for r in report.epoch_table(tmp_path / "run")][-1] == pytest.approx(expected, abs=1e-4)
    scored = evaluate(client, config, tmp_path / "run", evaluation_split(config))  # the flow's evaluate stage
    assert scored["split"] == "validation" and scored["top2_hits"] == pytest.approx(expected, abs=1e-12)


def test_a_metric_that_raises_is_named(store, client, tmp_path):
    config = metrics_config(store, tmp_path / "run", "tests.user_models:broken_metric")
    with pytest.raises(DasktrainError, match=r"metric tests\.user_models:broken_metric failed on a batch of \d+ "
                                             r"samples: KeyError: 'labels'"):
        train(config, client=client)
