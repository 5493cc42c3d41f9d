"""Measured pipeline efficiency of every schedule against its theoretical bound.

Efficiency per step is the stages' busy time over P x the span from the step's first action to
its last (the ``pipeline_efficiency`` every pipeline step records); the first step is dropped as
warm-up and the rest averaged. The bound is what the schedule's action lists reach with free,
instant transfers (:func:`dasktrain.schedules.efficiency_bound`): ``m / (m + P - 1)`` for GPipe
and 1F1B, ``m / (m + (P - 1) / v)`` for interleaved 1F1B, ``3m / (3m + P - 1)`` for ZB-H1 when
F, B and W cost the same. The first stage has no input gradient to take, so its B costs
nothing, here as with real layers: the bound printed counts that (``bound``), beside the bound
with each step's measured costs (``measured``, from the step records).

``--model sleep`` (the default): every virtual stage is one synthetic layer whose forward, input
gradient and weight gradient each *sleep* a fixed time (``--op-ms``, split over the ``v`` chunks
of interleaved 1F1B), so the figures measure the schedules and the transfers, not this machine's
cores: a 2-core machine runs a 4-stage pipeline as faithfully as 4 GPUs would. ``--model mlp``
trains an MLP of equal square layers instead (real compute; needs a core per stage).

    python -m benchmarks.pipeline_efficiency [--stages 2 4] [--micro-batches 4 8 16] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from distributed import Client, LocalCluster
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the workers import this module's sleep_stack by name
    sys.path.insert(0, str(ROOT))

from dasktrain.config import validate_config  # noqa: E402
from dasktrain.ingest import write_store  # noqa: E402
from dasktrain.run_loop import train  # noqa: E402
from dasktrain.schedules import SCHEDULES, Costs, efficiency_bound  # noqa: E402

WIDTH = 8
VIRTUAL = 2
"""Chunks per worker for interleaved 1F1B."""


class _SleepingGradient(torch.autograd.Function):
    """Identity whose backward sleeps: the cost of one gradient pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, seconds: float) -> torch.Tensor:
        ctx.seconds = seconds
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        time.sleep(ctx.seconds)
        return grad, None


class SleepLayer(nn.Module):
    """``y = x + w * x`` whose forward sleeps ``forward_s``, whose input gradient sleeps
    ``backward_s`` and whose weight gradient sleeps ``weight_s``. The two gradients flow through
    separate branches (the weight's sees ``x`` detached), so a split backward runs each on its
    own, as ZB-H1's B and W, and a plain one runs both."""

    def __init__(self, width: int, forward_s: float, backward_s: float, weight_s: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))
        self.forward_s, self.backward_s, self.weight_s = forward_s, backward_s, weight_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.forward_s)
        through = _SleepingGradient.apply(x, self.backward_s)
        return through + _SleepingGradient.apply(self.weight * x.detach(), self.weight_s)


def sleep_stack(layers: int, width: int = WIDTH, op_ms: float = 20.0) -> nn.Sequential:
    """``layers`` sleep layers, each action ``op_ms`` milliseconds: one per (virtual) stage."""
    s = op_ms / 1000
    return nn.Sequential(*(SleepLayer(width, s, s, s) for _ in range(layers)))


def run(client: Client, tmp: Path, store: Path, args: argparse.Namespace, P: int, m: int, kind: str) -> dict[str, float]:
    v = VIRTUAL if kind == "interleaved-1f1b" else 1
    if args.model == "sleep":
        model = {"factory": "benchmarks.pipeline_efficiency:sleep_stack",
                 "kwargs": {"layers": P * v, "width": WIDTH, "op_ms": args.op_ms / v}}
        cuts = None
    else:
        model = {"factory": "dasktrain.models:mlp",
                 "kwargs": {"in_features": args.width, "out_features": args.width, "hidden": [args.width] * (2 * P * v - 1)}}
        cuts = [2 * k for k in range(1, P * v)]  # Linear + ReLU per stage
    config = validate_config({
        "data": {"store": str(store)},
        "model": model,
        "optimizer": {"name": "sgd", "lr": 0.01},
        "train": {"epochs": 1, "batch_size": args.batch, "shards": 4},
        "parallel": {"pipeline": P, "micro_batches": m, "schedule": kind, "virtual_stages": v,
                     **({"cuts": cuts} if cuts else {})},
        "cluster": {"workers": P, "dashboard": False},  # the cluster started by main
        "output_dir": str(tmp / f"run-{kind}-P{P}-m{m}"),
    })
    events: list[dict[str, Any]] = []
    train(config, client=client, on_event=events.append)
    kept = [e for e in events if e["kind"] == "step"][1:]
    eff = statistics.mean(s["pipeline_efficiency"] for s in kept)
    # The first stage takes no input gradient: its B costs nothing; every other action op_ms / v.
    unit = Costs(1.0, 1.0, 1.0)
    bound = efficiency_bound(kind, P, m, v, [Costs(1.0, 0.0, 1.0), *[unit] * (P * v - 1)])
    measured = statistics.mean(s["efficiency_bound"] for s in kept)
    return {"efficiency": eff, "bound": bound, "ratio": eff / bound, "measured_bound": measured,
            "step_s": statistics.mean(s["step_time_s"] for s in kept)}


def main(argv: list[str] | None = None) -> dict[tuple[str, int, int], dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["sleep", "mlp"], default="sleep")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--op-ms", type=float, default=20.0, help="sleep of each F, B and W of a whole stage")
    parser.add_argument("--width", type=int, default=1024, help="--model mlp: layer width")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="steps measured per case, after 1 warm-up step")
    args = parser.parse_args(argv)
    results: dict[tuple[str, int, int], dict[str, float]] = {}
    width = WIDTH if args.model == "sleep" else args.width
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        rng = np.random.default_rng(0)
        samples = args.batch * (1 + args.steps)
        store = write_store(tmp / "bench.zarr", {
            "inputs": rng.normal(size=(samples, width)).astype(np.float32),
            "targets": rng.integers(0, width, size=samples).astype(np.int64),
        }, chunk_size=args.batch // 4)
        workers = max(args.stages)
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            client.wait_for_workers(workers, timeout=60)
            print(f"model {args.model}, op {args.op_ms} ms per F/B/W of a stage, global batch {args.batch}, "
                  f"{args.steps} steps measured per case (interleaved: {VIRTUAL} virtual stages per worker)")
            print(f"{'schedule':>17} {'P':>2} {'m':>3} {'efficiency':>11} {'bound':>6} {'ratio':>6} "
                  f"{'measured':>9} {'step_s':>7}")
            for P in args.stages:
                for m in args.micro_batches:
                    for kind in args.schedules:
                        if kind == "interleaved-1f1b" and m % P:
                            continue
                        r = results[(kind, P, m)] = run(client, tmp, store, args, P, m, kind)
                        print(f"{kind:>17} {P:>2} {m:>3} {r['efficiency']:>11.3f} {r['bound']:>6.3f} "
                              f"{r['ratio']:>6.3f} {r['measured_bound']:>9.3f} {r['step_s']:>7.3f}", flush=True)
    for P in args.stages:
        if ("zb-h1", P, 8) in results and ("1f1b", P, 8) in results:
            gain = results[("zb-h1", P, 8)]["efficiency"] / results[("1f1b", P, 8)]["efficiency"] - 1
            print(f"P={P}, m=8: ZB-H1 over 1F1B {gain:+.1%}")
    return results


if __name__ == "__main__":
    main()
