"""Side-by-side throughput: plain PyTorch, torch DDP (gloo) and dasktrain's modes, in one invocation.

    python -m benchmarks --model mlp --workers 2
    python -m benchmarks --model cnn --workers 2 --batch 256 --modes tree,collective --repeats 5
    python -m benchmarks --device cuda --model cnn          # one GPU: dasktrain (1 worker) vs plain

Every contender trains the same model (``--model``) with the same optimizer (SGD, momentum 0.9)
and global batch (``--batch``) on the same synthetic Zarr store, written once per invocation:

- ``plain``: one process, the store loaded into memory with ``zarr`` as a user of a plain loop
  would, shuffled once per epoch, ``workers x threads`` torch threads (the CPUs dasktrain gets);
- ``DDP``: ``--workers`` processes of ``DistributedDataParallel`` over gloo, each with the whole
  store in memory, taking its slice of the same global batches, ``--threads`` torch threads each;
- ``DDP in Dask`` (``--ddp-in-dask``): the same DDP loop, one rank per worker as a Dask task, on
  the LocalCluster a dasktrain run starts. Its ratio to DDP is what Dask's worker processes
  (their event loops, heartbeats, nannies, scheduler) cost any loop run inside them; dasktrain's
  ratio to it is dasktrain's own;
- ``dasktrain <mode>``: ``dasktrain.run_loop.train`` on a fresh LocalCluster of ``--workers`` worker
  processes of ``--threads`` threads each, for each mode of ``MODES`` (``--modes``):
  ``tree`` (``reduce: tree``, fast mode), ``tree-bf16`` (the same, ``grad_transfer: bf16``) and
  ``collective`` (``reduce: collective``) by default; ``collective-step`` and
  ``collective-segment`` set its ``train.host_reads`` (``collective`` takes ``auto``: ``segment``
  on a GPU, ``step`` on a CPU). With ``data.cache`` on (``--no-cache``: off) and
  ``train.accumulate`` from ``--accumulate`` (the baselines always take a batch in one pass).

A contender that raises is one row ``failed: <reason>``; the others still run.

Columns (each a median over the steady-state steps of a run, the second half of its steps, i.e.
the later epochs; then the median over ``--repeats`` runs, which are interleaved so that every
contender meets the same noise of a shared machine):

- ``samples/s``: global batch / step time;
- ``step ms``: one optimizer step. Plain and DDP: timed in the loop (DDP: rank 0). dasktrain
  ``tree``: the interval between two steps' results at the driver (steps are submitted ahead, so
  this is the throughput interval). ``collective``: timed on the workers, inside the task that
  runs a segment of many steps, then stretched so that a segment's steps add up to the interval
  between two segments' results at the driver (the hand-over between segments counts too);
- ``data ms``: waiting for the batch. Plain and DDP: gathering it from the arrays in memory.
  dasktrain: ``data_wait_s`` of the step record, the time a replica waited on its prefetching
  feed (tree: the slowest worker; collective: the mean over ranks);
- ``data %``: data wait as a share of the step (the target is under 5% after the first epoch);
- ``reduce ms``: waiting for the gradient sum. ``collective``: ``reduce_s`` of the step record,
  the time in the all-reduces, including waiting for the slowest rank. ``tree``: derived, as
  ``step_time_s - compute_s - data_wait_s`` (clipped at 0), the part of the step interval that is
  neither the slowest worker's compute nor its data wait: reduction tasks, gradient transfer,
  applying the update and scheduling. DDP: ``-`` (its all-reduce overlaps backward, inside the
  step); plain: 0;
- ``vs plain``, ``vs DDP``: samples/s over plain's and DDP's.

With ``--device cuda`` (a CUDA GPU visible to torch), the comparison is on one GPU: dasktrain with
one worker (``local-cuda`` when dask-cuda is installed, else a LocalCluster of one worker process,
which finds ``cuda:0`` as well) against the plain loop on the same GPU, whose whole dataset sits
on the GPU (the strongest plain baseline); DDP is skipped. Without a GPU it says so and exits 2.

Speed is never asserted in tests: these machines are shared and noisy, so only ratios measured
side by side mean anything. ``--out`` writes the figures and the machine as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import socket
import statistics
import sys
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

from dasktrain.allocator import keep_freed_memory
from dasktrain.cluster.specs import open_cluster
from dasktrain.config import RunConfig, validate_config
from dasktrain.ingest import write_store
from dasktrain.metrics import read_metrics
from dasktrain.models import build_model
from dasktrain.objective import build_optimizer
from dasktrain.run_loop import train

MODELS = {
    "mlp": ({"factory": "dasktrain.models:mlp",
             "kwargs": {"in_features": 784, "out_features": 10, "hidden": [1024, 1024]}}, (784,)),
    # Compute near zero: a step's time is the orchestration around it (benchmarks/overhead.py).
    "tiny": ({"factory": "dasktrain.models:mlp",
              "kwargs": {"in_features": 16, "out_features": 10, "hidden": [16]}}, (16,)),
    "cnn": ({"factory": "dasktrain.models:cnn",
             "kwargs": {"in_channels": 3, "num_classes": 10, "image_size": 32}}, (3, 32, 32)),
}

MODES: dict[str, dict[str, Any]] = {  # dasktrain mode -> its train settings
    "tree": {"reduce": "tree"},
    "tree-bf16": {"reduce": "tree", "grad_transfer": "bf16"},
    "collective": {"reduce": "collective"},
    # train.host_reads set either way ("collective" takes auto: segment on a GPU, step on a CPU).
    "collective-step": {"reduce": "collective", "host_reads": "step"},
    "collective-segment": {"reduce": "collective", "host_reads": "segment"},
}
DEFAULT_MODES = ("tree", "tree-bf16", "collective")
"""The modes a runner invocation runs unless ``--modes`` names others."""

Timing = dict[str, float]
"""One run's figures: samples_per_s, step_s, data_s, data_pct, reduce_s (nan: not measured)."""


