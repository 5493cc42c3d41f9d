"""A user's own ``pipeline``, ``flows`` and ``cluster`` packages do not shadow dasktrain (DESIGN.md, Layout).

Users name their folders ``pipeline/`` too. Here they sit first on ``PYTHONPATH`` (the driver and
its worker processes, which inherit the environment, all see them first) and the run is started
from the user's project folder, as a user would: the CLI must still start, and a run must build
the model from the user's own ``pipeline.mymodels`` on the workers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits.yaml"

MYMODELS = '''"""The user's models."""
import torch


def tiny(in_features=64, out_features=10, hidden=(128,)):
    # A shape no built-in model has: the test finds it in the saved weights.
    return torch.nn.Sequential(torch.nn.Linear(in_features, 24), torch.nn.Tanh(), torch.nn.Linear(24, out_features))
'''


@pytest.fixture
def user_project(tmp_path: Path) -> Path:
    """A user's project folder with packages named like dasktrain's folders."""
    project = tmp_path / "project"
    for name in ("pipeline", "flows", "cluster"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(f'"""The user\'s own {name} package."""\nOWNER = "user"\n')
    (project / "pipeline" / "mymodels.py").write_text(MYMODELS)
    return project


def user_env(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "COLUMNS")}
    env["NO_COLOR"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(project), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def dasktrain_command() -> list[str]:
    """The installed console script (as a user runs it), else the module."""
    script = Path(sys.executable).with_name("dasktrain")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dasktrain.cli"]


def run_in(project: Path, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=project, env=user_env(project), capture_output=True, text=True, timeout=timeout)


def test_the_users_packages_come_first_in_this_setup(user_project: Path) -> None:
    # Guard against a vacuous pass: in this environment the bare names are the user's packages.
    probe = "import pipeline, flows, cluster, pipeline.mymodels; print(pipeline.OWNER, flows.OWNER, cluster.OWNER)"
    result = run_in(user_project, [sys.executable, "-c", probe], timeout=60)
    assert result.returncode == 0 and result.stdout.split() == ["user"] * 3, result.stdout + result.stderr


def test_help_works_beside_the_users_packages(user_project: Path) -> None:
    result = run_in(user_project, [*dasktrain_command(), "--help"], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "run" in result.stdout and "ingest" in result.stdout


@pytest.mark.timeout(240)
def test_run_trains_the_users_model_beside_the_users_packages(user_project: Path, digits_store: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = [f"data.store={digits_store}", f"output_dir={out}", "model.factory=pipeline.mymodels:tiny",
                 "train.epochs=1", "cluster.workers=2", "cluster.dashboard=false", "checkpoint.every_steps=0"]
    result = run_in(user_project, [*dasktrain_command(), "run", str(DIGITS),
                                   *[a for o in overrides for a in ("--set", o)]], timeout=220)
    assert result.returncode == 0, result.stdout + result.stderr
    weights = load_file(out / "model.safetensors")
    # The user's tiny model, built by the workers from the user's pipeline package.
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "0.weight": (24, 64), "0.bias": (24,), "2.weight": (10, 24), "2.bias": (10,)}


@pytest.mark.timeout(120)
def test_a_config_with_the_old_module_names_gets_one_line_naming_the_new_spelling(digits_store: Path,
                                                                                   tmp_path: Path) -> None:
    # No package named pipeline here: the old built-in spelling must say what it is called now.
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([*dasktrain_command(), "run", str(DIGITS), "--set", f"data.store={digits_store}",
                             "--set", f"output_dir={out}", "--set", "model.factory=pipeline.models:mlp"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "write dasktrain.models:mlp" in lines[-1], lines[-3:]
    assert not out.exists()
