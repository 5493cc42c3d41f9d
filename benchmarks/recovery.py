"""Recovery latency: SIGKILL a training worker at seeded random moments, time each kill to the next committed step.

    python -m benchmarks.recovery                        # 20 kills per mode, 2 workers, tree and collective
    python -m benchmarks.recovery --kills 5 --modes tree --seed 1 --out recovery.json

Issue #13 asks how long a run stands still when a worker dies; its goal is a p95 of at most 5 s on
a local cluster (anchors: torchft with Monarch, about 17 s; designs that restart the whole group
lose everything since the last checkpoint). This measures it and reports it; speed is never
asserted, these machines are shared.

Each mode (``--modes``: ``tree`` is ``reduce: tree``, ``collective`` is ``reduce: collective``)
trains a small MLP on a synthetic Zarr store with ``dasktrain.run_loop.train`` on a cluster started
as dasktrain starts one (``dasktrain.cluster.open_cluster``: a ``LocalCluster`` of ``--workers`` worker
processes, each under a nanny, so a killed worker is restarted by its nanny and may join the run
again). A thread beside the driver kills, one kill at a time:

- it waits until the run has committed a step with all ``--workers`` workers in it, after the
  previous kill's worker was back in the run: every kill takes one replica of a whole group and
  leaves survivors, and no two kills overlap;
- then a seeded random delay (uniform, 0 to ``MAX_DELAY_S``), so that kills land anywhere: in a
  step, a reduction, a segment, an epoch's checkpoint;
- it picks a worker (seeded), asks it its pid (``client.run``) and sends it SIGKILL;
- it watches the nanny restart the worker (the scheduler lists a new one) and the run take it
  back (a step committed with all workers). A run that has not taken it back ``JOIN_WAIT_S``
  after the restart is ended, and the next kill comes in a fresh run on the same cluster, whole.

The ``on_event`` hook takes ``time.monotonic()`` as each record reaches the driver. A kill's
**recovery** is the time from the SIGKILL to the first ``step`` record of a later generation than
the last one before the kill: the first step computed and committed after the driver noticed the
loss and regrouped. Step records of the old generation that reach the driver after the kill
(steps whose results survived it) are not recovery. Also per kill: ``regroup``, the SIGKILL to
the ``regroup`` record (the loss noticed, the survivors' state copied onto the workers);
``restart``, to the nanny's new worker reaching the scheduler; ``back``, to the first step
committed with all workers in the run again. ``step ms`` is the median step interval at the
driver (``step_time_s``): the rhythm a kill interrupts.

A kill whose run raised instead of recovering counts as a kill, not as recovered (the table's
``kills`` minus ``recovered``), and the error is reported; the next kill comes in a fresh run.

Runs end from the hook, once their kills are over: an exception raised in ``on_event`` leaves
``train``, which drops its replicas on the way out. The driver gives up a run after 50 regroups,
and a kill costs up to two (the loss, the restarted worker's join), so a run takes at most
``KILLS_PER_RUN`` kills; ``EPOCHS`` only bounds a run (a run that ends before its kills is
followed by another). ``train.min_workers`` stays 1: the survivors go on alone. Only with
``--workers 1`` does a kill leave no replica; the run then waits up to ``train.worker_grace_s``
(``GRACE_S``) for the nanny's restart and goes on from the newest checkpoint.

Output: stderr has one line per kill; stdout, a machine line (``benchmarks.compare.machine``),
the setup, one row per mode (kills made, kills recovered, recovery p50 / p95 / max with linearly
interpolated percentiles, regroup, restart and back medians, step ms), how each kill ended, and
the issue's goal, met or not. ``--out`` writes every kill's figures and the machine as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import dask
import numpy as np
from distributed import Client

from benchmarks.compare import machine
from dasktrain.cluster import open_cluster
from dasktrain.config import RunConfig, validate_config
from dasktrain.ingest import write_store
from dasktrain.run_loop import train

MODES: dict[str, dict[str, Any]] = {"tree": {"reduce": "tree"}, "collective": {"reduce": "collective"}}
"""Mode -> its train settings."""

FEATURES, CLASSES, HIDDEN = 32, 10, [64]
SAMPLES, CHUNK, BATCH = 16384, 128, 128
"""A model and store small enough that a step takes about 10 ms on a shared 2-core machine:
what is timed is the regroup, not the arithmetic. 128 steps an epoch."""

EPOCHS = 250
"""Upper bound of one run (32,000 steps, 5-8 minutes here); the hook ends a run once its kills are over."""

KILLS_PER_RUN = 16
"""Kills per training run: the driver gives up after 50 regroups and a kill costs up to two."""

MAX_DELAY_S = 1.5
"""A kill comes a seeded uniform 0..MAX_DELAY_S after the run became eligible for it."""

JOIN_WAIT_S = 12.0
"""How long after the nanny's restarted worker reached the scheduler the run may take to train
with it again (tree mode notices it within its one-second membership poll, then builds a replica
on it: 2-4 s here, more on a loaded machine); past it the run is ended and the next kill comes in
a fresh run, with every worker in it."""

STALL_S = 120.0
"""Longest wait for the run to get ready for a kill, or for a kill's worker to be restarted;
past it the mode stops killing and says so."""

KEEP_NANNIES = {"distributed.deploy.lost-worker-timeout": "1h"}
"""Dask's ``LocalCluster`` closes a nanny for good when, 15 s (this setting) after one of its
workers left, no worker of that nanny's name is there: a later kill of the same nanny's worker,
within its restart, then retires the nanny and the cluster stays a worker short. Kills every few
seconds meet that window; in the benchmark's clusters it is an hour."""

