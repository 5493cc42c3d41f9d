"""Pipeline stages on a GPU: two stage workers sharing one GPU train what one CPU process trains.

Marked ``gpu``: skipped cleanly without CUDA; ``benchmarks/gpu_check.py`` runs it on a GPU
machine. Each stage is built in place on the host (the seed's CPU draws) and moved to its
worker's ``cuda:0``; activations and their gradients travel device -> host -> device.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import local_client, plan_batches, run_config, saved_weights, synthetic_store
from tests.reference import max_relative_error, reference_weights

has_cuda = torch.cuda.is_available()


def cuda_peak_bytes() -> int:
    return int(torch.cuda.max_memory_allocated(0)) if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.timeout(180)
@pytest.mark.skipif(not has_cuda, reason="needs a CUDA GPU")
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_two_stages_on_one_gpu_equal_the_cpu_loop(tmp_path, schedule):
    from dasktrain.run_loop import train

    store = synthetic_store(tmp_path / "blobs.zarr", samples=240, features=16, classes=4, chunk=40)
    config = run_config(store, tmp_path / "run",
                        model={"factory": "dasktrain.models:mlp",
                               "kwargs": {"in_features": 16, "out_features": 4, "hidden": [64, 64]}},
                        optimizer={"name": "adamw", "lr": 0.01},
                        train={"epochs": 1, "batch_size": 40, "shards": 2, "seed": 1},
                        cluster={"workers": 2}, parallel={"pipeline": 2, "micro_batches": 4, "schedule": schedule})
    with local_client(2) as client:  # both workers see the one GPU as their cuda:0
        result = train(config, client=client)
        peaks = client.run(cuda_peak_bytes)
    assert result.completed
    assert all(peak > 0 for peak in peaks.values()), peaks  # each stage computed on the GPU
    got = saved_weights(tmp_path / "run")
    # GPU kernels sum in another order than the CPU's: close, not bitwise.
    assert max_relative_error(got, reference_weights(config, plan_batches(config))) < 1e-3
