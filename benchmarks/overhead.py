"""The per-step orchestration floor: milliseconds per step of a model whose compute is near zero.

    python -m benchmarks.overhead                       # N = 1, 2, 4, 8; tree, collective, DDP
    python -m benchmarks.overhead --workers 1,2 --steps 200 --out overhead.json
    python -m benchmarks.overhead --workers 1 --collective collective-step   # host_reads: step
    python -m benchmarks.overhead --device cuda         # one GPU worker against a plain loop on it

A 16-16-10 MLP (``benchmarks.compare.MODELS["tiny"]``) with a global batch of 512 on a synthetic
store: forward and backward take microseconds, so a step's time is what each contender does around
them (scheduling, transfers, the reduction, host syncs). For each worker count N, side by side in
one invocation: dasktrain ``reduce: tree`` and ``reduce: collective`` on a fresh LocalCluster of N
worker processes of 1 thread, and torch DDP over gloo with N processes of 1 thread, timed as in
``benchmarks.compare`` (DDP without a barrier in its loop, wall time over the steady-state steps).
From N above the machine's cores every contender is oversubscribed alike. Nothing is asserted:
these machines are shared, only the side-by-side figures mean anything.

With ``--device cuda`` the floor is measured on one GPU: dasktrain with one worker on it
(``local-cuda`` when dask-cuda is installed), tree and collective, against a plain PyTorch loop on
the same GPU with the whole dataset on it (``benchmarks.compare.run_plain``), which is the
yardstick there: on a GPU, a step of a small model takes a few milliseconds, so what dasktrain
adds per step decides its throughput. Without a GPU it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.compare import (
    MODELS,
    MODES,
    Timing,
    bench_config,
    machine,
    make_store,
    run_dasktrain,
    run_ddp,
    run_plain,
)

CONTENDERS = {"cpu": ("tree", "collective", "ddp"), "cuda": ("tree", "collective", "plain")}
"""Each device's columns; the last is the yardstick the ratios are taken against."""
HEADINGS = {"tree": "tree ms/step", "collective": "collective ms/step", "ddp": "DDP gloo ms/step",
            "plain": "plain GPU ms/step"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4,8", help="worker counts N, comma-separated")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=400, help="steps per run (two epochs of half as many)")
    parser.add_argument("--collective", choices=[m for m in MODES if m.startswith("collective")], default="collective",
                        help="the runner mode of the collective column (its train.host_reads)")
    parser.add_argument("--device", choices=sorted(CONTENDERS), default="cpu",
                        help="cuda: one GPU worker against a plain loop on the same GPU")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",") if n]
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print(f"benchmarks.overhead: --device cuda, but torch {torch.__version__} sees no CUDA GPU; "
                  "nothing is measured", file=sys.stderr)
            return 2
        if counts != [1]:
            print(f"benchmarks.overhead: --device cuda measures one GPU: 1 worker (not {args.workers})")
        counts = [1]
    contenders = CONTENDERS[args.device]
    yardstick = contenders[-1]
    logging.getLogger("distributed").setLevel(logging.ERROR)
    samples = args.batch * max(1, args.steps // 2)
    table: dict[int, dict[str, float | str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp), MODELS["tiny"][1], samples, chunk=max(64, args.batch // max(counts)))
        for n in counts:
            options = argparse.Namespace(model="tiny", workers=n, threads=1, device=args.device, cache=True,
                                         epochs=2, batch=args.batch, shards=n, accumulate=1)
            row: dict[str, float | str] = {}
            steps = 2 * math.ceil(samples / args.batch)
            for contender in contenders:
                try:
                    if contender == "ddp":
                        timing: Timing = run_ddp(bench_config(options, store, Path(tmp) / f"ddp{n}"), n, 1, steps)
                    elif contender == "plain":
                        timing = run_plain(bench_config(options, store, Path(tmp) / "plain"), 1, steps, args.device)
                    else:
                        mode = args.collective if contender == "collective" else contender
                        timing = run_dasktrain(bench_config(options, store, Path(tmp) / f"{contender}{n}", mode))
                    row[contender] = 1e3 * timing["step_s"]
                except Exception as exc:  # one cell says so; the rest of the table still runs
                    row[contender] = f"failed: {type(exc).__name__}"
                print(f"N={n} {contender}: {row[contender]}", file=sys.stderr, flush=True)
            table[n] = row
    info = machine()
    print(f"\nmachine: {info['host']}, {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
          f"torch {info['torch']}, load {info['load_1min']}")
    print(f"MLP 16-16-10, global batch {args.batch}, {samples} samples, 2 epochs, 1 thread per process, "
          f"device {args.device}; ms per step, steady state (second half)\n")
    widths = [len(HEADINGS[c]) + 1 for c in contenders]
    short = "DDP" if yardstick == "ddp" else "plain"
    print(f"{'N':>3} " + " ".join(f"{HEADINGS[c]:>{w}}" for c, w in zip(contenders, widths))
          + f" {'tree/' + short:>{len(short) + 6}} {'coll./' + short:>{len(short) + 7}}")
    for n, row in table.items():
        print(f"{n:>3} " + " ".join(_cell(row, c, w) for c, w in zip(contenders, widths))
              + f" {_ratio(row, 'tree', yardstick):>{len(short) + 6}} {_ratio(row, 'collective', yardstick):>{len(short) + 7}}")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": info, "args": vars(args), "ms_per_step": table}, indent=1))
    return 0


def _cell(row: dict[str, float | str], key: str, width: int) -> str:
    value = row[key]
    return f"{value:{width}.1f}" if isinstance(value, float) else f"{value:>{width}}"


def _ratio(row: dict[str, float | str], key: str, yardstick: str) -> str:
    a, b = row[key], row[yardstick]
    return f"{a / b:.1f}x" if isinstance(a, float) and isinstance(b, float) and b > 0 else "-"


if __name__ == "__main__":
    sys.exit(main())
