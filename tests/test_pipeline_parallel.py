"""Pipeline (model) parallelism on a real LocalCluster of worker processes.

P stages x m micro-batches (and R replicas of them) must learn what one plain PyTorch process
learns from the same global batches, under every schedule (GPipe, 1F1B, ZB-H1, interleaved 1F1B
with 2 virtual stages per worker) and with R = 3 replicas reducing each stage's gradients by a
tree; 1F1B must hold at most P activations per stage; the driver
must receive only numbers; a stage whose worker is killed must be re-created and the run must end
with the weights of an uninterrupted run; bad input must fail with a message naming the value.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
from distributed import Client

from dasktrain.checkpoint import latest_checkpoint, list_checkpoints
from dasktrain.config import validate_config
from dasktrain.errors import ClusterError, ConfigError
from dasktrain.ingest import write_store
from dasktrain.metrics import read_metrics
from dasktrain.normalize import compute_normalization
from dasktrain.preflight import resolve_splits
from dasktrain.run_loop import train
from dasktrain.stages import balanced_bounds
from tests.helpers import local_client, plan_batches, run_config, saved_weights, synthetic_store
from tests.processes import dask_processes
from tests.reference import max_relative_error, reference_weights
from tests.test_thin_driver import ByteCounter

WORKERS = 6
MLP = {"factory": "dasktrain.models:mlp", "kwargs": {"in_features": 16, "out_features": 4, "hidden": [32, 32]}}
"""Six cuttable layers: Flatten, Linear, ReLU, Linear, ReLU, Linear."""
DEEP_MLP = {"factory": "dasktrain.models:mlp", "kwargs": {"in_features": 16, "out_features": 4, "hidden": [32, 32, 32]}}
"""Eight cuttable layers: enough for 2 workers x 2 virtual stages, or 4 workers."""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # 240 samples, batch 40: six steps an epoch.
    return synthetic_store(tmp_path_factory.mktemp("data") / "blobs.zarr", samples=240, features=16, classes=4, chunk=40)


@pytest.fixture(scope="module")
def client():
    with local_client(WORKERS) as c:
        yield c


def pp_config(store, out, **parallel):
    # The cluster the config would start has one worker per stage (the config refuses fewer);
    # the tests run it on the module's client instead, whose size the run checks when it starts.
    stages = parallel.get("pipeline", 1) * parallel.get("data", 1)
    return run_config(store, out, model=MLP, optimizer={"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
                      schedule={"name": "warmup_cosine", "warmup_steps": 2},
                      train={"epochs": 1, "batch_size": 40, "shards": 2, "seed": 1},
                      cluster={"workers": max(2, stages)}, parallel=parallel)


def steps_of(events):
    return [e for e in events if e["kind"] == "step"]


# -- units: the cut and the schedules --------------------------------------------------------

def test_balanced_bounds_minimise_the_largest_stage():
    assert balanced_bounds([0, 2080, 0, 1056, 0, 132], 3) == ((0, 2), (2, 4), (4, 6))
    assert balanced_bounds([1, 1, 1, 1], 4) == ((0, 1), (1, 2), (2, 3), (3, 4))
    assert balanced_bounds([8, 1, 1, 1, 1, 1, 1, 1, 1], 2) == ((0, 1), (1, 9))


# -- 1. equivalence ---------------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("sched,stages,m", [
    ("gpipe", 2, 1), ("gpipe", 3, 4), ("1f1b", 2, 4), ("1f1b", 3, 1), ("1f1b", 3, 4),
    ("zb-h1", 2, 4), ("zb-h1", 3, 4), ("zb-h1", 3, 1),
])
def test_pp_equals_single_process(store, client, tmp_path, stages, m, sched):
    config = pp_config(store, tmp_path / "run", pipeline=stages, micro_batches=m, schedule=sched)
    result = train(config, client=client)
    assert result.completed and result.steps == 6
    got = saved_weights(tmp_path / "run")
    expected = reference_weights(config, plan_batches(config))
    assert got.keys() == expected.keys()  # the stages' parts make up the full Sequential
    assert max_relative_error(got, expected) < 1e-5


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stages,m", [(2, 4), (4, 4)])
def test_interleaved_1f1b_equals_single_process(store, client, tmp_path, stages, m):
    # 2 virtual stages per worker: 4 or 8 stages of the 8-layer MLP, activations going round the ring.
    # With a validation split: its forward-only pass goes round the ring too.
    raw = pp_config(store, tmp_path / "run", pipeline=stages, micro_batches=m, schedule="interleaved-1f1b",
                    virtual_stages=2).model_dump(mode="json")
    config = validate_config({**raw, "model": DEEP_MLP, "data": {"store": str(store), "validation": {"fraction": 0.2}}})
    events = []
    train(config, client=client, on_event=events.append)
    assert len(steps_of(events)[0]["stage_busy_s"]) == stages  # one actor per worker, two chunks each
    got = saved_weights(tmp_path / "run")
    expected = reference_weights(config, plan_batches(config))
    assert got.keys() == expected.keys()
    assert max_relative_error(got, expected) < 1e-5
    (epoch,) = [e for e in events if e["kind"] == "epoch"]
    val_rows = sum(c.stop - c.start for c in resolve_splits(config).val_chunks)
    assert epoch["val_samples"] == val_rows > 0 and np.isfinite(epoch["val_loss"])


@pytest.mark.timeout(120)
def test_three_replicas_of_two_stages_equal_single_process(store, client, tmp_path):
    # R = 3: each stage's gradients go up a tree of fan-in 2 (0 <- 1, then 0 <- 2) and back down.
    config = pp_config(store, tmp_path / "run", pipeline=2, micro_batches=2, schedule="zb-h1", data=3)
    config = config.model_copy(update={"train": config.train.model_copy(update={"fan_in": 2})})
    events = []
    result = train(config, client=client, on_event=events.append)
    assert result.completed
    assert len(steps_of(events)[0]["stage_busy_s"]) == 6
    assert max_relative_error(saved_weights(tmp_path / "run"), reference_weights(config, plan_batches(config))) < 1e-5


@pytest.mark.timeout(120)
def test_dp_x_pp_equals_single_process(store, client, tmp_path):
    config = pp_config(store, tmp_path / "run", pipeline=2, micro_batches=4, schedule="1f1b", data=2)
    events = []
    train(config, client=client, on_event=events.append)
    assert len(steps_of(events)[0]["stage_busy_s"]) == 4  # 2 replicas x 2 stages ran every step
    assert max_relative_error(saved_weights(tmp_path / "run"), reference_weights(config, plan_batches(config))) < 1e-5


@pytest.mark.timeout(120)
def test_pp_with_normalize_equals_single_process_on_standardised_inputs(client, tmp_path):
    # data.normalize holds in pipeline mode: stage 0 reads its inputs standardised, as replicas do.
    rng = np.random.default_rng(4)
    targets = rng.integers(0, 4, size=240)
    blobs = rng.normal(size=(4, 16))[targets] + rng.normal(scale=0.5, size=(240, 16))
    inputs = (blobs * rng.uniform(0.5, 20.0, size=16) + rng.uniform(-10.0, 10.0, size=16)).astype(np.float32)
    store = write_store(tmp_path / "scaled.zarr", {"inputs": inputs, "targets": targets}, chunk_size=40)
    raw = pp_config(store, tmp_path / "run", pipeline=2, micro_batches=4).model_dump(mode="json")
    config = validate_config({**raw, "data": {"store": str(store), "normalize": True}})
    # The flow's prepare stage computes the statistics on the cluster; here, on the module's client.
    compute_normalization(client, str(store), "inputs", resolve_splits(config).train_chunks)
    train(config, client=client)

    x = inputs.astype(np.float64)  # every chunk trains: no validation split
    standard = ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)
    plain = write_store(tmp_path / "standard.zarr", {"inputs": standard, "targets": targets}, chunk_size=40)
    got = saved_weights(tmp_path / "run")
    expected = reference_weights(validate_config({**raw, "data": {"store": str(plain)}}), plan_batches(config))
    assert max_relative_error(got, expected) < 1e-5
    unscaled = reference_weights(validate_config(raw), plan_batches(config))
    assert max_relative_error(got, unscaled) > 1e-2  # the inputs were standardised, not read raw


# -- 2. 1F1B holds at most P activations, GPipe m ---------------------------------------------

@pytest.mark.timeout(120)
def test_1f1b_holds_at_most_p_activations_gpipe_m(store, client, tmp_path):
    alive = {}
    for sched in ("gpipe", "1f1b"):
        events = []
        train(pp_config(store, tmp_path / sched, pipeline=3, micro_batches=8, schedule=sched),
              client=client, on_event=events.append)
        alive[sched] = [max(col) for col in zip(*(s["stage_max_alive"] for s in steps_of(events)))]
    assert alive["gpipe"] == [8, 8, 8]
    assert alive["1f1b"] == [3, 2, 1]  # stage s: P - s warm-up activations at most


# -- 3. thin driver -----------------------------------------------------------------------------

@pytest.mark.timeout(150)
def test_driver_bytes_per_step_do_not_grow_with_micro_batch_or_activation(tmp_path, monkeypatch):
    big_store = synthetic_store(tmp_path / "blobs.zarr", samples=4000, features=64, classes=10, chunk=100)
    counter = ByteCounter(monkeypatch)
    small = run_config(big_store, tmp_path / "small",
                       model={"factory": "dasktrain.models:mlp",
                              "kwargs": {"in_features": 64, "out_features": 10, "hidden": [32, 32]}},
                       train={"epochs": 1, "batch_size": 80, "shards": 4},
                       parallel={"pipeline": 2, "micro_batches": 4})
    # 10x the samples per micro-batch and 16x the width: ~160x the bytes of every activation.
    large = small.model_copy(update={
        "output_dir": str(tmp_path / "large"),
        "model": small.model.model_copy(update={"kwargs": {"in_features": 64, "out_features": 10, "hidden": [512, 512]}}),
        "train": small.train.model_copy(update={"batch_size": 800, "epochs": 8}),
    })

    def per_step(client, config):
        marks = []
        train(config, client=client, on_event=lambda e: marks.append(counter.total) if e["kind"] == "step" else None)
        return (marks[-1] - marks[0]) / (len(marks) - 1), len(marks)

    with dask_processes(tmp_path, workers=2) as address, Client(address) as client:
        client.wait_for_workers(2, timeout=60)
        b_small, n_small = per_step(client, small)
        b_large, n_large = per_step(client, large)
    assert n_small >= 40 and n_large >= 30
    activation_bytes = 4 * (800 // 4) * 512  # one micro-batch's activation in the large run
    assert b_small < 20_000, b_small
    # Slack for time-driven scheduler traffic (slower steps see more of it on a loaded machine):
    # still 40x less than one micro-batch's activation of the large run.
    assert b_large < 1.25 * b_small + 10_000, (b_small, b_large)
    assert b_large < activation_bytes / 10, (b_large, activation_bytes)


# -- 5. bad input -----------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_more_stages_than_layers(store, client, tmp_path):
    with pytest.raises(ConfigError, match=r"parallel.pipeline=7 stages.* only 6 cuttable layers.*<= 6"):
        train(pp_config(store, tmp_path / "run", pipeline=7), client=client)


@pytest.mark.timeout(60)
def test_more_stages_than_workers(store, client, tmp_path):
    with pytest.raises(ClusterError, match=rf"parallel.pipeline=4 .*parallel.data=2 .*needs 8 workers.*found {WORKERS}"):
        train(pp_config(store, tmp_path / "run", pipeline=4, data=2), client=client)


@pytest.mark.timeout(60)
def test_more_micro_batches_than_samples(store, client, tmp_path):
    with pytest.raises(ConfigError, match=r"parallel.micro_batches=41 .*train.batch_size=40.*<= 40"):
        train(pp_config(store, tmp_path / "run", pipeline=2, micro_batches=41), client=client)


@pytest.mark.timeout(60)
def test_model_that_is_not_sequential(store, client, tmp_path):
    config = pp_config(store, tmp_path / "run", pipeline=2).model_copy(update={"model": run_config(
        store, tmp_path, model={"factory": "torch.nn:Linear", "kwargs": {"in_features": 16, "out_features": 4}}).model})
    with pytest.raises(ConfigError, match=r"torch.nn:Linear returned Linear, which is not an nn.Sequential and names no stages"):
        train(config, client=client)


@pytest.mark.timeout(60)
def test_bad_cut_points(store, client, tmp_path):
    with pytest.raises(ConfigError, match=r"parallel.cuts=\(4, 2\) must increase"):
        train(pp_config(store, tmp_path / "run", pipeline=3, cuts=[4, 2]), client=client)


# -- checkpoints, resume and 4. a lost stage (last: it kills one of the module's workers) --------

@pytest.mark.timeout(120)
def test_stop_and_resume_equals_uninterrupted(store, client, tmp_path):
    def config(out):
        c = pp_config(store, tmp_path / out, pipeline=2, micro_batches=2, cuts=[3])
        return c.model_copy(update={"train": c.train.model_copy(update={"epochs": 2})})

    train(config("whole"), client=client)
    first = train(config("parted"), client=client, until_epoch=1)
    assert not first.completed and first.steps == 6
    manifest = latest_checkpoint(tmp_path / "parted") / "state.json"
    assert '"stages"' in manifest.read_text()
    train(config("parted"), client=client, resume=True)
    whole, parted = saved_weights(tmp_path / "whole"), saved_weights(tmp_path / "parted")
    assert all(torch.equal(whole[k], parted[k]) for k in whole)


@pytest.mark.timeout(150)
def test_lost_stage_is_recreated_and_the_run_finishes(store, client, tmp_path):
    def config(out):
        c = pp_config(store, tmp_path / out, pipeline=2, micro_batches=2)
        return c.model_copy(update={"train": c.train.model_copy(update={"epochs": 2}),
                                    "checkpoint": c.checkpoint.model_copy(update={"every_steps": 2})})

    train(config("whole"), client=client)

    events = []
    killed = {}

    def on_event(event):
        events.append(event)
        if event["kind"] == "start":
            killed["addr"] = event["workers"][1]  # the last stage's worker
        if event["kind"] == "step" and event["global_step"] == 6 and "pid" not in killed:
            killed["pid"] = client.run(os.getpid, workers=[killed["addr"]])[killed["addr"]]
            os.kill(killed["pid"], signal.SIGKILL)

    result = train(config("killed"), client=client, on_event=on_event)
    assert result.completed and "pid" in killed
    steps = steps_of(events)
    assert steps[-1]["recoveries"] == 1
    # Re-done from the checkpoint of step 6: the steps after it are computed twice, recorded once.
    (regroup,) = [e for e in events if e["kind"] == "regroup"]
    assert regroup["global_step"] == 6 and regroup["lost"] == [killed["addr"]]
    assert [s["global_step"] for s in steps] == list(range(12))
    assert [r["global_step"] for r in read_metrics(tmp_path / "killed") if r["kind"] == "step"] == list(range(12))
    assert [p.name for p in list_checkpoints(tmp_path / "killed")][-1] == "step-00000012"
    whole, killed_run = saved_weights(tmp_path / "whole"), saved_weights(tmp_path / "killed")
    assert all(torch.equal(whole[k], killed_run[k]) for k in whole)
