"""An order-free check of the whole product: full-batch gradient descent through the real CLI.

Every global batch is the whole training set, so the sampling plan's order cannot matter: the
run must make exactly the updates a plain PyTorch loop over the whole array makes, whatever the
plan, the worker count or the reduction tree. The store is written by ``dasktrain ingest``, the
run is ``dasktrain run``, the expected weights come from a loop written here over the arrays read
with zarr, the learning rates from the documented schedule (``tests.reference``, pinned to hand
computed values below). Nothing from ``dasktrain`` (the ``pipeline/`` folder) is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
import zarr
from safetensors.torch import load_file

from tests.reference import build_model, learning_rate, max_relative_error

pytestmark = pytest.mark.timeout(240)

DASKTRAIN = Path(sys.executable).parent / "dasktrain"
SAMPLES, FEATURES, CLASSES, CHUNK = 300, 8, 3, 25  # 12 chunks
EPOCHS = 5  # one full-batch step per epoch
PEAK, MOMENTUM, WARMUP, MIN_LR = 0.2, 0.9, 2, 0.01
FACTORY, KWARGS = "dasktrain.models:mlp", {"in_features": FEATURES, "out_features": CLASSES, "hidden": [16]}
SEED = 5


def test_documented_schedule_at_named_steps() -> None:
    # warmup_cosine, peak 0.1, 4 warmup steps, min_lr 0.001, 11 steps: the cosine runs over
    # steps 4..10 (6 intervals), so step 7 is half way down.
    def lr(step: int) -> float:
        return learning_rate("warmup_cosine", 0.1, step, 11, warmup_steps=4, min_lr=0.001)

    assert lr(0) == pytest.approx(0.025, rel=1e-12)  # 0.1 * 1/4
    assert lr(1) == pytest.approx(0.05, rel=1e-12)  # 0.1 * 2/4
    assert lr(3) == pytest.approx(0.1, rel=1e-12)  # last warmup step: the peak
    assert lr(4) == pytest.approx(0.1, rel=1e-12)  # first cosine step: still the peak
    assert lr(5) == pytest.approx(0.0933682575, rel=1e-9)  # 0.001 + 0.099 * (1 + cos(pi/6)) / 2
    assert lr(7) == pytest.approx(0.0505, rel=1e-12)  # (0.1 + 0.001) / 2
    assert lr(10) == pytest.approx(0.001, rel=1e-12)  # the last step: min_lr
    assert learning_rate("constant", 0.1, 7, 11, warmup_steps=4, min_lr=0.001) == 0.1


def dasktrain(*args: object, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """The installed entry point as a subprocess, colours off (PREFECT_API_URL is inherited)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "COLUMNS")}
    env["NO_COLOR"] = "1"
    result = subprocess.run([str(DASKTRAIN), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"dasktrain {args[0]}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gaussian blobs, learnable in a few full-batch steps, written by ``dasktrain ingest``."""
    root = tmp_path_factory.mktemp("order-free")
    rng = np.random.default_rng(11)
    targets = rng.integers(0, CLASSES, size=SAMPLES).astype(np.int64)
    centers = rng.normal(size=(CLASSES, FEATURES))
    inputs = (centers[targets] + rng.normal(scale=0.7, size=(SAMPLES, FEATURES))).astype(np.float32)
    np.save(root / "x.npy", inputs)
    np.save(root / "y.npy", targets)
    path = root / "blobs.zarr"
    dasktrain("ingest", path, "--inputs", root / "x.npy", "--targets", root / "y.npy", "--chunk-size", CHUNK,
              cwd=root, timeout=120)
    return path


def full_batch_descent(store: Path) -> dict[str, torch.Tensor]:
    """The plain loop: every step the mean cross-entropy over the whole array, SGD with momentum."""
    group = zarr.open_group(str(store), mode="r")
    x = torch.from_numpy(np.asarray(group["inputs"][...])).float()
    y = torch.from_numpy(np.asarray(group["targets"][...])).long()
    model = build_model(FACTORY, KWARGS, SEED)
    optimizer = torch.optim.SGD(model.parameters(), lr=PEAK, momentum=MOMENTUM, foreach=False)
    for step in range(EPOCHS):
        for param_group in optimizer.param_groups:
            param_group["lr"] = learning_rate("warmup_cosine", PEAK, step, EPOCHS, WARMUP, MIN_LR)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("workers", [1, 2, 3], ids=lambda n: f"{n}workers")
def test_full_batch_descent_equals_plain_loop(store: Path, tmp_path: Path, workers: int) -> None:
    config = {
        "data": {"store": str(store)},
        "model": {"factory": FACTORY, "kwargs": KWARGS},
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "lr": PEAK, "momentum": MOMENTUM},
        "schedule": {"name": "warmup_cosine", "warmup_steps": WARMUP, "min_lr": MIN_LR},
        "train": {"epochs": EPOCHS, "batch_size": SAMPLES, "shards": 3, "seed": SEED, "fan_in": 2},
        "cluster": {"workers": 1, "dashboard": False},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "full-batch.yaml"
    path.write_text(yaml.safe_dump(config))
    dasktrain("run", path, "--set", f"cluster.workers={workers}", cwd=tmp_path, timeout=200)

    steps = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "step"]
    assert [r["global_step"] for r in steps] == list(range(EPOCHS))
    for r in steps:
        assert r["samples"] == SAMPLES, r
        expected = learning_rate("warmup_cosine", PEAK, r["global_step"], EPOCHS, WARMUP, MIN_LR)
        assert r["lr"] == pytest.approx(expected, rel=1e-9), r
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert max_relative_error(weights, full_batch_descent(store)) < 1e-5
