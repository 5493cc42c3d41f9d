"""A reduction tree of several levels, end to end, on real worker processes.

With ``train.fan_in: 2`` and 5 or 6 leaves the tree has inner ``combine`` tasks (pipeline/reduce.py)
that sum other ``combine`` tasks, below the root the workers form themselves. Fast mode (leaves =
workers, 5 worker processes) and deterministic mode (leaves = 6 shards, on 3, 2 and 1 workers)
must both learn what a plain single-process PyTorch loop, written here, learns from the same
global batches.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from distributed import Client, get_task_stream
from torch import nn

from dasktrain.preflight import build_plan, resolve_splits
from dasktrain.run_loop import train
from tests.helpers import local_client, run_config, saved_weights

pytestmark = pytest.mark.timeout(300)

SEED, LR, MOMENTUM, WEIGHT_DECAY = 3, 0.05, 0.9, 1e-4
EPOCHS, BATCH, SHARDS = 2, 256, 6  # 1797 digits: 8 steps per epoch, the last one of 5 samples
SUM_KEY = re.compile(r"-sum-(\d+)\.(\d+)$")


def tree_config(store, out, **train_options):
    return run_config(
        store, out, optimizer={"name": "sgd", "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY},
        train={"epochs": EPOCHS, "batch_size": BATCH, "shards": SHARDS, "seed": SEED, "fan_in": 2, **train_options},
    )


def plain_loop(config, store) -> dict[str, torch.Tensor]:
    """One process, one model, the global batches of the plan: no code of dasktrain's but the plan's indices."""
    plan = build_plan(config, resolve_splits(config))
    group = zarr.open_group(str(store), mode="r")
    inputs = torch.from_numpy(np.asarray(group["inputs"][:], dtype=np.float32))
    targets = torch.from_numpy(np.asarray(group["targets"][:], dtype=np.int64))
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    for epoch in range(EPOCHS):
        for k in range(plan.steps_per_epoch):
            idx = torch.from_numpy(np.asarray(plan.epoch(epoch).global_batch(k), dtype=np.int64))
            optimizer.zero_grad()
            F.cross_entropy(model(inputs[idx]), targets[idx], reduction="mean").backward()
            optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def relative_error(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert sorted(got) == sorted(expected)
    return max(float((got[k] - expected[k]).abs().max() / expected[k].abs().max()) for k in expected)


def train_and_trace(config, client: Client) -> tuple[dict[str, torch.Tensor], set[tuple[int, int]]]:
    """Train; return the weights and the tree nodes summed by Dask tasks in the first step."""
    with get_task_stream(client=client) as stream:
        result = train(config, client=client)
    assert result.completed and result.steps == EPOCHS * 8
    nodes = set()
    for record in stream.data:
        key = str(record["key"])
        found = SUM_KEY.search(key)
        if found and "-g0-0-sum-" in key:
            nodes.add((int(found.group(1)), int(found.group(2))))
    return saved_weights(config.output_dir), nodes


def scale_to(client: Client, workers: int) -> None:
    client.cluster.scale(workers)
    deadline = time.monotonic() + 60
    while len(client.nthreads()) != workers:
        assert time.monotonic() < deadline, f"the cluster did not shrink to {workers} workers: {client.nthreads()}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def client():
    with local_client(5) as c:
        yield c


def test_fast_mode_five_workers_fan_in_two_equals_plain_loop(digits_store, client, tmp_path):
    assert len(client.nthreads()) == 5
    config = tree_config(digits_store, tmp_path / "run")
    weights, nodes = train_and_trace(config, client)
    # 5 leaves, fan-in 2: level 1 sums leaves (0, 1) and (2, 3), level 2 sums those two sums.
    assert {(1, 0), (1, 1), (2, 0)} <= nodes, nodes
    assert relative_error(weights, plain_loop(config, digits_store)) < 1e-5


def test_deterministic_mode_six_shards_fan_in_two_bitwise_for_3_2_1_workers(digits_store, client, tmp_path):
    config = tree_config(digits_store, tmp_path / "run", deterministic=True)
    weights, nodes = {}, {}
    for workers in (3, 2, 1):  # shrink the module's cluster: no new processes to start
        scale_to(client, workers)
        run = config.model_copy(update={"output_dir": str(tmp_path / f"w{workers}")})
        weights[workers], nodes[workers] = train_and_trace(run, client)
    # 6 shard leaves, fan-in 2: on 3 workers (shards 0-1, 2-3, 4-5) a task sums nodes (1, 0) and
    # (1, 1) into (2, 0); on 2 workers (shards 0-2, 3-5) tasks sum (0, 2) + (0, 3) into (1, 1) and
    # (1, 0) + (1, 1) into (2, 0); one worker sums everything itself.
    assert (2, 0) in nodes[3] and {(1, 1), (2, 0)} <= nodes[2] and not nodes[1], nodes
    for workers in (2, 3):
        for key in weights[1]:
            assert torch.equal(weights[workers][key], weights[1][key]), (workers, key)
    assert relative_error(weights[1], plain_loop(config, digits_store)) < 1e-5
