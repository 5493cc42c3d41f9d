"""The training driver: set up replicas, keep steps submitted ahead, record metrics.

The driver decides *what* runs where and never touches tensors while training: it submits one
step task per worker (pinned to it) and the reduction tasks above them, and receives one small
dict of numbers per step. The final weights are fetched once, at the end.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client, Future

from pipeline.checkpoint import latest_checkpoint, load_checkpoint, save_model
from pipeline.config import RunConfig
from pipeline.errors import CheckpointError, ClusterError, DasktrainError
from pipeline.metrics import MetricsLog
from pipeline.objective import lr_at
from pipeline.plan import SamplingPlan
from pipeline.preflight import DataSplits, build_plan, check_model_fits, resolve_splits
from pipeline.reduce import ReductionTree, default_fan_in, submit_tree, summarize
from pipeline.replica import ReplicaSpec, StepActions, create_replica, drop_replica, replica_state, run_step

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"

Event = dict[str, Any]


@dataclass
class RunResult:
    """What a finished (or stopped) run leaves: where, how far, and its epoch metrics."""

    run_dir: Path
    steps: int
    completed: bool
    epochs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def model_path(self) -> Path:
        return self.run_dir / MODEL_FILE


def train(
    config: RunConfig,
    *,
    client: Client | None = None,
    resume: bool = False,
    until_epoch: int | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> RunResult:
    """Train ``config`` on ``client``'s cluster (or on one started from ``config.cluster``).

    ``until_epoch`` stops after that many epochs, with a checkpoint, so that ``resume`` can go on
    later. ``on_event`` receives ``start``, ``step``, ``epoch`` and ``end`` records (the CLI's
    progress display). Raises :class:`DasktrainError` subclasses for every user-fixable problem.
    """
    splits = resolve_splits(config)
    plan = build_plan(config, splits)
    check_model_fits(config, splits.train)
    run_dir = Path(config.output_dir)
    start_step = _prepare_run_dir(config, run_dir, resume)
    stop_epoch = min(config.train.epochs, until_epoch or config.train.epochs)
    end_step = stop_epoch * plan.steps_per_epoch
    if start_step > end_step:
        raise CheckpointError(f"the newest checkpoint in {run_dir} is at step {start_step}, past the requested end {end_step}")
    emit = on_event or (lambda event: None)
    with _client_for(config, client) as c:
        session = _Session(config, c, splits, plan, run_dir, start_step, end_step, emit)
        return session.run()


@contextmanager
def _client_for(config: RunConfig, client: Client | None) -> Iterator[Client]:
    if client is not None:
        yield client
        return
    from cluster import open_cluster  # the cluster package depends on pipeline, not the reverse

    with open_cluster(config.cluster) as started:
        yield started


def _prepare_run_dir(config: RunConfig, run_dir: Path, resume: bool) -> int:
    """Check the run directory against ``resume``; returns the step training starts at."""
    newest = latest_checkpoint(run_dir)
    if not resume:
        if newest is not None:
            raise CheckpointError(
                f"output_dir {run_dir} already holds a run (checkpoint {newest.name}); pass --resume "
                "to continue it, or choose another output_dir"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(config.to_yaml())
        return 0
    if newest is None:
        raise CheckpointError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    state = json.loads((newest / "state.json").read_text())
    if state.get("config_digest") != config.digest():
        raise CheckpointError(
            f"--resume: checkpoint {newest} was written by a different configuration (digest "
            f"{state.get('config_digest')}, this config {config.digest()}); the trajectory cannot continue"
        )
    return int(state["step"])


class _Session:
    """One run of the training loop on a connected client."""

    def __init__(self, config: RunConfig, client: Client, splits: DataSplits, plan: SamplingPlan,
                 run_dir: Path, start_step: int, end_step: int, emit: Callable[[Event], None]) -> None:
        self.config = config
        self.client = client
        self.splits = splits
        self.plan = plan
        self.run_dir = run_dir
        self.start_step = start_step
        self.end_step = end_step
        self.emit = emit
        self.run_id = uuid.uuid4().hex[:10]
        self.workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
        shards = config.train.shards
        if len(self.workers) > shards:
            raise ClusterError(
                f"found {len(self.workers)} workers, needs at most train.shards={shards} "
                "(each worker streams at least one shard); raise train.shards or use fewer workers"
            )
        if not self.workers:
            raise ClusterError("the cluster has no workers")
        blocks = np.array_split(np.arange(shards), len(self.workers))
        self.blocks = [tuple(int(s) for s in b) for b in blocks]
        leaves = shards if config.train.deterministic else len(self.workers)
        self.tree = ReductionTree(leaves, config.train.fan_in or default_fan_in(leaves))
        if config.train.deterministic:
            self.covers = [self.tree.cover(b[0], b[-1] + 1) for b in self.blocks]
        else:
            self.covers = [[(0, w)] for w in range(len(self.workers))]

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> RunResult:
        metrics = MetricsLog(self.run_dir, resume_step=self.start_step if self.start_step else None)
        try:
            self._create_replicas()
            self.emit({"kind": "start", "start_step": self.start_step, "end_step": self.end_step,
                       "steps_per_epoch": self.plan.steps_per_epoch, "workers": self.workers,
                       "dashboard": _dashboard_link(self.client), "run_dir": str(self.run_dir)})
            epochs = self._loop(metrics)
            completed = self.end_step == self.config.train.epochs * self.plan.steps_per_epoch
            if completed:
                state = self.client.submit(replica_state, self.run_id, workers=[self.workers[0]],
                                           key=f"{self.run_id}-weights").result()
                save_model(self.run_dir / MODEL_FILE, state)
            result = RunResult(self.run_dir, self.end_step, completed, epochs)
            (self.run_dir / SUMMARY_FILE).write_text(json.dumps(
                {"steps": self.end_step, "completed": completed, "epochs": epochs}, indent=1))
            self.emit({"kind": "end", "completed": completed, "steps": self.end_step, "epochs": epochs})
            return result
        finally:
            metrics.close()
            self._drop_replicas()

    def _loop(self, metrics: MetricsLog) -> list[dict[str, Any]]:
        spe = self.plan.steps_per_epoch
        ahead = self.config.train.ahead
        pending: deque[tuple[int, Future, Future]] = deque()  # (step, root, metrics)
        previous: Future | None = None
        epochs: list[dict[str, Any]] = []
        epoch_acc = _EpochAccumulator()
        submitted = self.start_step
        last_time = time.perf_counter()
        try:
            while True:
                # Keep `ahead` steps beyond the one we wait on in flight, so workers never idle
                # on the driver; the last "step" (end_step) only applies, validates, checkpoints.
                while submitted <= self.end_step and len(pending) <= ahead:
                    root = self._submit_step(submitted, previous)
                    pending.append((submitted, root, self.client.submit(
                        summarize, root, key=f"{self.run_id}-stats-{submitted}")))
                    previous = root
                    submitted += 1
                if not pending:
                    break
                t, _, stats_future = pending.popleft()
                stats = stats_future.result()
                now = time.perf_counter()
                step_time, last_time = now - last_time, now
                if t % spe == 0 and t > self.start_step:
                    record = epoch_acc.close(t // spe - 1, t, stats, self.config.loss)
                    epochs.append(record)
                    metrics.write(record)
                    self.emit(record)
                if t < self.end_step:
                    record = self._step_record(t, stats, step_time)
                    epoch_acc.add(stats)
                    metrics.write(record)
                    self.emit(record)
        except DasktrainError as exc:
            for _, root, stats_future in pending:
                root.cancel()
                stats_future.cancel()
            raise type(exc)(f"{exc}; {self._last_good()}") from None
        return epochs

    def _submit_step(self, t: int, previous: Future | None) -> Future:
        """Submit step ``t`` on every worker and the reduction above; returns the root's future."""
        spe = self.plan.steps_per_epoch
        boundary = t > self.start_step and (t % spe == 0 or t == self.end_step)
        every = self.config.checkpoint.every_steps
        checkpoint = t > self.start_step and (boundary or (every > 0 and t % every == 0))
        futures = []
        for w, addr in enumerate(self.workers):
            # Worker 0 writes the checkpoints: every replica holds the same state after an update.
            actions = StepActions(compute=t < self.end_step, validate=boundary,
                                  checkpoint=self._checkpoint_meta(t) if checkpoint and w == 0 else None)
            futures.append(self.client.submit(
                run_step, self.run_id, t, previous, actions, workers=[addr], allow_other_workers=False,
                key=f"{self.run_id}-step-{t}-w{w}"))
        if len(futures) == 1 and self.tree.root in self.covers[0]:
            return futures[0]
        return submit_tree(self.client, self.tree, futures, self.covers, key=f"{self.run_id}-{t}")

    def _checkpoint_meta(self, t: int) -> dict[str, Any]:
        epoch, k = self.plan.locate(t)
        return {"epoch": epoch, "step_in_epoch": k, "config_digest": self.config.digest(),
                "seed": self.config.train.seed, "config": self.config.model_dump(mode="json")}

    def _step_record(self, t: int, stats: dict[str, Any], step_time: float) -> dict[str, Any]:
        epoch, k = self.plan.locate(t)
        count = stats["count"]
        return {
            "kind": "step", "global_step": t, "epoch": epoch, "step": k, "samples": count,
            "loss": stats["loss_sum"] / count if count else float("nan"),
            "lr": lr_at(self.config, t, self.plan.steps_per_epoch),
            "step_time_s": step_time, "samples_per_s": count / step_time if step_time > 0 else 0.0,
            "data_wait_s": stats["data_wait_s"], "compute_s": stats["compute_s"],
        }

    # -- replicas -----------------------------------------------------------------------------

    def _create_replicas(self) -> None:
        ckpt = latest_checkpoint(self.run_dir) if self.start_step else None
        if ckpt is not None:
            load_checkpoint(ckpt)  # fail here, with the path, if it does not load
        n = len(self.workers)
        futures = []
        for w, addr in enumerate(self.workers):
            spec = ReplicaSpec(
                run_id=self.run_id, config=self.config, dataset=self.splits.train,
                train_chunks=self.splits.train_chunks, shards=self.blocks[w],
                cover=tuple(self.covers[w]), tree_leaves=self.tree.leaves, fan_in=self.tree.fan_in,
                val_dataset=self.splits.val, val_chunks=self.splits.val_chunks[w::n],
                run_dir=str(self.run_dir), resume_from=str(ckpt) if ckpt else None,
            )
            futures.append(self.client.submit(create_replica, spec, self._threads(addr), workers=[addr],
                                              allow_other_workers=False, key=f"{self.run_id}-create-w{w}"))
        for info in self.client.gather(futures):
            log.info("replica ready: %s", info)

    def _threads(self, addr: str) -> int:
        return int(self.client.scheduler_info(n_workers=-1)["workers"][addr]["nthreads"])

    def _drop_replicas(self) -> None:
        try:
            self.client.run(drop_replica, self.run_id, workers=self.workers, on_error="ignore")
        except Exception as exc:  # the cluster may be gone already; nothing to free then
            log.debug("could not drop replicas of %s: %s", self.run_id, exc)

    def _last_good(self) -> str:
        newest = latest_checkpoint(self.run_dir)
        return f"last good checkpoint: {newest}" if newest else "no checkpoint was written"


