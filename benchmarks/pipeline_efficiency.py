"""Measured pipeline efficiency against the schedule's bound m / (m + P - 1).

A model of P equal stages (an MLP of equal square layers, cut by parameter count) trains a few
steps on a LocalCluster of P single-threaded worker processes for m = 1, 2, 4, 8 micro-batches
at a fixed global batch. Efficiency per step is the stages' busy time (forward and backward)
over P x the span from the step's first operation to its last; the first steps (warm-up) are
dropped and the rest averaged. Not a test: run it by hand, on an otherwise idle machine.

    python benchmarks/pipeline_efficiency.py [--stages 2] [--width 1024] [--batch 1024] [--steps 6]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
from distributed import Client, LocalCluster

from dasktrain.config import validate_config
from dasktrain.ingest import write_store
from dasktrain.run_loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers-per-stage", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6, help="steps measured per m, after 2 warm-up steps")
    parser.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe"])
    args = parser.parse_args()
    P, width = args.stages, args.width
    warmup = 2
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        samples = args.batch * (warmup + args.steps)
        store = write_store(Path(tmp) / "bench.zarr", {
            "inputs": rng.normal(size=(samples, width)).astype(np.float32),
            "targets": rng.integers(0, width, size=samples).astype(np.int64),
        }, chunk_size=args.batch // 4)
        # Equal stages: P * layers_per_stage square layers; the output layer is square too.
        hidden = [width] * (P * args.layers_per_stage - 1)
        with LocalCluster(n_workers=P, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            client.wait_for_workers(P, timeout=60)
            print(f"P={P} stages, {args.layers_per_stage} linear {width}x{width} layers each, global batch "
                  f"{args.batch}, schedule {args.schedule}, {args.steps} steps measured per m")
            print(f"{'m':>3} {'efficiency':>11} {'bound':>7} {'ratio':>6} {'step_s':>7}")
            for m in (1, 2, 4, 8):
                config = validate_config({
                    "data": {"store": str(store)},
                    "model": {"factory": "dasktrain.models:mlp",
                              "kwargs": {"in_features": width, "out_features": width, "hidden": hidden}},
                    "optimizer": {"name": "sgd", "lr": 0.01},
                    "train": {"epochs": 1, "batch_size": args.batch, "shards": 4},
                    "parallel": {"pipeline": P, "micro_batches": m, "schedule": args.schedule},
                    "cluster": {"workers": P, "dashboard": False},  # the cluster started above
                    "output_dir": str(Path(tmp) / f"run-m{m}"),
                })
                events: list[dict] = []
                train(config, client=client, on_event=events.append)
                kept = [e for e in events if e["kind"] == "step"][warmup:]
                eff = statistics.mean(s["pipeline_efficiency"] for s in kept)
                bound = m / (m + P - 1)
                step_s = statistics.mean(s["step_time_s"] for s in kept)
                print(f"{m:>3} {eff:>11.3f} {bound:>7.3f} {eff / bound:>6.2f} {step_s:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