GRACE_S = 60.0
"""``train.worker_grace_s``: with ``--workers 1`` a kill leaves none, and the run waits this long
for the nanny's restart."""


class _Enough(Exception):
    """Raised from the hook to end a run: its kills are over, or it will not be whole again."""


def _new_kill(victim: str, pid: int, delay: float, last_step: dict[str, Any] | None) -> dict[str, Any]:
    """One kill's record; times are seconds after the SIGKILL, None until seen."""
    return {"at": time.monotonic(), "wall": time.time(), "victim": victim, "pid": pid, "delay_s": delay,
            "generation": last_step["generation"] if last_step else 0,
            "last_step": last_step["global_step"] if last_step else -1,
            "first_record_s": None, "regroup_s": None, "regroup_step": None, "lost": None,
            "recovery_s": None, "recovered_step": None, "restarted_s": None, "back_s": None, "outcome": None}


class Killer:
    """Kills workers of one training run, one at a time, and times each kill from the run's records.

    ``on_event`` is the run's hook (the driver's thread); ``run`` is the killing thread's body.
    Their state is shared under one condition variable. A run ends (``_Enough`` from the hook)
    once its ``quota`` of kills is over, or when a killed worker, restarted, is not taken back."""

    def __init__(self, client: Client, workers: int, quota: int, rng: np.random.Generator) -> None:
        self.client, self.workers, self.quota, self.rng = client, workers, quota, rng
        self.cond = threading.Condition()
        self.kills: list[dict[str, Any]] = []
        self.step_times: list[float] = []  # step_time_s of every step record
        self.last_step: dict[str, Any] | None = None  # {at, global_step, generation, workers}
        self.ended = False  # the run ended, or is being ended: kill no more
        self.stop_run = ""  # set by the killing thread: the hook ends the run, for this reason
        self.note = ""  # why killing stopped early, if it did

    # -- the driver's side ---------------------------------------------------------------------

    def on_event(self, event: dict[str, Any]) -> None:
        now = time.monotonic()
        with self.cond:
            kind = event["kind"]
            if kind == "regroup":
                for kill in self.kills:
                    if kill["regroup_s"] is None:
                        kill["regroup_s"] = now - kill["at"]
                        kill["regroup_step"], kill["lost"] = event["global_step"], event["lost"]
            elif kind == "step":
                self.step_times.append(event["step_time_s"])
                self.last_step = {"at": now, "global_step": event["global_step"], "generation": event["generation"],
                                  "workers": event["workers"]}
                for kill in self.kills:
                    if kill["first_record_s"] is None:
                        kill["first_record_s"] = now - kill["at"]
                    if kill["recovery_s"] is None and event["generation"] > kill["generation"]:
                        kill["recovery_s"], kill["recovered_step"] = now - kill["at"], event["global_step"]
                    if kill["recovery_s"] is not None and kill["back_s"] is None and event["workers"] == self.workers:
                        kill["back_s"] = now - kill["at"]
            elif kind == "end":
                self.ended = True
            done = len(self.kills) >= self.quota and all(k["back_s"] is not None for k in self.kills)
            enough = done or bool(self.stop_run)
            if enough:
                self.ended = True
            self.cond.notify_all()
        if enough:
            raise _Enough

    # -- the killing thread ----------------------------------------------------------------------

    def _eligible(self) -> bool:
        """A step committed with every worker in the run, after the previous kill (``back_s`` is
        set by the first such step after it)."""
        last = self.last_step
        if last is None or last["workers"] != self.workers:
            return False
        return not self.kills or self.kills[-1]["back_s"] is not None

    def run(self) -> None:
        try:
            while len(self.kills) < self.quota:
                with self.cond:
                    ready = self.cond.wait_for(lambda: self.ended or self._eligible(), timeout=STALL_S)
                    if self.ended:
                        return
                    if not ready:
                        self.note = f"stopped killing: the run was not ready for a kill in {STALL_S:.0f} s"
                        self.stop_run = self.note
                        return
                delay = float(self.rng.uniform(0.0, MAX_DELAY_S))
                with self.cond:
                    if self.cond.wait_for(lambda: self.ended, timeout=delay):
                        return
                pids = self.client.run(os.getpid)  # {address: pid}; the run holds every worker now
                addresses = sorted(pids)
                victim = addresses[int(self.rng.integers(len(addresses)))]
                pid = pids[victim]
                if pid == os.getpid():  # never: workers are processes of their own
                    raise RuntimeError(f"worker {victim} reports this process's pid")
                with self.cond:
                    if self.ended:
                        return
                    os.kill(pid, signal.SIGKILL)
                    self.kills.append(_new_kill(victim, pid, delay, self.last_step))
                if not self._follow(self.kills[-1]):
                    return
        except Exception as exc:  # the run goes on to its end; the report says why kills stopped
            with self.cond:
                self.note = f"stopped killing: {type(exc).__name__}: {exc}"
                self.stop_run = self.note

    def _follow(self, kill: dict[str, Any]) -> bool:
        """Watch the nanny restart ``kill``'s worker and the run take it back; False: stop killing."""
        while True:
            with self.cond:
                if self.ended:
                    return False
                if kill["back_s"] is not None:
                    return True
            names = set(self.client.nthreads())
            now = time.monotonic()
            with self.cond:
                if kill["restarted_s"] is None and kill["victim"] not in names and len(names) >= self.workers:
                    kill["restarted_s"] = now - kill["at"]
                if kill["restarted_s"] is not None and now - kill["at"] - kill["restarted_s"] > JOIN_WAIT_S:
                    kill["outcome"] = f"not taken back within {JOIN_WAIT_S:.0f} s of its restart"
                    self.stop_run = kill["outcome"]  # the next kill comes in a fresh run, whole again
                    return False
                if kill["restarted_s"] is None and now - kill["at"] > STALL_S:
                    self.note = f"stopped killing: the killed worker was not restarted in {STALL_S:.0f} s"
                    self.stop_run = self.note
                    return False
                self.cond.wait(timeout=0.25)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def kill_line(mode: str, kill: dict[str, Any], workers: int) -> str:
    """One kill, for the log on stderr."""
    return (f"{mode}: kill after step {kill['last_step']} (pid {kill['pid']}): recovered {_seconds(kill['recovery_s'])}"
            f" (step {kill['recovered_step']}), regroup {_seconds(kill['regroup_s'])}, restarted "
            f"{_seconds(kill['restarted_s'])}, back to {workers} workers {_seconds(kill['back_s'])}: {kill['outcome']}")


