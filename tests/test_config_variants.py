"""The options a user picks first, each held to the plain single-process loop (tests/reference.py).

Adam, Nesterov momentum, the MSE loss on a regression store, a separate validation store, and the
shipped BatchNorm CNN example (examples/digits-cnn.yaml as it is, on fewer epochs) all train on a
2-worker LocalCluster and must end within 1e-5 of the reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from dasktrain.config import load_config
from dasktrain.ingest import example_arrays, write_store
from dasktrain.metrics import read_metrics
from dasktrain.run_loop import train
from tests.helpers import local_client, plan_batches, plan_shard_batches, run_config, saved_weights
from tests.reference import build_model, max_relative_error, reference_weights

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def client():
    with local_client(2) as c:
        yield c


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    digits = example_arrays("digits")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    y = (x @ rng.normal(size=(8, 3)) + 0.1 * rng.normal(size=(400, 3))).astype(np.float32)
    return {
        "train": write_store(root / "train.zarr", {k: v[:1200] for k, v in digits.items()}, chunk_size=64),
        "val": write_store(root / "val.zarr", {k: v[1200:] for k, v in digits.items()}, chunk_size=64),
        "regression": write_store(root / "regression.zarr", {"inputs": x, "targets": y}, chunk_size=32),
        "image": write_store(root / "image.zarr", example_arrays("digits", image=True), chunk_size=64),
    }


VARIANTS = {
    "adam": {"optimizer": {"name": "adam", "lr": 0.003, "betas": [0.8, 0.99], "eps": 1e-7, "weight_decay": 1e-3}},
    "sgd-nesterov": {"optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True}},
    "mse": {"loss": "mse", "model": {"factory": "dasktrain.models:mlp", "kwargs": {
        "in_features": 8, "out_features": 3, "hidden": [16], "activation": "tanh"}}},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_equals_single_process(stores, client, tmp_path, variant):
    sections = VARIANTS[variant]
    store = stores["regression" if variant == "mse" else "train"]
    config = run_config(store, tmp_path / "run", train={"epochs": 2, "batch_size": 64, "shards": 4, "seed": 1},
                        **sections)
    result = train(config, client=client)
    assert result.completed
    assert max_relative_error(saved_weights(tmp_path / "run"), reference_weights(config, plan_batches(config))) < 1e-5


def test_validation_store_is_scored_whole_every_epoch(stores, client, tmp_path):
    config = run_config(stores["train"], tmp_path / "run", train={"epochs": 1, "batch_size": 100, "shards": 4},
                        data={"store": str(stores["train"]), "validation": {"store": str(stores["val"])}})
    result = train(config, client=client)
    weights = saved_weights(tmp_path / "run")
    assert max_relative_error(weights, reference_weights(config, plan_batches(config))) < 1e-5
    # The epoch's validation loss is the mean cross-entropy of the final weights over the whole store.
    group = zarr.open_group(str(stores["val"]), mode="r")
    x, y = torch.from_numpy(np.asarray(group["inputs"][:])).float(), torch.from_numpy(np.asarray(group["targets"][:]))
    model = build_model(config.model.factory, dict(config.model.kwargs), 0)
    model.load_state_dict(weights)
    with torch.no_grad():
        logits = model.eval()(x)
    (epoch,) = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "epoch"]
    assert epoch["val_samples"] == len(y) == result.epochs[0]["val_samples"]
    assert epoch["val_loss"] == pytest.approx(float(F.cross_entropy(logits, y.long())), rel=1e-5)
    assert epoch["val_accuracy"] == pytest.approx(float((logits.argmax(1) == y).float().mean()), abs=1e-9)


def test_shipped_cnn_example_equals_its_reference(stores, client, tmp_path):
    config = load_config(REPO / "examples" / "digits-cnn.yaml", [
        f"data.store={stores['image']}", f"output_dir={tmp_path / 'run'}", "train.epochs=2"])
    assert config.model.kwargs.get("batch_norm") is True
    result = train(config, client=client)
    assert result.completed and result.epochs[-1]["val_accuracy"] > 0.5
    expected = reference_weights(config, plan_shard_batches(config))
    assert max_relative_error(saved_weights(tmp_path / "run"), expected) < 1e-5