def machine() -> dict[str, Any]:
    """What the figures were measured on: they mean nothing without it."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
            "torch": torch.__version__, "gpus": gpus,
            "load_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def make_store(folder: Path, shape: tuple[int, ...], samples: int, chunk: int) -> Path:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 10, samples).astype(np.int64)
    inputs = rng.normal(size=(samples, *shape)).astype(np.float32)
    return write_store(folder / "bench.zarr", {"inputs": inputs, "targets": targets}, chunk_size=chunk)


def bench_config(args: argparse.Namespace, store: Path, out: Path, mode: str = "tree") -> RunConfig:
    model, _ = MODELS[args.model]
    cluster: dict[str, Any] = {"workers": args.workers, "threads_per_worker": args.threads, "dashboard": False}
    if args.device == "cuda" and importlib.util.find_spec("dask_cuda") is not None:
        cluster["kind"] = "local-cuda"
    return validate_config({
        "data": {"store": str(store), "cache": args.cache},
        "model": model,
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "train": {"epochs": args.epochs, "batch_size": args.batch, "shards": args.shards, "seed": 0,
                  "accumulate": args.accumulate, **MODES[mode]},
        "cluster": cluster,
        "output_dir": str(out),
    }, source=f"benchmark config ({mode})")


def steady(values: list[float]) -> float:
    """Median of the second half: after warm-up, prefetch and caches have settled."""
    return statistics.median(values[len(values) // 2:])


def load_store(config: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """The whole store in memory, as a plain training loop over it would start."""
    group = zarr.open_group(config.data.store, mode="r")
    inputs, targets = group[config.data.inputs], group[config.data.targets]
    assert isinstance(inputs, zarr.Array) and isinstance(targets, zarr.Array)
    return np.asarray(inputs[:]), np.asarray(targets[:])


def batch_indices(samples: int, batch: int, steps: int, seed: int = 0) -> list[np.ndarray]:
    """Global batches of ``steps`` steps: a fresh permutation every epoch, cut in order."""
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    while len(out) < steps:
        order = rng.permutation(samples)
        out.extend(order[i:i + batch] for i in range(0, samples, batch))
    return out[:steps]


def _timing(batch: int, steps: list[float], data: list[float], reduce: list[float] | None) -> Timing:
    step = steady(steps)
    return {"samples_per_s": batch / step, "step_s": step, "data_s": steady(data),
            "data_pct": 100 * steady([d / s for d, s in zip(data, steps)]),
            "reduce_s": steady(reduce) if reduce is not None else float("nan")}


# -- plain PyTorch -----------------------------------------------------------------------------

def run_plain(config: RunConfig, threads: int, steps: int, device: str, tuned: bool = False) -> Timing:
    torch.set_num_threads(threads)
    if tuned:
        keep_freed_memory()
    inputs, targets = (torch.from_numpy(a).to(device) for a in load_store(config))
    model = build_model(config.model, 0).to(device)
    opt = build_optimizer(config.optimizer, list(model.parameters()))
    cuda = device == "cuda"
    step_times, data_times = [], []
    for idx in batch_indices(len(inputs), config.train.batch_size, steps):
        t0 = time.perf_counter()
        picked = torch.from_numpy(idx).to(device)
        x, y = inputs[picked], targets[picked]
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()  # the step is done when its kernels are
        step_times.append(time.perf_counter() - t0)
        data_times.append(t1 - t0)
    return _timing(config.train.batch_size, step_times, data_times, [0.0])


# -- torch DDP -------------------------------------------------------------------------------------

def _ddp_loop(rank: int, world: int, port: int, config: RunConfig, threads: int, steps: int,
              tuned: bool) -> tuple[float, list[float], list[float]]:
    """One rank of DDP as its users write it: when the loop began, when each step ended, and
    each step's wait for its batch."""
    torch.set_num_threads(threads)
    if tuned:
        keep_freed_memory()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        inputs, targets = load_store(config)
        model = torch.nn.parallel.DistributedDataParallel(build_model(config.model, 0))
        opt = build_optimizer(config.optimizer, list(model.parameters()))
        ends, data_times = [], []
        dist.barrier()  # once, before the loop: every rank starts together, as a launcher starts them
        began = time.perf_counter()
        for idx in batch_indices(len(inputs), config.train.batch_size, steps):
            mine = np.array_split(idx, world)[rank]  # this rank's slice of the same global batch
            t0 = time.perf_counter()
            x, y = torch.from_numpy(inputs[mine]), torch.from_numpy(targets[mine])
            t1 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()  # DDP all-reduces the gradients in buckets during backward
            opt.step()
            ends.append(time.perf_counter())
            data_times.append(t1 - t0)
        return began, ends, data_times
    finally:
        dist.destroy_process_group()


