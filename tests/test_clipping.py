"""Gradient clipping by global norm (``train.clip_grad_norm``) clips the reduced mean gradient, so a
run on 2 workers learns what a plain PyTorch loop learns clipping its global batch's gradient
(fp32, 1e-5 relative), whichever way the gradients are summed. Its refusal with pipeline stages is
in test_config_rules.py.
"""

from __future__ import annotations

import pytest

from dasktrain.run_loop import train
from tests.helpers import local_client, plan_batches, run_config, saved_weights, synthetic_store
from tests.reference import max_relative_error, reference_weights

pytestmark = pytest.mark.timeout(240)

CLIP = 0.2
"""Below the mean gradient's norm on most steps of this run (the reference checks it does clip)."""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("data") / "blobs.zarr", samples=480, features=64, classes=10,
                           chunk=40)


@pytest.fixture(scope="module")
def client():
    with local_client(2) as c:
        yield c


@pytest.mark.parametrize("reduce", ["tree", "collective"])
def test_clipped_dp_equals_clipped_single_process(store, client, tmp_path, reduce):
    config = run_config(store, tmp_path / "run", train={"epochs": 2, "batch_size": 40, "shards": 4, "seed": 3,
                                                        "reduce": reduce, "clip_grad_norm": CLIP})
    result = train(config, client=client)
    assert result.completed
    norms: list[float] = []
    expected = reference_weights(config, plan_batches(config), clip=CLIP, grad_norms=norms)
    assert len(norms) == result.steps
    clipped = sum(norm > CLIP for norm in norms)
    assert clipped >= 0.8 * len(norms), norms  # the run tests clipping, not an unclipped update
    assert max_relative_error(saved_weights(tmp_path / "run"), expected) < 1e-5
