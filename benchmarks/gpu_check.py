"""The GPU check: run the ``gpu`` tests and a short GPU benchmark on a machine with a GPU.

    python benchmarks/gpu_check.py --wheels /path/to/wheels [--out results.json]

The machine may have torch with CUDA but not the rest of dasktrain's stack (dask, distributed,
dask-cuda, zarr, ...). Whatever is missing is installed from the folder of wheels (``--wheels``,
or ``DASKTRAIN_WHEELS``) with ``pip --no-index``: nothing comes over the network, and an installed
torch is kept as it is. The project itself is used from this checkout (``PYTHONPATH``).

Figures (JSON, also printed): the pytest summary of ``-m gpu``, and samples/s of
  - one replica's forward/backward/step on this GPU, fp32 and bf16 (``dasktrain.device.Placement``);
  - dasktrain end to end on ``local-cuda`` (one worker per GPU, up to 4) over a synthetic store;
  - a 2-stage pipeline on one GPU (two workers sharing it) per schedule: samples/s, measured
    pipeline efficiency against its bound, each stage's peak GPU memory;
  - the runner on one GPU (``python -m benchmarks --device cuda``) for the MLP and the CNN, tree
    and collective read per step and per segment against a plain loop on the GPU, and the
    per-step floor (``python -m benchmarks.overhead --device cuda``), each with its printed
    table.
``--part tests`` runs the tests and the first three, ``--part runner`` the last; the default runs
both, which can take longer than the ten minutes one command may have on a lent GPU machine.
Exit status: 0 when the tests and the runner commands pass, 1 when one fails, 2 when there is no
GPU or a package is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

NEEDED = {  # import name -> requirement pip installs from the wheel folder when it is missing
    "dask": "dask[distributed]>=2026.7.1,<2027",
    "distributed": "distributed>=2026.7.1,<2027",
    "dask_cuda": "dask-cuda==26.10.*",
    "zarr": "zarr>=3.0,<4",
    "numpy": "numpy>=1.26",
    "pydantic": "pydantic>=2.6",
    "yaml": "pyyaml>=6",
    "safetensors": "safetensors>=0.4",
    "sklearn": "scikit-learn>=1.3",
    "rich": "rich>=13",
    "typer": "typer>=0.12",
    "pytest": "pytest>=8",
    "pytest_timeout": "pytest-timeout>=2.3",
}


def install_missing(wheels: str | None) -> list[str]:
    """Install the missing requirements from ``wheels``; returns what was installed."""
    missing = [req for name, req in NEEDED.items() if importlib.util.find_spec(name) is None]
    if not missing:
        return []
    if not wheels or not Path(wheels).is_dir():
        sys.exit(f"gpu_check: missing {', '.join(missing)} and no wheel folder (--wheels or DASKTRAIN_WHEELS) to "
                 "install them from" + (f": {wheels} is not a folder" if wheels else ""))
    print(f"gpu_check: installing from {wheels}: {' '.join(missing)}", flush=True)
    # No --upgrade: an installed torch (with its CUDA) satisfies torch>=2.4 and stays.
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels, *missing]
    if subprocess.run(cmd).returncode != 0:
        sys.exit(2)
    importlib.invalidate_caches()
    return missing


def run_tests(timeout: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_gpu.py"), str(ROOT / "tests" / "test_clusters.py"),
           str(ROOT / "tests" / "test_pipeline_gpu.py"), str(ROOT / "tests" / "test_user_paths.py")]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    print("\n".join(tail), flush=True)
    return {"returncode": proc.returncode, "seconds": round(time.perf_counter() - started, 1), "tail": tail}


def bench_replica(steps: int) -> dict[str, Any]:
    """Forward/backward/optimizer step of one MLP replica on this GPU, fp32 and bf16."""
    import torch

    from dasktrain.device import Placement

    results: dict[str, Any] = {}
    batch, width = 4096, 2048
    x_host = torch.randn(batch, 1024).numpy()
    y_host = torch.randint(0, 100, (batch,)).numpy()
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        place = Placement(precision)
        model = place.model(torch.nn.Sequential(
            torch.nn.Linear(1024, width), torch.nn.GELU(), torch.nn.Linear(width, width), torch.nn.GELU(),
            torch.nn.Linear(width, 100)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(5):  # warm-up: kernels, allocator, pinned buffers
            _train_step(place, model, opt, x_host, y_host)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            _train_step(place, model, opt, x_host, y_host)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        results[precision] = {"samples_per_s": round(steps * batch / elapsed), "step_ms": round(1e3 * elapsed / steps, 2)}
    results["bf16_over_fp32"] = round(results["bf16"]["samples_per_s"] / results["fp32"]["samples_per_s"], 2)
    results["device"] = torch.cuda.get_device_name(0)
    return results


def _train_step(place: Any, model: Any, opt: Any, x_host: Any, y_host: Any) -> None:
    """One step the way a replica takes it: pinned async copies in, autocast forward, fp32 loss."""
    import torch

    x, y = place.to_device(x_host, "inputs"), place.to_device(y_host, "targets")
    with place.autocast():
        out = model(x)
    loss = torch.nn.functional.cross_entropy(out.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bench_local_cuda(workdir: Path) -> dict[str, Any]:
    """dasktrain end to end on local-cuda: one epoch over a synthetic store, then a second (timed)."""
    import numpy as np
    import torch

    from dasktrain.config import validate_config
    from dasktrain.ingest import write_store
    from dasktrain.run_loop import train

    workers = max(1, min(torch.cuda.device_count(), 4))
    rng = np.random.default_rng(0)
    samples, features = 131_072, 256
    targets = rng.integers(0, 10, samples)
    inputs = (rng.normal(size=(10, features))[targets] + rng.normal(scale=0.5, size=(samples, features)))
    store = write_store(workdir / "bench.zarr", {"inputs": inputs.astype(np.float32), "targets": targets},
                        chunk_size=4096)
    config = validate_config({
        "data": {"store": str(store)},
        "model": {"factory": "dasktrain.models:mlp",
                  "kwargs": {"in_features": features, "out_features": 10, "hidden": [1024, 1024]}},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "train": {"epochs": 2, "batch_size": 4096, "shards": 4 * workers, "seed": 0},
        "cluster": {"kind": "local-cuda", "workers": workers, "dashboard": False},
        "output_dir": str(workdir / "run"),
    })
    started = time.perf_counter()
    result = train(config)
    return {"workers": workers, "wall_s": round(time.perf_counter() - started, 1),
            "epochs": [{k: e.get(k) for k in ("epoch", "samples_per_s", "train_loss", "time_s")} for e in result.epochs]}


def bench_pipeline_two_stages(workdir: Path, samples: int = 32_768, width: int = 2048, batch: int = 2048) -> dict[str, Any]:
    """A 2-stage pipeline on one GPU (two worker processes sharing it), per schedule: samples/s,
    the measured pipeline efficiency against its bound, and each stage's peak GPU memory."""
    import numpy as np
    from distributed import Client, LocalCluster

    from dasktrain.config import validate_config
    from dasktrain.ingest import write_store
    from dasktrain.run_loop import train

    rng = np.random.default_rng(0)
    features = 512
    targets = rng.integers(0, 10, samples)
    inputs = rng.normal(size=(10, features))[targets] + rng.normal(scale=0.5, size=(samples, features))
    store = write_store(workdir / "pipe.zarr", {"inputs": inputs.astype(np.float32), "targets": targets},
                        chunk_size=batch)
    out: dict[str, Any] = {}
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        for schedule in ("gpipe", "1f1b", "zb-h1"):
            config = validate_config({
                "data": {"store": str(store)},
                "model": {"factory": "dasktrain.models:mlp",
                          "kwargs": {"in_features": features, "out_features": 10, "hidden": [width] * 4}},
                "optimizer": {"name": "adamw", "lr": 1e-3},
                "train": {"epochs": 1, "batch_size": batch, "shards": 4, "seed": 0},
                "parallel": {"pipeline": 2, "micro_batches": 8, "schedule": schedule},
                "cluster": {"workers": 2, "dashboard": False},
                "output_dir": str(workdir / f"pipe-{schedule}"),
            })
            events: list[dict[str, Any]] = []
            started = time.perf_counter()
            train(config, client=client, on_event=events.append)
            wall = time.perf_counter() - started
            steps = [e for e in events if e["kind"] == "step"][2:]
            out[schedule] = {
                "wall_s": round(wall, 1),
                "samples_per_s": round(len(steps) * batch / sum(e["step_time_s"] for e in steps)) if steps else None,
                "efficiency": round(sum(e["pipeline_efficiency"] for e in steps) / max(len(steps), 1), 3),
                "bound": round(sum(e["efficiency_bound"] for e in steps) / max(len(steps), 1), 3),
            }
        out["gpu_peak_mib"] = {w: round(b / 2**20) for w, b in client.run(_cuda_peak).items()}
    return out