def make_store(folder: Path) -> Path:
    """Gaussian blobs, one per class: learnable, so the run is a real training run."""
    rng = np.random.default_rng(0)
    targets = rng.integers(0, CLASSES, SAMPLES)
    centers = rng.normal(size=(CLASSES, FEATURES)).astype(np.float32)
    inputs = (centers[targets] + rng.normal(scale=0.5, size=(SAMPLES, FEATURES))).astype(np.float32)
    return write_store(folder / "recovery.zarr", {"inputs": inputs, "targets": targets.astype(np.int64)},
                       chunk_size=CHUNK)


def recovery_config(store: Path, out: Path, mode: str, workers: int, seed: int) -> RunConfig:
    return validate_config({
        "data": {"store": str(store)},
        "model": {"factory": "dasktrain.models:mlp",
                  "kwargs": {"in_features": FEATURES, "out_features": CLASSES, "hidden": HIDDEN}},
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "train": {"epochs": EPOCHS, "batch_size": BATCH, "shards": 2 * workers, "seed": seed,
                  "min_workers": 1, "worker_grace_s": GRACE_S, **MODES[mode]},
        "cluster": {"workers": workers, "threads_per_worker": 1, "dashboard": False},
        "checkpoint": {"every_steps": 0, "keep": 2},
        "output_dir": str(out),
    }, source=f"recovery benchmark config ({mode})")