class _EpochAccumulator:
    """Sums a training epoch's step stats into its record."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum = 0.0
        self.count = 0
        self.correct = 0
        self.started = time.perf_counter()

    def add(self, stats: dict[str, Any]) -> None:
        self.loss_sum += stats["loss_sum"]
        self.count += stats["count"]
        self.correct += stats["correct"]

    def close(self, epoch: int, end_step: int, stats: dict[str, Any], loss: str) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started
        record: dict[str, Any] = {
            "kind": "epoch", "epoch": epoch, "end_step": end_step, "samples": self.count,
            "train_loss": self.loss_sum / self.count if self.count else None, "time_s": elapsed,
            "samples_per_s": self.count / elapsed if elapsed > 0 else 0.0,
        }
        if loss == "cross_entropy" and self.count:
            record["train_accuracy"] = self.correct / self.count
        if stats["val_count"]:
            record["val_loss"] = stats["val_loss_sum"] / stats["val_count"]
            record["val_samples"] = stats["val_count"]
            if loss == "cross_entropy":
                record["val_accuracy"] = stats["val_correct"] / stats["val_count"]
        self.reset()
        return record


def _dashboard_link(client: Client) -> str | None:
    """The dashboard's address, when the scheduler serves one."""
    if "dashboard" not in client.scheduler_info(n_workers=0).get("services", {}):
        return None
    return client.dashboard_link