def _ddp_process(rank: int, world: int, port: int, config: RunConfig, threads: int, steps: int, out: Any,
                 tuned: bool = False) -> None:
    timed = _ddp_loop(rank, world, port, config, threads, steps, tuned)
    if rank == 0:
        out.put(timed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_timing(config: RunConfig, began: float, ends: list[float], data_times: list[float]) -> Timing:
    # No barrier inside the loop, as DDP users run it: the all-reduce in backward keeps the ranks
    # in step. Its time per step is wall time over the steady-state steps (the second half), as a
    # DDP user would measure it, not a median of single steps.
    half = len(ends) // 2
    start = ends[half - 1] if half > 0 else began
    step = (ends[-1] - start) / (len(ends) - half)
    return _timing(config.train.batch_size, [step] * len(ends), data_times, None)


def run_ddp(config: RunConfig, world: int, threads: int, steps: int, tuned: bool = False) -> Timing:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(_ddp_process, args=(world, _free_port(), config, threads, steps, out, tuned), nprocs=world,
                       join=True, start_method="spawn")
    return _ddp_timing(config, *out.get(timeout=60))


def run_ddp_in_dask(config: RunConfig, threads: int, steps: int, tuned: bool = False) -> Timing:
    """The same DDP loop, one rank per worker as a Dask task, on the cluster a dasktrain run of
    ``config`` starts (same worker processes, environment and housekeeping). Its ratio to plain
    DDP is what running inside Dask workers costs any training loop; dasktrain's ratio to it is
    dasktrain's own."""
    with open_cluster(config.cluster) as client:
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
        port = _free_port()
        ranks = [client.submit(_ddp_loop, rank, len(workers), port, config, threads, steps, tuned,
                               workers=[addr], allow_other_workers=False, pure=False)
                 for rank, addr in enumerate(workers)]
        timed = client.gather(ranks)
    return _ddp_timing(config, *timed[0])


# -- dasktrain -------------------------------------------------------------------------------------

def run_dasktrain(config: RunConfig) -> Timing:
    train(config)
    steps = [r for r in read_metrics(Path(config.output_dir)) if r["kind"] == "step"]
    step = [r["step_time_s"] for r in steps]
    data = [r["data_wait_s"] for r in steps]
    if config.train.reduce == "collective":
        reduce = [r["reduce_s"] for r in steps]
    else:  # tree: what is left of the step interval besides the slowest worker's data wait and compute
        reduce = [max(r["step_time_s"] - r["compute_s"] - r["data_wait_s"], 0.0) for r in steps]
    return _timing(config.train.batch_size, step, data, reduce)


# -- the table -------------------------------------------------------------------------------------

def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 160 else text[:157] + "..."


def medians(runs: list[Timing | str]) -> Timing | str:
    """Medians over the repeats that ran; the first failure's reason when none did."""
    ok = [r for r in runs if isinstance(r, dict)]
    if not ok:
        return str(runs[0])
    return {k: statistics.median(r[k] for r in ok) for k in ok[0]}


def _fmt(value: float, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value != value else f"{value:{width}{spec}}"  # nan: not measured


def print_table(results: dict[str, list[Timing | str]], plain_key: str, ddp_key: str | None) -> None:
    summary = {name: medians(runs) for name, runs in results.items()}
    plain, ddp = summary.get(plain_key), summary.get(ddp_key) if ddp_key else None
    plain_sps = plain["samples_per_s"] if isinstance(plain, dict) else float("nan")
    ddp_sps = ddp["samples_per_s"] if isinstance(ddp, dict) else float("nan")
    width = max(len(n) for n in results) + 1
    header = (f"{'contender':{width}} {'samples/s':>10} {'step ms':>8} {'data ms':>8} {'data %':>7} "
              f"{'reduce ms':>9} {'vs plain':>8} {'vs DDP':>7}")
    print(header)
    print("-" * len(header))
    for name, med in summary.items():
        if isinstance(med, str):
            print(f"{name:{width}} failed: {med}")
            continue
        failed = sum(isinstance(r, str) for r in results[name])
        note = f"  ({failed} of {len(results[name])} repeats failed)" if failed else ""
        print(f"{name:{width}} {med['samples_per_s']:10.0f} {1e3 * med['step_s']:8.1f} {1e3 * med['data_s']:8.1f} "
              f"{med['data_pct']:7.1f} {_fmt(1e3 * med['reduce_s'], '.1f', 9)} "
              f"{_fmt(med['samples_per_s'] / plain_sps, '.2f', 8)} {_fmt(med['samples_per_s'] / ddp_sps, '.2f', 7)}{note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--workers", type=int, default=2, help="dasktrain workers and DDP processes (cuda: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker / DDP process")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: mlp 4096, cnn 256)")
    parser.add_argument("--samples", type=int, default=None, help="store size (default: 24 global batches)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--shards", type=int, default=None, help="default: workers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help=f"dasktrain modes to run, of {', '.join(MODES)} (default: {','.join(DEFAULT_MODES)})")
    parser.add_argument("--accumulate", type=int, default=1, help="train.accumulate of the dasktrain runs")
    parser.add_argument("--no-cache", dest="cache", action="store_false", help="data.cache: false for dasktrain")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    parser.add_argument("--tuned-baselines", action="store_true",
                        help="give plain and DDP the allocator setting dasktrain workers use (pipeline/allocator.py)")
    parser.add_argument("--ddp-in-dask", action="store_true",
                        help="also run the DDP loop as one Dask task per worker, on the cluster dasktrain starts")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; modes: {', '.join(MODES)}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print(f"benchmarks: --device cuda, but torch {torch.__version__} sees no CUDA GPU; "
                  "the GPU comparison is skipped", file=sys.stderr)
            return 2
        if args.workers != 1:
            print(f"benchmarks: --device cuda compares one GPU: 1 dasktrain worker (not {args.workers}), no DDP")
        args.workers = 1
    args.batch = args.batch or (4096 if args.model == "mlp" else 256)
    args.shards = args.shards or args.workers
    samples = args.samples or 24 * args.batch
    steps = args.epochs * -(-samples // args.batch)  # as many as dasktrain's plan: the last batch may be short
    _, shape = MODELS[args.model]
    logging.getLogger("distributed").setLevel(logging.ERROR)  # keep the table readable

    plain_key = f"plain PyTorch (1 process, {args.workers * args.threads} threads)"
    ddp_key = f"torch DDP gloo ({args.workers} processes)" if args.device == "cpu" else None
    in_dask_key = f"torch DDP gloo in Dask ({args.workers} workers)" if ddp_key and args.ddp_in_dask else None
    kind = "local-cuda" if importlib.util.find_spec("dask_cuda") else "local"
    where = f"{args.workers} workers" if args.device == "cpu" else f"1 GPU worker, {kind}"
    results: dict[str, list[Timing | str]] = {}

    def attempt(name: str, run: Any, *run_args: Any) -> None:
        try:
            outcome: Timing | str = run(*run_args)
        except Exception as exc:  # one row says so; the rest of the table still runs
            outcome = _reason(exc)
        results.setdefault(name, []).append(outcome)

    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp), shape, samples, chunk=max(64, args.batch // args.shards))
        for repeat in range(args.repeats):
            base = bench_config(args, store, Path(tmp) / f"r{repeat}")
            attempt(plain_key, run_plain, base, args.workers * args.threads, steps, args.device, args.tuned_baselines)
            if ddp_key:
                attempt(ddp_key, run_ddp, base, args.workers, args.threads, steps, args.tuned_baselines)
            if in_dask_key:
                attempt(in_dask_key, run_ddp_in_dask, base, args.threads, steps, args.tuned_baselines)
            for mode in modes:
                cfg = bench_config(args, store, Path(tmp) / f"r{repeat}-{mode}", mode)
                attempt(f"dasktrain {mode} ({where})", run_dasktrain, cfg)

    info = machine()
    print(f"\nmachine: {info['host']}, {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
          f"torch {info['torch']}, GPU: {', '.join(info['gpus']) or 'none'}, load {info['load_1min']}")
    print(f"model {args.model}, global batch {args.batch}, {samples} samples, {args.epochs} epochs, device {args.device}, "
          f"{args.threads} thread(s) per worker, accumulate {args.accumulate}, cache {'on' if args.cache else 'off'}, "
          f"baselines' allocator {'tuned as dasktrain workers' if args.tuned_baselines else 'glibc defaults'}, "
          f"medians of {args.repeats} repeats over the second half of the steps\n")
    print_table(results, plain_key, ddp_key)
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": info, "args": vars(args), "samples": samples,
                                              "results": results}, indent=1))
        print(f"\nfigures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