def run_mode(mode: str, store: Path, folder: Path, args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    """Every kill of one mode, over as many runs as it takes, on one cluster."""
    kills: list[dict[str, Any]] = []
    step_times: list[float] = []
    notes: list[str] = []
    base = recovery_config(store, folder / f"{mode}-0", mode, args.workers, args.seed)
    runs = 0
    with dask.config.set(KEEP_NANNIES), open_cluster(base.cluster) as client:
        while len(kills) < args.kills:
            try:
                client.wait_for_workers(args.workers, timeout=STALL_S)  # whole again after the last run's kill
            except Exception as exc:
                notes.append(f"stopped killing: the cluster was not back at {args.workers} workers: {exc}")
                break
            remaining = args.kills - len(kills)
            quota = -(-remaining // -(-remaining // KILLS_PER_RUN))  # spread evenly over the runs left
            config = base.model_copy(update={"output_dir": str(folder / f"{mode}-{runs}")})
            killer = Killer(client, args.workers, quota, rng)
            thread = threading.Thread(target=killer.run, name=f"killer-{mode}-{runs}", daemon=True)
            runs += 1
            thread.start()
            outcome = "the run ended"
            try:
                train(config, client=client, on_event=killer.on_event)
            except _Enough:
                outcome = killer.stop_run or "back"
            except Exception as exc:  # the kills so far still count; the next run goes on
                outcome = f"the run failed: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
            finally:
                with killer.cond:
                    killer.ended = True
                    killer.cond.notify_all()
                thread.join(timeout=STALL_S)
            for kill in killer.kills:
                kill["outcome"] = kill["outcome"] or ("back" if kill["back_s"] is not None else outcome)
                print(kill_line(mode, kill, args.workers), file=sys.stderr, flush=True)
            kills.extend(killer.kills)
            step_times.extend(killer.step_times)
            if killer.note or not killer.kills:
                notes.append(killer.note or f"run {runs} ended before its first kill: {outcome}")
                break
    return {"kills": kills, "step_ms": 1e3 * statistics.median(step_times) if step_times else float("nan"),
            "runs": runs, "notes": notes}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The table's figures of one mode: recovery over the kills that recovered; the others counted."""
    kills = result["kills"]

    def times(key: str) -> list[float]:
        return [k[key] for k in kills if k[key] is not None]

    recovered = times("recovery_s")
    return {"kills": len(kills), "recovered": len(recovered),
            "p50_s": percentile(recovered, 50), "p95_s": percentile(recovered, 95),
            "max_s": max(recovered) if recovered else float("nan"),
            "regroup_p50_s": percentile(times("regroup_s"), 50), "restart_p50_s": percentile(times("restarted_s"), 50),
            "back_p50_s": percentile(times("back_s"), 50), "step_ms": result["step_ms"],
            "outcomes": dict(Counter(k["outcome"] for k in kills)), "runs": result["runs"]}


def goal(mode: str, s: dict[str, Any]) -> str:
    """Whether a mode meets issue #13's goal, and if not, why: reported, never asserted."""
    if s["recovered"] < s["kills"]:
        return f"{mode} no ({s['kills'] - s['recovered']} of {s['kills']} kills not recovered)"
    return f"{mode} {'yes' if s['p95_s'] <= 5.0 else 'no'} (p95 {s['p95_s']:.2f} s)"


def _fmt(value: float, width: int, spec: str = ".2f") -> str:
    return f"{'-':>{width}}" if value != value else f"{value:{width}{spec}}"  # nan: not measured


COLUMNS = ("mode", "kills", "recovered", "p50 s", "p95 s", "max s", "regroup p50 s", "restart p50 s", "back p50 s",
           "step ms")


def print_table(summaries: dict[str, dict[str, Any]]) -> None:
    widths = [max(12, *(len(m) for m in summaries))] + [len(c) for c in COLUMNS[1:]]
    header = " ".join(f"{c:{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(COLUMNS, widths)))
    print(header)
    print("-" * len(header))
    for mode, s in summaries.items():
        cells = [f"{mode:{widths[0]}}", f"{s['kills']:{widths[1]}d}", f"{s['recovered']:{widths[2]}d}"]
        cells += [_fmt(s[k], w) for k, w in zip(("p50_s", "p95_s", "max_s", "regroup_p50_s", "restart_p50_s",
                                                  "back_p50_s"), widths[3:9])]
        cells.append(_fmt(s["step_ms"], widths[9], ".1f"))
        print(" ".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recovery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="kills per mode (default 20)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"modes to run, of {', '.join(MODES)}")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments, the victims and the run")
    parser.add_argument("--out", default=None, help="also write every kill's figures as JSON here")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"unknown mode(s) {', '.join(unknown) or '(none)'}; modes: {', '.join(MODES)}")
    if args.kills < 1 or args.workers < 1:
        parser.error("--kills and --workers must be at least 1")
    # Every kill makes Dask log errors and tracebacks, here and (read from the environment when
    # they start) in the worker processes: keep the output to the kills and the table.
    os.environ["DASK_LOGGING__DISTRIBUTED"] = "critical"
    for name in ("distributed", "distributed.client", "dasktrain"):
        logging.getLogger(name).setLevel(logging.CRITICAL)

    results: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp))
        for i, mode in enumerate(modes):
            rng = np.random.default_rng([args.seed, i])  # each mode its own stream, whichever modes run
            results[mode] = run_mode(mode, store, Path(tmp), args, rng)
    summaries = {mode: summary(result) for mode, result in results.items()}

    info = machine()
    print(f"\nmachine: {info['host']}, {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
          f"torch {info['torch']}, GPU: {', '.join(info['gpus']) or 'none'}, load {info['load_1min']}")
    print(f"workers: {args.workers} (LocalCluster, nannies), MLP {FEATURES}-{'-'.join(map(str, HIDDEN))}-{CLASSES}, "
          f"batch {BATCH}, {SAMPLES} samples, seed {args.seed}, kills asked per mode: {args.kills}, "
          f"{time.monotonic() - started:.0f} s in all")
    print("recovery: SIGKILL of one worker of the run to the next step committed after the regroup\n")
    print_table(summaries)
    print()
    for mode, result in results.items():
        outcomes = "; ".join(f"{n} {outcome}" for outcome, n in summaries[mode]["outcomes"].items())
        print(f"{mode}: kills {summaries[mode]['kills']}, runs {summaries[mode]['runs']}: {outcomes}")
        for note in result["notes"]:
            print(f"{mode}: {note}")
    print(f"\nissue #13 goal, p95 <= 5 s with every kill recovered: {', '.join(goal(m, s) for m, s in summaries.items())}")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": info, "args": vars(args), "summary": summaries,
                                              "results": results}, indent=1))
        print(f"figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