PARTS = ("all", "tests", "runner")
"""What ``--part`` runs (see :func:`main`)."""

RUNNER_COMMANDS = {
    "runner_mlp": ["-m", "benchmarks", "--device", "cuda", "--model", "mlp", "--repeats", "3",
                   "--modes", "tree,collective-step,collective-segment"],
    "runner_cnn": ["-m", "benchmarks", "--device", "cuda", "--model", "cnn", "--repeats", "3",
                   "--modes", "tree,collective-step,collective-segment"],
    "overhead": ["-m", "benchmarks.overhead", "--device", "cuda"],
}
"""The one-GPU comparisons against a plain loop on the GPU, each run as a user runs it."""


def bench_runner(workdir: Path, timeout: int) -> dict[str, Any]:
    """Run :data:`RUNNER_COMMANDS`; each one's figures (its ``--out`` JSON) and printed table."""
    results: dict[str, Any] = {}
    for name, args in RUNNER_COMMANDS.items():
        out = workdir / f"{name}.json"
        started = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, *args, "--out", str(out)], cwd=ROOT, env=_env(),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            results[name] = {"error": f"did not finish in {timeout} s"}
            continue
        table = proc.stdout.strip().splitlines()[-12:]
        print(f"gpu_check: {name}\n" + "\n".join(table), flush=True)
        results[name] = {"returncode": proc.returncode, "seconds": round(time.perf_counter() - started, 1),
                         "table": table, "stderr_tail": proc.stderr.strip().splitlines()[-5:],
                         "figures": json.loads(out.read_text()) if out.exists() else None}
    return results


