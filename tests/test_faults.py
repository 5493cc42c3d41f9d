"""Faults: workers killed and added mid-run, data damage, NaN losses. Real processes, bounded waits."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
import zarr

from dasktrain.checkpoint import latest_checkpoint, load_checkpoint
from dasktrain.engines.replicas import ReplicaEngine
from dasktrain.errors import DataError, NonFiniteLossError
from dasktrain.ingest import example_arrays, write_store
from dasktrain.metrics import read_metrics
from dasktrain.preflight import build_plan, resolve_splits
from dasktrain.run_loop import train
from tests.helpers import local_client, plan_batches, run_config, saved_weights
from tests.ledger_check import check_exactly_once
from tests.reference import max_relative_error, reference_weights

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("data") / "digits.zarr", example_arrays("digits"), chunk_size=64)


STOCHASTIC_MLP = {"factory": "dasktrain.models:mlp", "kwargs": {
    "in_features": 64, "out_features": 10, "hidden": [32], "dropout": 0.2, "batch_norm": True}}
"""Dropout and BatchNorm: the deterministic fault tests hold masks and running statistics bitwise too."""


def fault_config(store, out, model=None, **train):
    sections = {"model": model} if model else {}
    return run_config(store, out, optimizer={"name": "adamw", "lr": 0.003},
                      train={"epochs": 2, "batch_size": 50, "shards": 4, "seed": 3, "ledger": True, **train},
                      checkpoint={"every_steps": 10, "keep": 2}, **sections)


def kill_worker_at(client, steps):
    """An on_event hook that SIGKILLs one worker process (by the pid the cluster reports) at ``steps``."""
    killed = []

    def on_event(event):
        if event["kind"] == "step" and event["global_step"] in steps and event["global_step"] not in killed:
            pids = client.run(os.getpid)
            victim = sorted(pids)[len(killed) % len(pids)]
            os.kill(pids[victim], signal.SIGKILL)
            killed.append(event["global_step"])

    return on_event, killed


def regroups(run_dir):
    return [r for r in read_metrics(run_dir) if r["kind"] == "regroup"]


def training_samples(config):
    splits = resolve_splits(config)
    plan = build_plan(config, splits)
    return np.concatenate([np.arange(c.start, c.stop) for c in plan.chunks])


def test_killed_worker_fast_mode_finishes_with_exact_accounting(store, tmp_path):
    config = fault_config(store, tmp_path / "run")
    with local_client(2) as client:
        hook, killed = kill_worker_at(client, {12})
        result = train(config, client=client, on_event=hook)
    assert killed == [12] and result.completed
    events = regroups(tmp_path / "run")
    assert events and events[0]["lost"], events
    check_exactly_once(tmp_path / "run", training_samples(config), epochs=2)
    assert max_relative_error(saved_weights(tmp_path / "run"), reference_weights(config, plan_batches(config))) < 1e-5


def deterministic_reference(store, tmp_path):
    config = fault_config(store, tmp_path / "clean", model=STOCHASTIC_MLP, deterministic=True)
    with local_client(2) as client:
        train(config, client=client)
    return config, saved_weights(tmp_path / "clean")


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_deterministic_bitwise_after_kill_and_after_join(store, tmp_path, monkeypatch):
    config, clean = deterministic_reference(store, tmp_path)
    # Look for joined workers at every step boundary: at the default of once a second, a fast
    # machine finished the run's remaining steps before the next look, and no join happened.
    monkeypatch.setattr(ReplicaEngine, "JOIN_POLL_S", 0.0)

    killed_cfg = config.model_copy(update={"output_dir": str(tmp_path / "killed")})
    with local_client(2) as client:
        hook, killed = kill_worker_at(client, {9})
        train(killed_cfg, client=client, on_event=hook)
    assert killed == [9] and regroups(tmp_path / "killed")
    assert_bitwise(saved_weights(tmp_path / "killed"), clean)

    joined_cfg = config.model_copy(update={"output_dir": str(tmp_path / "joined")})
    with local_client(1) as client:
        cluster = client.cluster

        def grow(event):
            if event["kind"] == "step" and event["global_step"] == 8 and len(cluster.workers) == 1:
                cluster.scale(2)
                # Hold the driver until the worker is up, so the join happens mid-run however
                # slowly the machine starts a process.
                client.wait_for_workers(2, timeout=60)

        train(joined_cfg, client=client, on_event=grow)
    events = regroups(tmp_path / "joined")
    assert any(e["joined"] for e in events), events
    assert_bitwise(saved_weights(tmp_path / "joined"), clean)
    check_exactly_once(tmp_path / "joined", training_samples(config), epochs=2)


BATCHNORM_CNN = {"factory": "dasktrain.models:cnn", "kwargs": {
    "in_channels": 1, "num_classes": 10, "image_size": 8, "channels": [8, 16], "hidden": 32, "batch_norm": True}}


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("data") / "digits-image.zarr", example_arrays("digits", image=True),
                       chunk_size=64)


def test_soak_three_epochs_kills_and_joins(image_store, tmp_path):
    """Every few steps a worker is killed; its nanny starts a fresh one, which joins the run. The
    BatchNorm CNN: its running statistics too must come out bitwise as in a fault-free run."""
    config = fault_config(image_store, tmp_path / "clean", model=BATCHNORM_CNN, deterministic=True, epochs=3)
    with local_client(2) as client:
        train(config, client=client)
    clean = saved_weights(tmp_path / "clean")
    soak = config.model_copy(update={"output_dir": str(tmp_path / "soak")})
    with local_client(2) as client:
        hook, killed = kill_worker_at(client, {6, 20, 37, 55, 70})
        train(soak, client=client, on_event=hook)
    assert len(killed) == 5
    events = regroups(tmp_path / "soak")
    # A kill can hit a restarted worker before it joined the run: that one is no loss to the run.
    assert sum(len(e["lost"]) for e in events) >= 3 and any(e["joined"] for e in events)
    check_exactly_once(tmp_path / "soak", training_samples(config), epochs=3)
    assert_bitwise(saved_weights(tmp_path / "soak"), clean)


def test_min_workers_stops_with_a_checkpoint(store, tmp_path):
    config = fault_config(store, tmp_path / "run", min_workers=2, worker_grace_s=2)
    with local_client(2) as client:
        # No nanny restart can save it: the cluster scales down for good.
        cluster = client.cluster

        def shrink(event):
            if event["kind"] == "step" and event["global_step"] == 5 and len(cluster.workers) == 2:
                cluster.scale(1)

        with pytest.raises(Exception, match="below train.min_workers=2"):
            train(config, client=client, on_event=shrink)
    newest = latest_checkpoint(tmp_path / "run")
    assert newest is not None and load_checkpoint(newest).step >= 5


# -- data faults ---------------------------------------------------------------------------------

def damaged_store(tmp_path, damage):
    path = write_store(tmp_path / "digits.zarr", example_arrays("digits"), chunk_size=64)
    damage(path)
    return path


def run_until_error(store, tmp_path, **train_opts):
    config = fault_config(store, tmp_path / "run", ledger=False, **train_opts)
    with local_client(1) as client:
        return train(config, client=client)


def test_flipped_bytes_in_a_chunk_are_named(tmp_path):
    def flip(path):
        chunk = path / "inputs" / "c" / "20" / "0"
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))

    store = damaged_store(tmp_path, flip)
    with pytest.raises(DataError, match=r"chunk 20 .* array 'inputs' in store .*digits.zarr: RuntimeError: Zstd decompression error") as err:
        run_until_error(store, tmp_path)
    assert "last good checkpoint" in str(err.value) or "no checkpoint" in str(err.value)


def test_deleted_chunk_is_named(tmp_path):
    store = damaged_store(tmp_path, lambda path: (path / "targets" / "c" / "7").unlink())
    with pytest.raises(DataError, match=r"chunk 7 .* array 'targets' in store .*digits.zarr is missing"):
        run_until_error(store, tmp_path)


def nan_store(tmp_path):
    arrays = example_arrays("digits")
    arrays["inputs"][5 * 64 + 3, 10] = np.nan  # one sample of chunk 5
    return write_store(tmp_path / "nan.zarr", arrays, chunk_size=64)


def test_nan_input_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    store = nan_store(tmp_path)
    config = fault_config(store, tmp_path / "run", ledger=False)
    plan = build_plan(config, resolve_splits(config))
    bad = next(t for t in range(2 * plan.steps_per_epoch)
               if 5 * 64 + 3 in plan.epoch(t // plan.steps_per_epoch).global_batch(t % plan.steps_per_epoch))
    with local_client(1) as client, pytest.raises(NonFiniteLossError, match=f"global step {bad} ") as err:
        train(config, client=client)
    assert "last good checkpoint" in str(err.value)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert ckpt.step <= bad and all(torch.isfinite(v).all() for v in ckpt.model.values())
    assert zarr.open_group(str(store), mode="r")["inputs"].shape == (1797, 64)  # data untouched


def test_nan_input_with_skip_step_skips_and_counts(tmp_path):
    store = nan_store(tmp_path)
    config = fault_config(store, tmp_path / "run", ledger=False, on_nan="skip_step")
    with local_client(2) as client:
        result = train(config, client=client)
    assert result.completed
    skipped = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "step" and r.get("skipped")]
    assert len(skipped) == 2  # the bad sample is met once per epoch
    assert all(torch.isfinite(v).all() for v in saved_weights(tmp_path / "run").values())


def test_straggler_past_step_timeout_is_treated_as_lost(store, tmp_path):
    flag = tmp_path / "hang-pid"
    config = fault_config(store, tmp_path / "run", step_timeout=3.0, epochs=1)
    config = config.model_copy(update={"model": config.model.model_copy(update={
        "factory": "tests.sleepy:sleepy_mlp",
        "kwargs": {**config.model.kwargs, "flag": str(flag), "seconds": 12.0}})})
    with local_client(2) as client:
        pids = client.run(os.getpid)

        def hang(event):
            if event["kind"] == "step" and event["global_step"] == 5:
                flag.write_text(str(pids[sorted(pids)[1]]))

        result = train(config, client=client, on_event=hang)
    assert result.completed
    events = regroups(tmp_path / "run")
    assert any("step_timeout" in e["reason"] for e in events), events
    check_exactly_once(tmp_path / "run", training_samples(config), epochs=1)
    assert max_relative_error(saved_weights(tmp_path / "run"), reference_weights(config, plan_batches(config))) < 1e-5
