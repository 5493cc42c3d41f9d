"""Worker-count invariance for models with randomness and running statistics.

Dropout masks are keyed by (seed, step, shard, piece), and BatchNorm's running statistics are
reduced with the gradients (pipeline/running_stats.py documents the policy), so deterministic
mode gives bitwise-equal weights *and buffers* on 1, 2 and 4 workers. The BatchNorm CNN is also
held (fast mode and ``reduce: collective`` too) to its own single-process reference
(tests/reference.py), a plain PyTorch loop that applies the documented policy shard by shard; it
takes only the plan's sample indices from dasktrain. A run that validates between epochs draws
dropout masks again afterwards, bitwise as a run resumed from the first epoch's checkpoint does.
"""

from __future__ import annotations

import pytest
import torch

from dasktrain.ingest import example_arrays, write_store
from dasktrain.run_loop import train
from tests.helpers import local_client, plan_shard_batches, run_config, saved_weights
from tests.reference import max_relative_error, reference_weights

pytestmark = pytest.mark.timeout(300)

ADAMW = {"name": "adamw", "lr": 0.01, "weight_decay": 0.01}
TRAIN = {"epochs": 1, "batch_size": 64, "shards": 4, "seed": 3, "deterministic": True}
CNN_KWARGS = {"in_channels": 1, "num_classes": 10, "image_size": 8, "channels": [8, 16], "hidden": 32,
              "batch_norm": True}


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("data") / "digits-image.zarr", example_arrays("digits", image=True),
                       chunk_size=64)


def configs(digits_store, image_store, out, **train):
    return {
        "mlp-dropout": run_config(digits_store, out / "mlp", optimizer=ADAMW, train={**TRAIN, **train}, model={
            "factory": "dasktrain.models:mlp",
            "kwargs": {"in_features": 64, "out_features": 10, "hidden": [32, 32], "dropout": 0.2}}),
        "cnn-batchnorm": run_config(image_store, out / "cnn", optimizer=ADAMW, train={**TRAIN, **train}, model={
            "factory": "dasktrain.models:cnn", "kwargs": CNN_KWARGS}),
    }


def test_dropout_and_batchnorm_are_bitwise_equal_for_1_2_and_4_workers(digits_store, image_store, tmp_path):
    weights: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    fast: dict[str, torch.Tensor] = {}
    collective: dict[float, dict[str, torch.Tensor]] = {}
    after_validation: dict[str, dict[str, torch.Tensor]] = {}
    for workers in (1, 2, 4):
        runs = configs(digits_store, image_store, tmp_path / f"w{workers}")
        with local_client(workers) as client:
            for config in runs.values():
                train(config, client=client)
            if workers == 2:  # fast mode: shard-wise forward units too, same sums up to rounding
                fast_config = configs(digits_store, image_store, tmp_path / "fast", deterministic=False)["cnn-batchnorm"]
                train(fast_config, client=client)
                fast = saved_weights(tmp_path / "fast" / "cnn")
                # The collective sums the running statistics with the gradients too: in the one
                # bucket of this small model, and after many buckets of one parameter each.
                # Dropout over two epochs with a validation between them: a run that goes on after
                # validating trains its second epoch as one resumed from the first epoch's
                # checkpoint, which starts on a fresh replica: with its dropout masks, bitwise.
                for name, parts in (("straight", [None]), ("resumed", [1, None])):
                    validated = run_config(digits_store, tmp_path / name, optimizer=ADAMW, train={
                        **TRAIN, "epochs": 2, "deterministic": False}, data={"validation": {"fraction": 0.2}},
                        model=configs(digits_store, image_store, tmp_path)["mlp-dropout"].model.model_dump())
                    for i, until in enumerate(parts):
                        result = train(validated, client=client, resume=i > 0, until_epoch=until)
                        assert result.epochs and result.epochs[-1]["val_samples"] > 0
                    after_validation[name] = saved_weights(tmp_path / name)
                for bucket_mb in (25.0, 1e-4):
                    out = tmp_path / f"collective-{bucket_mb}"
                    train(configs(digits_store, image_store, out, deterministic=False, reduce="collective",
                                  bucket_mb=bucket_mb)["cnn-batchnorm"], client=client)
                    collective[bucket_mb] = saved_weights(out / "cnn")
        weights[workers] = {name: saved_weights(c.output_dir) for name, c in runs.items()}
    for name in ("mlp-dropout", "cnn-batchnorm"):
        for workers in (2, 4):
            for key, value in weights[1][name].items():
                assert torch.equal(weights[workers][name][key], value), (name, workers, key)
    cnn = weights[1]["cnn-batchnorm"]
    assert float(cnn["1.running_mean"].abs().max()) > 0.01  # the statistics did move, and were saved
    assert int(cnn["1.num_batches_tracked"]) == 29  # one per step: 1797 samples, batch 64
    cnn_config = configs(digits_store, image_store, tmp_path)["cnn-batchnorm"]
    expected = reference_weights(cnn_config, plan_shard_batches(cnn_config))
    assert max_relative_error(cnn, expected) < 1e-5
    assert max_relative_error(fast, expected) < 1e-5
    assert after_validation["straight"].keys() == after_validation["resumed"].keys()
    for key, value in after_validation["straight"].items():
        assert torch.equal(value, after_validation["resumed"][key]), key
    for bucket_mb, summed in collective.items():
        assert max_relative_error(summed, expected) < 1e-5, bucket_mb
        assert torch.equal(summed["1.num_batches_tracked"], cnn["1.num_batches_tracked"]), bucket_mb