def _cuda_peak() -> int:
    import torch

    return int(torch.cuda.max_memory_allocated(0))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", default=os.environ.get("DASKTRAIN_WHEELS"), help="folder of wheels for missing packages")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    parser.add_argument("--steps", type=int, default=50, help="timed steps of the replica benchmark")
    parser.add_argument("--test-timeout", type=int, default=420)
    parser.add_argument("--part", choices=PARTS, default="all",
                        help="tests: the gpu tests and the short benchmarks; runner: the one-GPU comparisons "
                             "against a plain loop; all: both (split them where one command may run ten minutes)")
    parser.add_argument("--runner-timeout", type=int, default=240, help="seconds for each runner command")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA GPU; nothing to check", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
                    "installed": install_missing(args.wheels), "part": args.part}
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("all", "tests"):
            report["tests"] = run_tests(args.test_timeout)
            failed = report["tests"]["returncode"] != 0
            report["replica"] = bench_replica(args.steps)
            try:
                report["local_cuda"] = bench_local_cuda(Path(tmp))
            except Exception as exc:  # report it beside the other figures rather than lose them
                report["local_cuda"] = {"error": f"{type(exc).__name__}: {exc}"}
            try:
                report["pipeline_two_stages"] = bench_pipeline_two_stages(Path(tmp))
            except Exception as exc:
                report["pipeline_two_stages"] = {"error": f"{type(exc).__name__}: {exc}"}
        if args.part in ("all", "runner"):
            report["one_gpu_vs_plain"] = bench_runner(Path(tmp), args.runner_timeout)
            failed = failed or any(r.get("returncode") != 0 for r in report["one_gpu_vs_plain"].values())
    Path(args.out).write_text(json.dumps(report, indent=1))
    # The runner's tables were printed as they came; its figures are in the file.
    print(json.dumps({k: v for k, v in report.items() if k not in ("tests", "one_gpu_vs_plain")}, indent=1))
    print(f"gpu_check: results in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
