"""What users meet first, run as they run it: the example script and the benchmark runner.

``scripts/example.sh`` runs with ``PREFECT_API_URL`` removed from the environment, so the flow
reports to Prefect's embedded local API (what a user without a server gets), not to the server
the test command starts for the rest of the suite.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.compare import DEFAULT_MODES
from dasktrain.config import load_config
from dasktrain.models import build_model

REPO = Path(__file__).resolve().parents[1]


DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits.yaml"


def run_command(args: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run ``args`` in the repository in a session of its own; on timeout kill that session
    (the command and the cluster it started, by process group). Returns (exit code, output)."""
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(args)} did not finish in {timeout} s; its output:\n{tail(output)}")
    return proc.returncode, output


def tail(output: str, chars: int = 8000) -> str:
    return output if len(output) <= chars else "...\n" + output[-chars:]


@pytest.mark.timeout(600)
def test_example_script_trains_the_shipped_example_to_95_percent_with_the_local_prefect_api(tmp_path):
    """What a user runs first, as shipped (every epoch, on 2 workers), with Prefect's local API."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no profile of this machine's can name a server
    out = tmp_path / "run"
    command = ["bash", "scripts/example.sh", "--set", f"output_dir={out}"]
    code, output = run_command(command, env, timeout=540)
    context = f"{' '.join(command)} (exit {code}); its output:\n{tail(output)}"
    assert code == 0, context
    config = load_config(DIGITS, [f"output_dir={out}"])
    assert config.cluster.workers == 2
    n = config.train.epochs
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == list(range(n)), context
    assert [r["global_step"] for r in steps] == list(range(n * 23)), context  # 23 training chunks of 64 samples
    assert epochs[-1]["val_accuracy"] >= 0.95, epochs
    # The printed epoch table: its header and one row per epoch; then where the model went.
    assert re.search(r"epoch\s*┃\s*train loss\s*┃\s*val loss\s*┃\s*val accuracy", output), context
    rows = re.findall(r"^│\s+(\d+)\s+│\s+\d+\.\d+\s+│", output, flags=re.MULTILINE)
    assert rows == [str(e) for e in range(1, n + 1)], context
    assert f"model:   {out / 'model.safetensors'}" in output, context
    assert "runs/digits already holds a run" not in output, context
    weights = load_file(out / "model.safetensors")
    assert weights.keys() == build_model(config.model, config.train.seed).state_dict().keys()
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    assert load_config(out / "config.yaml") == config


@pytest.mark.timeout(300)
def test_benchmark_runner_prints_every_contender(tmp_path):
    figures = tmp_path / "bench.json"
    command = [sys.executable, "-m", "benchmarks", "--model", "mlp", "--workers", "2", "--batch", "64",
               "--samples", "256", "--epochs", "1", "--repeats", "1", "--ddp-in-dask", "--out", str(figures)]
    code, output = run_command(command, dict(os.environ), timeout=240)
    context = f"{' '.join(command)} (exit {code}); its output:\n{tail(output)}"
    assert code == 0, context
    expected = ["plain PyTorch (1 process, 2 threads)", "torch DDP gloo (2 processes)", "torch DDP gloo in Dask (2 workers)",
                *(f"dasktrain {mode} (2 workers)" for mode in DEFAULT_MODES)]
    results = json.loads(figures.read_text())["results"]
    assert sorted(results) == sorted(expected), context
    for name in expected:
        row = [line for line in output.splitlines() if line.startswith(name)]
        assert len(row) == 1 and "failed" not in row[0], f"row of {name!r}: {row}; {context}"
        assert all(isinstance(run, dict) for run in results[name]), f"{name}: {results[name]}; {context}"


def overhead_row(tmp_path: Path, *args: str, timeout: float) -> dict[str, float]:
    """Run the overhead benchmark for one worker with ``args``; its row of ms per step, once the
    printed table has that row with every column and both ratios."""
    figures = tmp_path / "overhead.json"
    command = [sys.executable, "-m", "benchmarks.overhead", *args, "--out", str(figures)]
    code, output = run_command(command, dict(os.environ), timeout=timeout)
    context = f"{' '.join(command)} (exit {code}); its output:\n{tail(output)}"
    assert code == 0, context
    assert re.search(r"^\s+1\s+\d+\.\d\s+\d+\.\d\s+\d+\.\d\s+\d+\.\dx\s+\d+\.\dx$", output, flags=re.MULTILINE), context
    row: dict[str, float] = json.loads(figures.read_text())["ms_per_step"]["1"]
    assert all(isinstance(v, float) and v > 0 for v in row.values()), row
    return row


@pytest.mark.timeout(240)
def test_overhead_benchmark_prints_a_row_per_worker_count(tmp_path):
    row = overhead_row(tmp_path, "--workers", "1", "--steps", "20", timeout=200)
    assert sorted(row) == ["collective", "ddp", "tree"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without a GPU")
def test_overhead_benchmark_on_cuda_without_a_gpu_says_so_and_exits_2():
    command = [sys.executable, "-m", "benchmarks.overhead", "--device", "cuda"]
    code, output = run_command(command, dict(os.environ), timeout=120)
    assert code == 2, f"{' '.join(command)} (exit {code}); its output:\n{tail(output)}"
    assert output.strip().splitlines() == [
        f"benchmarks.overhead: --device cuda, but torch {torch.__version__} sees no CUDA GPU; nothing is measured"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.timeout(300)
def test_overhead_benchmark_on_one_gpu_measures_dasktrain_against_a_plain_loop_on_it(tmp_path):
    row = overhead_row(tmp_path, "--device", "cuda", "--steps", "40", timeout=280)
    assert sorted(row) == ["collective", "plain", "tree"]
