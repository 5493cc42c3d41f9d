"""Pipeline mode (``parallel.pipeline: 2``) gets what the one run loop gives every engine.

Validation metrics at epoch ends, ``train.on_nan: skip_step``, a missing chunk named by the one
store reader, ``train.step_timeout`` honoured for a frozen stage worker, and checkpoint pruning
that a crash cannot turn into a listed, incomplete checkpoint. Each is checked through what a
user sees: ``metrics.jsonl``, the checkpoint directories, the run's files, the error raised.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from dasktrain.checkpoint import list_checkpoints
from dasktrain.errors import ClusterError, DataError
from dasktrain.ingest import write_store
from dasktrain.metrics import read_metrics
from dasktrain.preflight import build_plan, resolve_splits
from dasktrain.run_loop import train
from tests.helpers import local_client, run_config, saved_weights, synthetic_store

MLP = {"factory": "dasktrain.models:mlp", "kwargs": {"in_features": 16, "out_features": 4, "hidden": [32, 32]}}
"""Six cuttable layers: Flatten, Linear, ReLU, Linear, ReLU, Linear."""
SAMPLES, CHUNK = 320, 40


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 8 chunks of 40; batch 40: eight steps an epoch without a validation split. Read only.
    return synthetic_store(tmp_path_factory.mktemp("data") / "blobs.zarr", samples=SAMPLES, features=16,
                           classes=4, chunk=CHUNK)


@pytest.fixture(scope="module")
def client():
    with local_client(2) as c:
        yield c


def pp_config(store: Path, out: Path, train: dict[str, Any] | None = None, **sections: Any):
    return run_config(store, out, model=MLP, optimizer={"name": "adamw", "lr": 0.01},
                      train={"epochs": 1, "batch_size": 40, "shards": 2, "seed": 1, **(train or {})},
                      parallel={"pipeline": 2, "micro_batches": 2}, **sections)


def records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir) if r["kind"] == kind]


def mlp_forward(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The MLP's forward from its saved weights, in plain torch: Linear layers with ReLU between."""
    layers = sorted({int(k.split(".")[0]) for k in weights})
    for i, n in enumerate(layers):
        x = x @ weights[f"{n}.weight"].T + weights[f"{n}.bias"]
        if i < len(layers) - 1:
            x = torch.relu(x)
    return x


# -- a. validation metrics at epoch ends --------------------------------------------------------


