"""Checkpoints and resume: a stopped run, resumed, ends with the weights of an uninterrupted run."""

from __future__ import annotations

import shutil

import pytest
import torch

from dasktrain.checkpoint import list_checkpoints, load_checkpoint
from dasktrain.errors import CheckpointError
from dasktrain.ingest import example_arrays, write_store
from dasktrain.metrics import read_metrics
from dasktrain.run_loop import train
from tests.helpers import local_client, plan_batches, run_config, saved_weights
from tests.reference import max_relative_error, reference_weights

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("data") / "digits.zarr", example_arrays("digits"), chunk_size=64)


@pytest.fixture(scope="module")
def client():
    with local_client(2) as c:
        yield c


def config_for(store, out):
    return run_config(store, out, optimizer={"name": "adamw", "lr": 0.003},
                      schedule={"name": "warmup_cosine", "warmup_steps": 4},
                      data={"store": str(store), "validation": {"fraction": 0.2}},
                      checkpoint={"every_steps": 10, "keep": 3})


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_stop_after_epoch_then_resume_equals_uninterrupted(store, client, tmp_path):
    whole = config_for(store, tmp_path / "whole")
    train(whole, client=client)

    parted = config_for(store, tmp_path / "parted")
    first = train(parted, client=client, until_epoch=1)
    assert not first.completed and first.steps == 29
    assert not (tmp_path / "parted" / "model.safetensors").exists()
    assert load_checkpoint(list_checkpoints(tmp_path / "parted")[-1]).step == 29
    second = train(parted, client=client, resume=True)
    assert second.completed

    assert_same_weights(saved_weights(tmp_path / "parted"), saved_weights(tmp_path / "whole"))
    # The metrics file reads as one run: every step once, both epochs.
    steps = [r["global_step"] for r in read_metrics(tmp_path / "parted") if r["kind"] == "step"]
    assert steps == list(range(58))
    assert [r["epoch"] for r in read_metrics(tmp_path / "parted") if r["kind"] == "epoch"] == [0, 1]


def test_resume_from_mid_epoch_checkpoint(store, client, tmp_path):
    whole = config_for(store, tmp_path / "whole")
    train(whole, client=client)
    parted = config_for(store, tmp_path / "parted")
    train(parted, client=client, until_epoch=1)
    # Drop the epoch-end checkpoint: the newest left is step 20, in the middle of epoch 0.
    shutil.rmtree(list_checkpoints(tmp_path / "parted")[-1])
    assert load_checkpoint(list_checkpoints(tmp_path / "parted")[-1]).step == 20
    train(parted, client=client, resume=True)
    assert_same_weights(saved_weights(tmp_path / "parted"), saved_weights(tmp_path / "whole"))


def test_a_collective_run_read_per_step_resumes_read_per_segment(store, client, tmp_path):
    # train.host_reads changes how updates are decided (a fused optimizer on the device), not
    # what is learned: a checkpoint of one loads into the other, and the run goes on as one.
    def collective(reads):
        config = config_for(store, tmp_path / "parted")
        return config.model_copy(update={"train": config.train.model_copy(
            update={"reduce": "collective", "host_reads": reads})})

    assert train(collective("step"), client=client, until_epoch=1).steps == 29
    assert train(collective("segment"), client=client, resume=True).completed
    reference = reference_weights(collective("segment"), plan_batches(collective("segment")))
    assert max_relative_error(saved_weights(tmp_path / "parted"), reference) < 1e-5


def test_existing_run_is_never_overwritten_without_resume(store, client, tmp_path):
    config = config_for(store, tmp_path / "run")
    train(config, client=client, until_epoch=1)
    before = list_checkpoints(tmp_path / "run")
    with pytest.raises(CheckpointError, match="already holds a run"):
        train(config, client=client)
    assert list_checkpoints(tmp_path / "run") == before


def test_resume_with_a_different_trajectory_is_refused(store, client, tmp_path):
    config = config_for(store, tmp_path / "run")
    train(config, client=client, until_epoch=1)
    changed = config.model_copy(update={"optimizer": config.optimizer.model_copy(update={"lr": 0.1})})
    with pytest.raises(CheckpointError, match="different configuration"):
        train(changed, client=client, resume=True)


def test_checkpoint_is_complete_and_keeps_the_newest(store, client, tmp_path):
    config = config_for(store, tmp_path / "run")
    train(config, client=client)
    kept = list_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["step-00000040", "step-00000050", "step-00000058"]
    ckpt = load_checkpoint(kept[-1])
    assert ckpt.state["epoch"] == 2 and ckpt.state["config_digest"] == config.digest()
    assert_same_weights(ckpt.model, saved_weights(tmp_path / "run"))
    assert ckpt.optimizer["state"][0]["exp_avg"].shape == ckpt.model["1.weight"].shape
