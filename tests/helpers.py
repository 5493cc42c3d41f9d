"""Small builders shared by the tests: configs, stores and clusters."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client, LocalCluster
from safetensors.torch import load_file

from dasktrain.config import RunConfig, validate_config
from dasktrain.ingest import write_store
from dasktrain.preflight import build_plan, resolve_splits


def run_config(store: Path | str, out: Path | str, **sections: dict[str, Any]) -> RunConfig:
    """A small MLP config on ``store``; ``sections`` update the defaults section by section."""
    raw: dict[str, Any] = {
        "data": {"store": str(store)},
        "model": {"factory": "dasktrain.models:mlp",
                  "kwargs": {"in_features": 64, "out_features": 10, "hidden": [32]}},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"epochs": 2, "batch_size": 50, "shards": 6, "seed": 3},
        "cluster": {"workers": 2, "dashboard": False},
        "checkpoint": {"every_steps": 0, "keep": 3},
        "output_dir": str(out),
    }
    for name, update in sections.items():
        raw[name] = {**raw.get(name, {}), **update} if isinstance(update, dict) else update
    return validate_config(raw)


def synthetic_store(path: Path, samples: int, features: int, classes: int, chunk: int, seed: int = 0) -> Path:
    """A classification store of Gaussian blobs: learnable, and any size."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, classes, size=samples)
    centers = rng.normal(size=(classes, features)).astype(np.float32)
    inputs = centers[targets] + rng.normal(scale=0.5, size=(samples, features)).astype(np.float32)
    return write_store(path, {"inputs": inputs.astype(np.float32), "targets": targets.astype(np.int64)}, chunk_size=chunk)


@contextmanager
def local_client(workers: int, threads: int = 1) -> Iterator[Client]:
    """A real LocalCluster of worker processes (dashboard off) and its client."""
    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0",
                      scheduler_kwargs={"dashboard": False}, memory_limit="2GiB") as cluster, Client(cluster) as client:
        client.wait_for_workers(workers, timeout=60)
        yield client


def plan_batches(config: RunConfig) -> list[np.ndarray]:
    """Store sample indices of every global batch of the run, step by step, from the public plan API."""
    plan = build_plan(config, resolve_splits(config))
    return [plan.epoch(e).global_batch(k) for e in range(config.train.epochs) for k in range(plan.steps_per_epoch)]


def plan_shard_batches(config: RunConfig) -> list[list[np.ndarray]]:
    """Per global step, per shard: the store sample indices the plan gives that shard (public plan API)."""
    plan = build_plan(config, resolve_splits(config))
    return [[plan.epoch(e).samples_of(k, s) for s in range(config.train.shards)]
            for e in range(config.train.epochs) for k in range(plan.steps_per_epoch)]


def saved_weights(run_dir: Path | str) -> dict[str, Any]:
    return load_file(str(Path(run_dir) / "model.safetensors"))