@pytest.mark.timeout(120)
def test_validation_metrics_at_every_epoch_end(store, client, tmp_path):
    out = tmp_path / "run"
    config = pp_config(store, out, train={"epochs": 2}, data={"store": str(store), "validation": {"fraction": 0.25}})
    val_chunks = resolve_splits(config).val_chunks
    assert len(val_chunks) == 2
    result = train(config, client=client)
    assert result.completed

    epochs = records(out, "epoch")
    assert [e["epoch"] for e in epochs] == [0, 1]
    for e in epochs:
        assert e["val_samples"] == 2 * CHUNK, e
        assert np.isfinite(e["val_loss"]) and 0.0 <= e["val_accuracy"] <= 1.0, e
    # The last epoch's figures are those of the final weights over the held-out chunks.
    group = zarr.open_group(str(store), mode="r")
    rows = np.concatenate([np.arange(c.start, c.stop) for c in val_chunks])
    x = torch.from_numpy(np.asarray(group["inputs"][:])[rows])
    y = torch.from_numpy(np.asarray(group["targets"][:])[rows])
    with torch.no_grad():
        logits = mlp_forward(saved_weights(out), x)
    assert epochs[-1]["val_loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert epochs[-1]["val_accuracy"] == pytest.approx(float((logits.argmax(1) == y).float().mean()), abs=1e-9)


# -- b. on_nan: skip_step ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_nan_samples_skip_exactly_their_steps(client, tmp_path):
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 4, size=SAMPLES)
    inputs = (rng.normal(size=(4, 16))[targets] + rng.normal(scale=0.5, size=(SAMPLES, 16))).astype(np.float32)
    bad = [45, 170]  # one sample in chunk 1, one in chunk 4
    inputs[bad, 3] = np.nan
    nan_store = write_store(tmp_path / "nan.zarr", {"inputs": inputs, "targets": targets.astype(np.int64)},
                            chunk_size=CHUNK)
    out = tmp_path / "run"
    config = pp_config(nan_store, out, train={"epochs": 2, "on_nan": "skip_step"})

    plan = build_plan(config, resolve_splits(config))
    total = config.train.epochs * plan.steps_per_epoch
    expected = [t for t in range(total)
                if np.isin(bad, plan.epoch(t // plan.steps_per_epoch).global_batch(t % plan.steps_per_epoch)).any()]
    assert 0 < len(expected) < total

    result = train(config, client=client)
    assert result.completed
    steps = records(out, "step")
    assert [s["global_step"] for s in steps] == list(range(total))
    assert [s["global_step"] for s in steps if s.get("skipped")] == expected
    assert all(torch.isfinite(v).all() for v in saved_weights(out).values())


# -- c. a deleted chunk ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_deleted_chunk_is_named(client, tmp_path):
    damaged = synthetic_store(tmp_path / "blobs.zarr", samples=SAMPLES, features=16, classes=4, chunk=CHUNK)
    chunk_file = damaged / "inputs" / "c" / "2" / "0"  # zarr v3: chunk (2, 0) of the inputs
    assert chunk_file.is_file()
    chunk_file.unlink()
    out = tmp_path / "run"
    with pytest.raises(DataError) as err:
        train(pp_config(damaged, out), client=client)
    message = str(err.value)
    assert re.search(r"\bchunk 2\b", message) and "'inputs'" in message and str(damaged) in message, message
    assert not (out / "model.safetensors").exists()


# -- e. checkpoint pruning survives a crash between its rename and its delete ------------------------


class SimulatedCrash(BaseException):
    """The driver dying mid-delete (a BaseException: no ``except Exception`` handles it)."""


@pytest.mark.timeout(150)
def test_a_crash_while_pruning_leaves_only_whole_checkpoints(store, client, tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = pp_config(store, out, checkpoint={"every_steps": 1, "keep": 1})
    root = (out / "checkpoints").resolve()
    real_rmtree = shutil.rmtree
    crashed: list[Path] = []

    def crashing_rmtree(path, *args, **kwargs):
        path = Path(path)
        if crashed or path.resolve().parent != root or not (path / "state.json").is_file():
            return real_rmtree(path, *args, **kwargs)
        # The first delete of a written checkpoint dies half way: its parts are gone, state.json is not.
        crashed.append(path)
        for part in path.iterdir():
            if part.name != "state.json":
                part.unlink()
        raise SimulatedCrash(str(path))

    monkeypatch.setattr(shutil, "rmtree", crashing_rmtree)
    with pytest.raises(SimulatedCrash):
        train(config, client=client)
    assert crashed, "no checkpoint was deleted with shutil.rmtree: simulate the crash another way"
    monkeypatch.undo()

    def check_whole() -> list[Path]:
        listed = list_checkpoints(out)
        for ckpt in listed:
            manifest = json.loads((ckpt / "state.json").read_text())
            missing = [f for f in manifest["files"] if not (ckpt / f).is_file()]
            assert manifest["files"] and not missing, f"{ckpt} is listed but lacks {missing}"
        return listed

    assert check_whole()
    # And the run goes on from what is left.
    result = train(config, client=client, resume=True)
    assert result.completed
    assert len(check_whole()) == 1


# -- d. train.step_timeout for a frozen stage worker (its own cluster: one worker is stopped) --------


DEADLINE_S = 90.0
"""Far below the 600 s the pipeline driver once waited whatever the config said."""


@pytest.mark.timeout(240)
def test_frozen_stage_worker_stops_the_run_after_step_timeout(store, tmp_path):
    # No replacement can come: waiting train.worker_grace_s for one would only slow the test.
    config = pp_config(store, tmp_path / "run", train={"epochs": 4, "step_timeout": 5, "worker_grace_s": 2})
    outcome: dict[str, Any] = {}
    with local_client(2) as client:  # exactly P workers: no spare to recover on
        pids = client.run(os.getpid)
        victim = pids[sorted(pids)[1]]

        def freeze(event):
            if event["kind"] == "step" and event["global_step"] == 2 and "frozen_at" not in outcome:
                os.kill(victim, signal.SIGSTOP)
                outcome["frozen_at"] = time.monotonic()

        def run():
            try:
                outcome["result"] = train(config, client=client, on_event=freeze)
            except BaseException as exc:
                outcome["error"] = exc
            outcome["ended_at"] = time.monotonic()

        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        try:
            runner.join(DEADLINE_S + 30)
        finally:
            os.kill(victim, signal.SIGCONT)
        runner.join(60)  # woken, a run that was still waiting finishes or fails
    assert "frozen_at" in outcome, outcome
    assert "ended_at" in outcome, "the run neither ended nor failed after its stage worker was woken"
    elapsed = outcome["ended_at"] - outcome["frozen_at"]
    assert elapsed < DEADLINE_S, f"the run went on {elapsed:.0f} s after a stage worker froze (step_timeout=5)"
    error = outcome.get("error")
    assert isinstance(error, ClusterError), f"expected a ClusterError, got {outcome}"
    assert "step_timeout" in str(error), str(error)
