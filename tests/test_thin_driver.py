"""Thin driver: the bytes the client receives per step do not grow with model or batch size.

The scheduler and workers run as separate processes, so every byte counted here is a byte the
driver's client read from a socket.
"""

from __future__ import annotations

import pytest
from distributed import Client
from distributed.comm import tcp

from dasktrain.run_loop import train
from tests.helpers import run_config, synthetic_store
from tests.processes import dask_processes

pytestmark = pytest.mark.timeout(300)


class ByteCounter:
    """Counts the payload bytes this process reads from Dask TCP comms."""

    def __init__(self, monkeypatch):
        self.total = 0
        original = tcp.read_bytes_rw

        async def counting(stream, n):
            self.total += n
            return await original(stream, n)

        monkeypatch.setattr(tcp, "read_bytes_rw", counting)


def bytes_per_step(client, counter, config) -> tuple[float, int]:
    marks = []

    def on_event(event):
        if event["kind"] == "step":
            marks.append(counter.total)

    train(config, client=client, on_event=on_event)
    # Between the first and last step records: training only (not set-up, not the final weights).
    return (marks[-1] - marks[0]) / (len(marks) - 1), len(marks)


def test_driver_bytes_per_step_do_not_grow_with_model_or_batch(tmp_path, monkeypatch):
    store = synthetic_store(tmp_path / "blobs.zarr", samples=4000, features=64, classes=10, chunk=100)
    counter = ByteCounter(monkeypatch)
    small = {"in_features": 64, "out_features": 10, "hidden": [64]}
    large = {"in_features": 64, "out_features": 10, "hidden": [640, 64]}  # >10x the parameters
    base = run_config(store, tmp_path / "base", model={"factory": "dasktrain.models:mlp", "kwargs": small},
                      train={"epochs": 1, "batch_size": 40, "shards": 4})
    big_model = base.model_copy(update={"output_dir": str(tmp_path / "model"),
                                        "model": base.model.model_copy(update={"kwargs": large})})
    big_batch = base.model_copy(update={"output_dir": str(tmp_path / "batch"),
                                        "train": base.train.model_copy(update={"batch_size": 400, "epochs": 5})})
    with dask_processes(tmp_path, workers=2) as address, Client(address) as client:
        client.wait_for_workers(2, timeout=60)
        b_base, n_base = bytes_per_step(client, counter, base)
        b_model, _ = bytes_per_step(client, counter, big_model)
        b_batch, n_batch = bytes_per_step(client, counter, big_batch)
        collective = big_model.model_copy(update={"output_dir": str(tmp_path / "collective"),
                                                  "train": base.train.model_copy(update={"reduce": "collective"})})
        b_collective, _ = bytes_per_step(client, counter, collective)
    assert n_base >= 50 and n_batch >= 40
    grad_bytes_large = 4 * (64 * 640 + 640 + 640 * 64 + 64 + 64 * 10 + 10)
    # Per step the client gets scheduler notices and one small stats dict: a few KB at most,
    # the same whatever the model or batch (a 10% margin absorbs message-size jitter).
    assert b_base < 20_000, b_base
    assert b_model < 1.1 * b_base, (b_base, b_model)
    assert b_batch < 1.1 * b_base, (b_base, b_batch)
    assert b_model < grad_bytes_large / 10
    # reduce: collective sends per-step numbers once per segment: no more than the tree does.
    assert b_collective < b_base, (b_base, b_collective)
