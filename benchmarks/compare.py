"""Side-by-side throughput: plain PyTorch, torch DDP (gloo) and dasktrain, in one invocation.

Every contender trains the same model on the same Zarr data with the same global batch; the
table reports samples/s, step time, time waiting for data and for the reduction, and ratios
against plain PyTorch and DDP. Timings are medians over the steady-state steps of each run,
and the whole comparison is repeated ``--repeats`` times (medians of the repeats are printed):
these machines are shared and noisy, so only ratios measured side by side mean anything.

    python -m benchmarks.compare --model mlp --workers 2
    python -m benchmarks.compare --model cnn --workers 2 --batch 256
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import zarr

from pipeline.config import RunConfig, validate_config
from pipeline.driver import train
from pipeline.ingest import write_store
from pipeline.metrics import read_metrics
from pipeline.models import build_model

MODELS = {
    "mlp": ({"factory": "pipeline.models:mlp",
             "kwargs": {"in_features": 784, "out_features": 10, "hidden": [1024, 1024]}}, (784,)),
    "cnn": ({"factory": "pipeline.models:cnn",
             "kwargs": {"in_channels": 3, "num_classes": 10, "image_size": 32}}, (3, 32, 32)),
}


def make_store(folder: Path, shape: tuple[int, ...], samples: int, chunk: int) -> Path:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 10, samples).astype(np.int64)
    inputs = rng.normal(size=(samples, *shape)).astype(np.float32)
    return write_store(folder / "bench.zarr", {"inputs": inputs, "targets": targets}, chunk_size=chunk)


def bench_config(args: argparse.Namespace, store: Path, out: Path, **train: Any) -> RunConfig:
    model, _ = MODELS[args.model]
    return validate_config({
        "data": {"store": str(store)},
        "model": model,
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "train": {"epochs": args.epochs, "batch_size": args.batch, "shards": args.shards, "seed": 0, **train},
        "cluster": {"workers": args.workers, "threads_per_worker": 1, "dashboard": False},
        "output_dir": str(out),
    })


def steady(values: list[float]) -> float:
    """Median of the second half: after warm-up, prefetch and caches have settled."""
    return statistics.median(values[len(values) // 2:])


# -- plain PyTorch -----------------------------------------------------------------------------

def run_plain(config: RunConfig, threads: int, steps: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    group = zarr.open_group(config.data.store, mode="r")
    inputs, targets = np.asarray(group["inputs"][:]), np.asarray(group["targets"][:])
    model = build_model(config.model, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        idx = rng.choice(len(inputs), config.train.batch_size, replace=False)
        x, y = torch.from_numpy(inputs[idx]), torch.from_numpy(targets[idx])
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    step = steady(times)
    return {"samples_per_s": config.train.batch_size / step, "step_s": step, "data_s": 0.0, "reduce_s": 0.0}


# -- torch DDP -------------------------------------------------------------------------------------

def _ddp_worker(rank: int, world: int, port: int, config: RunConfig, steps: int, out: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = zarr.open_group(config.data.store, mode="r")
    inputs, targets = np.asarray(group["inputs"][:]), np.asarray(group["targets"][:])
    model = torch.nn.parallel.DistributedDataParallel(build_model(config.model, 0))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    local = config.train.batch_size // world
    rng = np.random.default_rng(rank)
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        idx = rng.choice(len(inputs), local, replace=False)
        x, y = torch.from_numpy(inputs[idx]), torch.from_numpy(targets[idx])
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()  # DDP all-reduces the gradients in buckets during backward
        opt.step()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(steady(times))
    dist.destroy_process_group()


def run_ddp(config: RunConfig, world: int, steps: int) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(world, port, config, steps, out), nprocs=world, join=True,
                       start_method="spawn")
    step = out.get(timeout=60)
    return {"samples_per_s": config.train.batch_size / step, "step_s": step, "data_s": 0.0, "reduce_s": float("nan")}


# -- dasktrain -------------------------------------------------------------------------------------

def run_dasktrain(config: RunConfig) -> dict[str, float]:
    train(config)
    steps = [r for r in read_metrics(Path(config.output_dir)) if r["kind"] == "step"]
    step = steady([r["step_time_s"] for r in steps])
    data = steady([r["data_wait_s"] for r in steps])
    compute = steady([r["compute_s"] for r in steps])
    return {"samples_per_s": config.train.batch_size / step, "step_s": step, "data_s": data,
            "reduce_s": max(step - compute - data, 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: mlp 4096, cnn 256)")
    parser.add_argument("--samples", type=int, default=None, help="store size (default: 24 global batches)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--shards", type=int, default=None, help="default: workers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="fast,deterministic", help="dasktrain modes to run")
    args = parser.parse_args()
    args.batch = args.batch or (4096 if args.model == "mlp" else 256)
    args.shards = args.shards or args.workers
    samples = args.samples or 24 * args.batch
    _, shape = MODELS[args.model]
    modes = [m for m in args.modes.split(",") if m]

    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp), shape, samples, chunk=max(64, args.batch // args.shards))
        steps = args.epochs * (samples // args.batch)
        for repeat in range(args.repeats):
            base = bench_config(args, store, Path(tmp) / f"r{repeat}")
            results.setdefault("plain PyTorch (1 process)", []).append(run_plain(base, args.workers, steps))
            results.setdefault(f"torch DDP gloo ({args.workers} processes)", []).append(run_ddp(base, args.workers, steps))
            for mode in modes:
                cfg = bench_config(args, store, Path(tmp) / f"r{repeat}-{mode}", deterministic=mode == "deterministic")
                results.setdefault(f"dasktrain {mode} ({args.workers} workers)", []).append(run_dasktrain(cfg))

    print(f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"model {args.model}, global batch {args.batch}, {samples} samples, {args.workers} workers/processes, "
          f"{args.repeats} repeats (medians)\n")
    plain = statistics.median(r["samples_per_s"] for r in results["plain PyTorch (1 process)"])
    ddp = statistics.median(r["samples_per_s"] for r in results[f"torch DDP gloo ({args.workers} processes)"])
    header = f"{'contender':36} {'samples/s':>10} {'step ms':>8} {'data ms':>8} {'reduce ms':>9} {'vs plain':>8} {'vs DDP':>7}"
    print(header)
    print("-" * len(header))
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{name:36} {med['samples_per_s']:10.0f} {1e3 * med['step_s']:8.1f} {1e3 * med['data_s']:8.1f} "
              f"{1e3 * med['reduce_s']:9.1f} {med['samples_per_s'] / plain:8.2f} {med['samples_per_s'] / ddp:7.2f}")


if __name__ == "__main__":
    main()
