"""Where a step's milliseconds go on a worker: Python's profiler inside the worker's task thread.

    python -m benchmarks.profile_step                         # collective, 1 worker, tiny MLP
    python -m benchmarks.profile_step --mode tree --workers 2 --top 40 --out step.prof

Runs the tiny-model run of :mod:`benchmarks.overhead` (a 16-16-10 MLP: a step's compute is
microseconds) on a LocalCluster of worker processes of one thread each, with ``cProfile``
switched on in each worker's task thread before training and off after it. With one thread per
worker every task runs on that thread, so the profile holds every step of the run (``run_segment``
for collective, ``run_step`` for tree) and the replica's setup, and nothing of the worker's
event loop. It prints the functions of the first worker by their own time and by cumulative
time; ``--out`` keeps its raw profile for ``python -m pstats`` or snakeviz.

What it found, and what was done about it, is in the README's performance notes (a reseed of
every accelerator backend per forward unit, for one).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import sys
import tempfile
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster

from benchmarks.compare import MODELS, bench_config, make_store
from dasktrain.config import validate_config
from dasktrain.run_loop import train

_PROFILER: dict[str, cProfile.Profile] = {}
"""The profiler of this worker's task thread, between :func:`_start` and :func:`_stop`."""


def _start() -> bool:
    """Dask task: profile the thread this task runs on, from now on. torch's one-time imports
    (an optimizer's first construction loads ``torch._dynamo``: seconds) are made first, so
    they do not fill the profile."""
    import torch

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    profiler = cProfile.Profile()
    profiler.enable()
    _PROFILER["task-thread"] = profiler
    return True


def _stop(top: int, out: str | None) -> str:
    """Dask task (same thread): stop profiling; the report as text, and the raw profile at ``out``."""
    profiler = _PROFILER.pop("task-thread")
    profiler.disable()
    if out:
        profiler.dump_stats(out)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(r"dasktrain|pipeline/|torch/optim|autograd", top)
    return text.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("tree", "collective"), default="collective")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=400, help="steps (two epochs of half as many)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--top", type=int, default=30, help="functions listed per table")
    parser.add_argument("--out", default=None, help="the first worker's raw profile (pstats format)")
    args = parser.parse_args(argv)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    samples = args.batch * max(1, args.steps // 2)
    with tempfile.TemporaryDirectory() as tmp, \
            LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                         dashboard_address=None) as cluster, Client(cluster) as client:
        store = make_store(Path(tmp), MODELS["tiny"][1], samples, chunk=max(64, args.batch // args.workers))
        options = argparse.Namespace(model="tiny", workers=args.workers, threads=1, device="cpu", cache=True,
                                     epochs=2, batch=args.batch, shards=args.workers, accumulate=1)
        settings: dict[str, Any] = bench_config(options, store, Path(tmp) / "run", args.mode).model_dump()
        settings["cluster"] = {"kind": "address", "address": cluster.scheduler_address}
        config = validate_config(settings, source="profile_step")
        # By reference (this module, imported by name), so both tasks find the same profiler.
        from benchmarks import profile_step as tasks

        workers = sorted(client.scheduler_info()["workers"])
        for i, address in enumerate(workers):
            client.submit(tasks._start, key=f"profile-start-{i}", workers=[address], pure=False).result()
        train(config, client=client)
        report = client.submit(tasks._stop, args.top, args.out, key="profile-stop-0", workers=[workers[0]],
                               pure=False).result()
        for i, address in enumerate(workers[1:], 1):
            client.submit(tasks._stop, 0, None, key=f"profile-stop-{i}", workers=[address], pure=False).result()
    print(f"{args.mode}, {args.workers} worker(s), {2 * (samples // args.batch)} steps; worker 0's task thread\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
