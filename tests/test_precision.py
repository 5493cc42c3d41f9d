"""bf16 autocast on the CPU: it trains, and stays close to fp32 (fp32 weights and gradient sums)."""

from __future__ import annotations

import pytest

from dasktrain.metrics import read_metrics
from dasktrain.run_loop import train
from tests.helpers import local_client, plan_batches, run_config, saved_weights
from tests.reference import max_relative_error, reference_weights


@pytest.mark.timeout(180)
def test_bf16_on_cpu_trains_close_to_fp32(digits_store, tmp_path):
    config = run_config(digits_store, tmp_path / "bf16", optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
                        train={"epochs": 1, "batch_size": 64, "shards": 4, "precision": "bf16"})
    with local_client(2) as client:
        train(config, client=client)
    weights = saved_weights(tmp_path / "bf16")
    assert all(w.dtype.is_floating_point and w.dtype.itemsize == 4 for w in weights.values())  # fp32 master weights
    error = max_relative_error(weights, reference_weights(config, plan_batches(config)))
    assert 0 < error < 0.05  # bf16 rounding shows, but the trajectory is the same
    losses = [r["loss"] for r in read_metrics(tmp_path / "bf16") if r["kind"] == "step"]
    assert losses[-1] < 0.85 * losses[0]
