"""``predict`` replaces only a store that ``predict`` wrote, and a failed predict leaves no trace.

Refused, with one line naming the path and exit code 1 from the CLI, and nothing changed: a run
directory, the input store (even without --overwrite), a store predict did not write, a plain
directory, a file. Replacing predict's own output still works; a model that does not fit the
store, or fails on the workers, leaves no temporary store and the old output as it was.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zarr
from distributed import Client
from safetensors.torch import save_file
from torch import nn

from dasktrain.config import RunConfig
from dasktrain.errors import DataError
from dasktrain.inference import WRITTEN_BY, predict
from dasktrain.models import build_model
from dasktrain.store import ATTRS_KEY
from tests.helpers import local_client, run_config, synthetic_store

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


class _FailsOnData(nn.Module):
    """Takes any shape on the ``meta`` device (predict's shape check), fails on real data."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "meta":
            raise RuntimeError("injected failure on the worker")
        return x


def fails_on_data() -> nn.Module:
    return nn.Sequential(_FailsOnData(), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with local_client(1) as c:
        yield c


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A store, a run directory with its model (no training: predict needs only the weights) and
    the run's config file."""
    tmp = tmp_path_factory.mktemp("predict")
    store = synthetic_store(tmp / "data.zarr", samples=200, features=64, classes=10, chunk=50)
    run_dir = tmp / "runs" / "somerun"
    config = run_config(store, run_dir, cluster={"workers": 1, "dashboard": False})
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config.to_yaml())
    (run_dir / "metrics.jsonl").write_text('{"kind": "epoch", "epoch": 0}\n')
    save_file(build_model(config.model, config.train.seed).state_dict(), str(run_dir / "model.safetensors"))
    (tmp / "run.yaml").write_text(config.to_yaml())
    return {"tmp": tmp, "store": store, "run_dir": run_dir, "config": config, "config_file": tmp / "run.yaml"}


def snapshot(path: Path) -> dict[str, str]:
    """Every file and folder under ``path`` (or the file itself) with the hash of its bytes."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def refused(config: RunConfig, client: Client, run_dir: Path, source: Path, target: Path, overwrite: bool) -> str:
    """Predict onto ``target`` must fail with one line naming it, and leave it as it was."""
    before = snapshot(target) if target.exists() else None
    with pytest.raises(DataError) as caught:
        predict(client, config, run_dir, source, target, overwrite=overwrite)
    message = str(caught.value)
    assert "\n" not in message and str(target) in message, message
    assert (snapshot(target) if target.exists() else None) == before
    assert leftovers(target.parent) == []
    return message


def test_cli_refuses_a_run_directory_and_the_input_store(setup: dict[str, Any]) -> None:
    run_dir, store = setup["run_dir"], setup["store"]
    before = {"run": snapshot(run_dir), "store": snapshot(store)}
    env = {**{k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "COLUMNS")}, "NO_COLOR": "1"}
    cases = [(run_dir, ["--overwrite"], "is a run directory"), (store, [], "is the input store")]
    for target, flags, reason in cases:
        done = subprocess.run([str(ROOT / ".venv" / "bin" / "dasktrain"), "predict", str(setup["config_file"]),
                               "--checkpoint", str(run_dir), "--input", str(store), "--output", str(target), *flags],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
        output = done.stdout + done.stderr
        assert done.returncode == 1 and "Traceback" not in output, output
        lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and str(target) in lines[0] and reason in lines[0], output
    assert {"run": snapshot(run_dir), "store": snapshot(store)} == before


def test_refusals(setup: dict[str, Any], client: Client) -> None:
    config, run_dir, store, tmp = setup["config"], setup["run_dir"], setup["store"], setup["tmp"]
    other = synthetic_store(tmp / "other.zarr", samples=100, features=64, classes=10, chunk=50)
    plain = tmp / "plain"
    (plain / "sub").mkdir(parents=True)
    (plain / "notes.txt").write_text("keep me")
    afile = tmp / "file.bin"
    afile.write_bytes(b"\x00\x01")
    cases = [
        (run_dir, True, "is a run directory (holds config.yaml, checkpoints, model.safetensors, metrics.jsonl)"),
        (store, True, "is the input store"),
        (store, False, "is the input store"),
        (store / "predictions", False, "lies inside the input store"),
        (tmp, True, "contains the input store"),
        (other, True, "is a Zarr store that predict did not write"),
        (other, False, "is a Zarr store that predict did not write"),
        (other / "inputs", True, "lies inside the Zarr store"),
        (plain, True, "is a directory, not a Zarr store"),
        (afile, True, "is a file, not a Zarr store"),
    ]
    for target, overwrite, reason in cases:
        assert reason in refused(config, client, run_dir, store, target, overwrite), target
    # The training store of the config is protected even when the input is another store.
    message = refused(config, client, run_dir, other, store, True)
    assert "is the training store" in message


def test_overwrite_of_predicts_own_store(setup: dict[str, Any], client: Client) -> None:
    config, run_dir, store, tmp = setup["config"], setup["run_dir"], setup["store"], setup["tmp"]
    out = tmp / "out" / "predictions.zarr"
    written = predict(client, config, run_dir, store, out)
    assert written["samples"] == 200 and written["arrays"] == ["labels", "predictions"]
    attrs = zarr.open_group(str(out), mode="r").attrs[ATTRS_KEY]
    assert attrs["written_by"] == WRITTEN_BY
    assert "already exists; pass --overwrite" in refused(config, client, run_dir, store, out, False)
    assert predict(client, config, run_dir, store, out, overwrite=True)["samples"] == 200
    assert leftovers(out.parent) == []
    # A predict store that someone put another file into is no longer predict's alone.
    (out / "README").write_text("mine")
    assert "holds README besides the predictions" in refused(config, client, run_dir, store, out, True)


@pytest.mark.parametrize("model", [
    {"factory": "dasktrain.models:mlp", "kwargs": {"in_features": 65, "out_features": 10}},  # fails on the driver
    {"factory": "tests.test_predict_safety:fails_on_data", "kwargs": {}},  # fails on the workers
])
def test_failed_predict_leaves_no_trace(setup: dict[str, Any], client: Client, model: dict[str, Any]) -> None:
    config, run_dir, store, tmp = setup["config"], setup["run_dir"], setup["store"], setup["tmp"]
    out = tmp / "kept" / "predictions.zarr"
    if not out.exists():
        predict(client, config, run_dir, store, out)
    before = snapshot(out)
    bad = config.model_copy(update={"model": config.model.model_validate(model)})
    weights = tmp / "bad-model.safetensors"
    save_file(build_model(bad.model, 0).state_dict(), str(weights))
    with pytest.raises((DataError, RuntimeError)) as caught:
        predict(client, bad, weights, store, out, overwrite=True)
    if isinstance(caught.value, DataError):
        assert "\n" not in str(caught.value) and "cannot take inputs of shape (64,)" in str(caught.value)
    else:
        assert "injected failure" in str(caught.value)
    assert snapshot(out) == before
    assert leftovers(out.parent) == []
