"""DP equivalence on a real LocalCluster of worker processes: N replicas on Dask learn what one
plain PyTorch process learns from the same global batches (fp32, 1e-5 relative).

Deterministic mode's bitwise worker-count invariance is in test_worker_invariance.py.
"""

from __future__ import annotations

import pytest

from dasktrain.ingest import example_arrays, write_store
from dasktrain.run_loop import train
from tests.helpers import local_client, plan_batches, run_config, saved_weights
from tests.reference import max_relative_error, reference_weights

pytestmark = pytest.mark.timeout(240)

OPTIMIZERS = {
    "sgd": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
    "adamw": {"name": "adamw", "lr": 0.003, "weight_decay": 0.01},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("data") / "digits.zarr", example_arrays("digits"), chunk_size=64)


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"{n}workers")
def client(request):
    with local_client(request.param) as c:
        yield c


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_dp_equals_single_process(store, client, tmp_path, optimizer):
    # batch 50 over 1413 training samples: the last step of each epoch is short (13 samples).
    config = run_config(
        store, tmp_path / "run", optimizer=OPTIMIZERS[optimizer],
        schedule={"name": "warmup_cosine", "warmup_steps": 5, "min_lr": 1e-4},
        data={"store": str(store), "validation": {"fraction": 0.2}},
    )
    result = train(config, client=client)
    assert result.completed and result.steps == 2 * 29
    expected = reference_weights(config, plan_batches(config))
    got = saved_weights(tmp_path / "run")
    assert max_relative_error(got, expected) < 1e-5
