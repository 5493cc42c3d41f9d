"""Worker-count invariance for models with randomness and running statistics.

Dropout masks are keyed by (seed, step, shard, piece), and BatchNorm's running statistics are
reduced with the gradients (pipeline/running_stats.py documents the policy), so deterministic
mode gives bitwise-equal weights *and buffers* on 1, 2 and 4 workers. The BatchNorm CNN is also
held to its own single-process reference, a plain PyTorch loop written here that applies the
documented policy shard by shard; it takes only the plan's sample indices from dasktrain.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from torch import nn

from pipeline.driver import train
from pipeline.ingest import example_arrays, write_store
from pipeline.preflight import build_plan, resolve_splits
from tests.helpers import local_client, run_config, saved_weights

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
            "factory": "pipeline.models:mlp",
            "kwargs": {"in_features": 64, "out_features": 10, "hidden": [32, 32], "dropout": 0.2}}),
        "cnn-batchnorm": run_config(image_store, out / "cnn", optimizer=ADAMW, train={**TRAIN, **train}, model={
            "factory": "pipeline.models:cnn", "kwargs": CNN_KWARGS}),
    }


def plain_cnn(seed: int) -> nn.Sequential:
    """pipeline.models:cnn(**CNN_KWARGS) written out: the same layers built in the same order."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def reference_cnn(store, shard_batches) -> dict[str, torch.Tensor]:
    """The documented policy in one process: per step, every shard's micro-batch runs forward from
    the step's starting statistics; gradients and statistic updates are summed weighted by samples
    and divided by the step's sample count; then AdamW steps with the constant lr."""
    group = zarr.open_group(str(store), mode="r")
    inputs, targets = np.asarray(group["inputs"][:]), np.asarray(group["targets"][:])
    model = plain_cnn(TRAIN["seed"])
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    opt = torch.optim.AdamW(model.parameters(), lr=ADAMW["lr"], weight_decay=ADAMW["weight_decay"])
    model.train()
    for shards in shard_batches:
        start = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
        tracked = [int(m.num_batches_tracked) for m in norms]
        update = [(torch.zeros_like(a), torch.zeros_like(b)) for a, b in start]
        opt.zero_grad()
        count = 0
        for idx in shards:
            if len(idx) == 0:
                continue
            for m, (mean, var) in zip(norms, start):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
            out = model(torch.from_numpy(inputs[idx]).float())
            F.cross_entropy(out, torch.from_numpy(targets[idx]).long(), reduction="sum").backward()
            for m, (mean, var), (du_mean, du_var) in zip(norms, start, update):
                du_mean += len(idx) * (m.running_mean - mean)
                du_var += len(idx) * (m.running_var - var)
            count += len(idx)
        for p in model.parameters():
            p.grad /= count
        for m, (mean, var), (du_mean, du_var) in zip(norms, start, update):
            m.running_mean.copy_(mean + du_mean / count)
            m.running_var.copy_(var + du_var / count)
        for m, n in zip(norms, tracked):
            m.num_batches_tracked.fill_(n + 1)  # one step, however many micro-batches
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def shard_batches_of(config) -> list[list[np.ndarray]]:
    """Per step, per shard: the sample indices of the plan (dasktrain's public plan API)."""
    plan = build_plan(config, resolve_splits(config))
    out = []
    for t in range(config.train.epochs * plan.steps_per_epoch):
        epoch, k = plan.locate(t)
        ep = plan.epoch(epoch)
        out.append([ep.samples_of(k, s) for s in range(config.train.shards)])
    return out


def relative_error(a, b) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-12))
               for k in a)


def test_dropout_and_batchnorm_are_bitwise_equal_for_1_2_and_4_workers(digits_store, image_store, tmp_path):
    weights: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    fast: dict[str, torch.Tensor] = {}
    for workers in (1, 2, 4):
        runs = configs(digits_store, image_store, tmp_path / f"w{workers}")
        with local_client(workers) as client:
            for config in runs.values():
                train(config, client=client)
            if workers == 2:  # fast mode: shard-wise forward units too, same sums up to rounding
                fast_config = configs(digits_store, image_store, tmp_path / "fast", deterministic=False)["cnn-batchnorm"]
                train(fast_config, client=client)
                fast = saved_weights(tmp_path / "fast" / "cnn")
        weights[workers] = {name: saved_weights(c.output_dir) for name, c in runs.items()}
    for name in ("mlp-dropout", "cnn-batchnorm"):
        for workers in (2, 4):
            for key, value in weights[1][name].items():
                assert torch.equal(weights[workers][name][key], value), (name, workers, key)
    cnn = weights[1]["cnn-batchnorm"]
    assert float(cnn["1.running_mean"].abs().max()) > 0.01  # the statistics did move, and were saved
    assert int(cnn["1.num_batches_tracked"]) == 29  # one per step: 1797 samples, batch 64
    expected = reference_cnn(image_store, shard_batches_of(configs(digits_store, image_store, tmp_path)["cnn-batchnorm"]))
    assert relative_error(cnn, expected) < 1e-5
    assert relative_error(fast, expected) < 1e-5
