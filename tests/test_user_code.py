"""The user's own code on the workers (README, "Your own code on the workers").

A local cluster sees the working directory the CLI is run from, with no ``PYTHONPATH``; workers
started elsewhere (an ``address`` cluster) get the code from ``model.upload``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from dasktrain.errors import ConfigError, DasktrainError
from dasktrain.run_loop import train
from tests.helpers import run_config, saved_weights, synthetic_store
from tests.processes import dask_processes
from tests.test_user_packages import DIGITS, dasktrain_command

TINY = '''"""The user's models."""
import torch


def tiny(in_features=64, out_features=10, hidden=(128,)):
    from {helpers} import WIDTH  # a package of the user's, uploaded beside this file
    # A shape no built-in model has: the test finds it in the saved weights.
    return torch.nn.Sequential(torch.nn.Linear(in_features, WIDTH), torch.nn.Tanh(), torch.nn.Linear(WIDTH, out_features))
'''

TINY_SHAPES = {"0.weight": (24, 64), "0.bias": (24,), "2.weight": (10, 24), "2.bias": (10,)}


def write_project(project: Path, module: str, helpers: str) -> Path:
    """``module.py`` and a package ``helpers/`` (which it imports) in the folder ``project``."""
    (project / helpers).mkdir(parents=True)
    (project / helpers / "__init__.py").write_text("WIDTH = 24\n")
    (project / f"{module}.py").write_text(TINY.format(helpers=helpers))
    return project


def shapes(run_dir: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in saved_weights(run_dir).items()}


@pytest.mark.timeout(240)
def test_the_cli_on_a_local_cluster_imports_the_factory_from_the_working_directory(digits_store: Path,
                                                                                   tmp_path: Path) -> None:
    project = write_project(tmp_path / "project", "mymodels", "mylayers")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FORCE_COLOR", "COLUMNS")}
    overrides = [f"data.store={digits_store}", f"output_dir={out}", "model.factory=mymodels:tiny",
                 "train.epochs=1", "cluster.workers=2", "cluster.dashboard=false", "checkpoint.every_steps=0"]
    result = subprocess.run([*dasktrain_command(), "run", str(DIGITS), *[a for o in overrides for a in ("--set", o)]],
                            cwd=project, env=env, capture_output=True, text=True, timeout=220)
    assert result.returncode == 0, result.stdout + result.stderr
    assert shapes(out) == TINY_SHAPES


@pytest.mark.timeout(240)
def test_model_upload_sends_the_code_to_workers_started_elsewhere(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    project = write_project(tmp_path / "project", "uploaded_models", "uploaded_layers")
    store = synthetic_store(tmp_path / "blobs.zarr", samples=600, features=64, classes=10, chunk=50)
    base = {"factory": "uploaded_models:tiny", "kwargs": {}}
    upload = [str(project / "uploaded_models.py"), str(project / "uploaded_layers")]
    # The workers start in this test's working directory, with its sys.path: not the project's.
    with dask_processes(tmp_path, workers=2) as address, Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=60)
        # The driver runs in the project (as the CLI would, from there): it checks the model.
        monkeypatch.syspath_prepend(str(project))
        try:
            _run_without_then_with_upload(client, store, tmp_path, base, upload)
        finally:  # the driver imported them: leave no trace for later tests
            for name in ("uploaded_models", "uploaded_layers"):
                sys.modules.pop(name, None)
    assert shapes(tmp_path / "with") == TINY_SHAPES


def _run_without_then_with_upload(client: Client, store: Path, tmp_path: Path, base: dict[str, Any],
                                  upload: list[str]) -> None:
    without = run_config(store, tmp_path / "without", model=base, train={"epochs": 1})
    with pytest.raises(DasktrainError) as caught:
        train(without, client=client)
    message = str(caught.value)
    assert "\n" not in message and "cannot import module 'uploaded_models'" in message, message

    config = run_config(store, tmp_path / "with", model={**base, "upload": upload}, train={"epochs": 1})
    train(config, client=client)
    # Workers that join later get every file too: restarted workers are new processes.
    client.restart(timeout=60)
    found = client.run(_importable, ["uploaded_models", "uploaded_layers"])
    assert len(found) == 2 and all(found.values()), found


def _importable(names: list[str]) -> bool:
    import importlib

    return all(importlib.import_module(name) is not None for name in names)


def test_an_upload_path_that_does_not_exist_is_one_config_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.py")
    with pytest.raises(ConfigError, match=r"model\.upload.*nowhere\.py does not exist") as caught:
        run_config(tmp_path / "store.zarr", tmp_path / "run", model={"upload": missing})
    assert "\n" not in str(caught.value)
