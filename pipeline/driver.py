"""The training driver: set up replicas, keep steps submitted ahead, record metrics.

The driver decides *what* runs where and never touches tensors while training: it submits one
step task per worker (pinned to it) and the reduction tasks above them, and receives one small
dict of numbers per step. The final weights are fetched once, at the end.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client, Future, wait

from dasktrain.checkpoint import (
    DATA_LAYOUT,
    check_data_layout,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_model,
    set_aside_damaged,
)
from dasktrain.collective import PeerFailedError, SegmentEnd, join_group, open_rendezvous, run_segment
from dasktrain.config import RunConfig
from dasktrain.errors import CheckpointError, ClusterError, DasktrainError
from dasktrain.metrics import MetricsLog
from dasktrain.objective import lr_at
from dasktrain.plan import SamplingPlan
from dasktrain.preflight import DataSplits, build_plan, check_model_fits, check_workers_fit, resolve_splits
from dasktrain.reduce import (
    NodeId,
    ReductionTree,
    RootRecipe,
    StepStats,
    default_fan_in,
    stats_of,
    submit_tree,
    summarize,
)
from dasktrain.replica import (
    ReplicaSpec,
    StepActions,
    create_replica,
    drop_replica,
    export_replica_state,
    replica_applied,
    replica_state,
    run_step,
    save_replica_checkpoint,
)
from dasktrain.run_lock import run_lock
from dasktrain.store import store_layout

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
    if config.parallel.pipeline > 1:
        from dasktrain.pipeline_driver import train_pipeline  # imports this module: import late

        return train_pipeline(config, client=client, resume=resume, until_epoch=until_epoch, on_event=on_event)
    splits = resolve_splits(config)
    plan = build_plan(config, splits)
    check_model_fits(config, splits.train)
    if client is None:
        check_workers_fit(config)  # say so before starting the cluster
    run_dir = Path(config.output_dir)
    with run_lock(run_dir, "train"):  # one writer per run directory, released on every exit
        start_step, end_step = run_span(config, run_dir, plan, resume, until_epoch)
        emit = on_event or (lambda event: None)
        with client_for(config, client) as c:
            session = _Session(config, c, splits, plan, run_dir, start_step, end_step, emit)
            return session.run()


@contextmanager
def client_for(config: RunConfig, client: Client | None) -> Iterator[Client]:
    if client is not None:
        yield client
        return
    from dasktrain.cluster import open_cluster  # the cluster package depends on pipeline, not the reverse

    with open_cluster(config.cluster) as started:
        yield started


def data_layout(config: RunConfig) -> dict[str, Any]:
    """The layout of every store the trajectory depends on, by config key; recorded in each
    checkpoint's ``state.json`` and checked by ``--resume`` (:func:`dasktrain.checkpoint.check_data_layout`)."""
    layouts = {"data.store": store_layout(config.data.store)}
    validation = config.data.validation
    if validation is not None and validation.store is not None:
        layouts["data.validation.store"] = store_layout(validation.store)
    return layouts


def run_span(config: RunConfig, run_dir: Path, plan: SamplingPlan, resume: bool,
             until_epoch: int | None) -> tuple[int, int]:
    """The global steps ``[start, end)`` this call trains: from the run directory's state
    (:func:`prepare_run_dir`, with its lock held) to the end, or to the end of ``until_epoch``."""
    start_step = prepare_run_dir(config, run_dir, resume)
    stop_epoch = min(config.train.epochs, until_epoch or config.train.epochs)
    end_step = stop_epoch * plan.steps_per_epoch
    if start_step > end_step:
        raise CheckpointError(f"the newest checkpoint in {run_dir} is at step {start_step}, past the requested end {end_step}")
    return start_step, end_step


def prepare_run_dir(config: RunConfig, run_dir: Path, resume: bool) -> int:
    """Check the run directory against ``resume``; returns the step training starts at.

    Called with the run directory's lock held. A resume goes on from the newest checkpoint that
    reads back whole (newer, damaged ones are set aside, saying so); it is refused when that
    checkpoint was written by another configuration, or when a store changed since (its length,
    chunking, arrays or metadata: the same config on other data is another trajectory)."""
    if resume:
        set_aside_damaged(run_dir)
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
    check_data_layout(newest, state.get(DATA_LAYOUT), data_layout(config))
    return int(state["step"])


@dataclass(frozen=True)
class Layout:
    """Which worker streams which shards, and the reduction tree over their partials."""

    workers: tuple[str, ...]
    blocks: tuple[tuple[int, ...], ...]
    tree: ReductionTree
    covers: tuple[tuple[NodeId, ...], ...]

    @classmethod
    def for_workers(cls, workers: list[str], config: RunConfig) -> Layout:
        shards = config.train.shards
        blocks = tuple(tuple(int(s) for s in b) for b in np.array_split(np.arange(shards), len(workers)))
        leaves = shards if config.train.deterministic else len(workers)
        tree = ReductionTree(leaves, config.train.fan_in or default_fan_in(leaves))
        if config.train.deterministic:
            covers = tuple(tuple(tree.cover(b[0], b[-1] + 1)) for b in blocks)
        else:
            covers = tuple(((0, w),) for w in range(len(workers)))
        return cls(tuple(workers), blocks, tree, covers)


Root = tuple[RootRecipe, list[Future]]
"""A step's reduced gradient as the next step's tasks take it: the recipe and its sources."""


@dataclass
class _InFlight:
    step: int
    root: Root | None
    stats: Future
    tasks: list[Future]
    apply_only: bool = False
    steps: int = 1
    """Steps the tasks run (more than one for a segment of ``reduce: collective``)."""


class _WorkersChanged(Exception):
    """Raised inside the loop when workers were lost, joined, or timed out."""

    def __init__(self, reason: str, exclude: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.exclude = exclude


class _Session:
    """One run of the training loop on a connected client.

    When the worker set changes (a worker lost, a straggler past ``step_timeout``, a worker
    joining), the session *regroups*: it cancels the steps in flight, copies the state of the
    most advanced surviving replica worker to worker onto every worker of the new set, deals
    the shards anew, and goes on from the first step whose update no survivor has applied.
    The plan does not change, so neither does the sequence of global batches.
    """

    MEMBERSHIP_POLL_S = 0.5
    SETUP_S = 300.0
    """Longest wait for a setup task on every worker (build a replica, join a group, hand over weights)."""
    DROP_S = 10.0
    SILENT_S = 5.0
    """A worker whose heartbeat (every 0.5 s on small clusters) is this much older than the
    freshest worker's is taken as frozen (SIGSTOP, a hung node) once a step is past its deadline."""
    LINEAGE_STEPS = 64
    SEGMENT_S = 2.0
    """``reduce: collective``: seconds of training one segment task aims at (progress arrives per segment)."""

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
        self.excluded: set[str] = set()
        self.generation = 0
        workers = self._alive()
        if not workers:
            raise ClusterError("the cluster has no workers")
        shards = config.train.shards
        if len(workers) > shards:
            raise ClusterError(
                f"found {len(workers)} workers, needs at most train.shards={shards} "
                "(each worker streams at least one shard); raise train.shards or use fewer workers"
            )
        self.layout = Layout.for_workers(workers, config)
        self.recorded = start_step  # steps below this have their metrics written
        self.epochs: list[dict[str, Any]] = []
        self.epoch_acc = _EpochAccumulator()
        self.last_record_time = time.perf_counter()
        self.epoch_closed = -1  # the epoch boundary whose record is written
        self.data_layout = data_layout(config)  # recorded in every checkpoint

    @property
    def workers(self) -> tuple[str, ...]:
        return self.layout.workers

    def _alive(self) -> list[str]:
        """Workers the scheduler knows now (asked, not cached), minus those this run excluded.

        Raises :class:`ClusterError` when the client has lost the scheduler: its tasks and their
        results are gone with it, and Dask's client would otherwise retry for minutes."""
        if self.client.status != "running":
            raise ClusterError(f"lost the Dask scheduler {self.client.scheduler.address if self.client.scheduler else ''} "
                               f"(client {self.client.status}); {self._last_good()}; go on with --resume once "
                               "a scheduler is back")
        try:
            nthreads = self.client.nthreads()
        except Exception as exc:  # the scheduler went away between the check and the call
            raise ClusterError(f"lost the Dask scheduler ({type(exc).__name__}: {exc}); {self._last_good()}; "
                               "go on with --resume once a scheduler is back") from None
        return sorted(set(nthreads) - self.excluded)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> RunResult:
        metrics = MetricsLog(self.run_dir, resume_step=self.start_step if self.start_step else None)
        try:
            try:
                self._create_replicas(state=None, applied=self.start_step)
            except _WorkersChanged as exc:
                raise ClusterError(f"the run could not start: {exc}") from None
            self.emit({"kind": "start", "start_step": self.start_step, "end_step": self.end_step,
                       "steps_per_epoch": self.plan.steps_per_epoch, "workers": list(self.workers),
                       "dashboard": _dashboard_link(self.client, self.config.cluster.dashboard), "run_dir": str(self.run_dir)})
            epochs = self._loop(metrics)
            completed = self.end_step == self.config.train.epochs * self.plan.steps_per_epoch
            if completed:
                save_model(self.run_dir / MODEL_FILE, self._final_weights())
            result = RunResult(self.run_dir, self.end_step, completed, epochs)
            (self.run_dir / SUMMARY_FILE).write_text(json.dumps(
                {"steps": self.end_step, "completed": completed, "epochs": epochs}, indent=1))
            self.emit({"kind": "end", "completed": completed, "steps": self.end_step, "epochs": epochs})
            return result
        finally:
            metrics.close()
            self._drop_replicas()

    def _loop(self, metrics: MetricsLog) -> list[dict[str, Any]]:
        self.metrics = metrics
        t = self.start_step
        regroups = 0
        run_from = self._run_segments if self.config.train.reduce == "collective" else self._run_steps
        while True:
            pending: deque[_InFlight] = deque()
            try:
                run_from(t, pending)
                return self.epochs
            except _WorkersChanged as first:
                self._cancel(pending)
                change: _WorkersChanged | None = first
                while change is not None:  # a regroup can itself meet a worker that stopped answering
                    regroups += 1
                    if regroups > 50:
                        raise ClusterError(f"the worker set kept changing ({regroups} regroups); last: {change}") from None
                    self.excluded.update(change.exclude)
                    try:
                        t, change = self._regroup(str(change)), None
                    except _WorkersChanged as again:
                        change = again
            except DasktrainError as exc:
                self._cancel(pending)
                raise type(exc)(f"{exc}; {self._last_good()}") from None

    def _run_steps(self, t: int, pending: deque[_InFlight]) -> None:
        """Run from step ``t`` (no update pending) to the end; raises _WorkersChanged on a change."""
        previous: Root | None = None
        submitted = t
        barrier = False  # an apply-only step is in flight: submit nothing until it is done
        last_poll = time.monotonic()
        while True:
            # Keep `ahead` steps beyond the one we wait on in flight, so workers never idle
            # on the driver; the last "step" (end_step) only applies, validates, checkpoints.
            while not barrier and submitted <= self.end_step and len(pending) <= self.config.train.ahead:
                if previous is not None and submitted < self.end_step and submitted % self.LINEAGE_STEPS == 0:
                    # Each step's tasks depend on the previous root, so Dask keeps the whole
                    # chain of finished tasks to be able to recompute it. Every LINEAGE_STEPS
                    # the chain is cut: apply the pending update on its own, wait for it, and
                    # start the next step with no dependency. It costs one pipeline bubble.
                    pending.append(self._submit_step(submitted, previous, compute=False))
                    previous, barrier = None, True
                    break
                entry = self._submit_step(submitted, previous, after_barrier=previous is None and submitted > t)
                pending.append(entry)
                previous = entry.root
                submitted += 1
            if not pending:
                if barrier:
                    barrier = False
                    continue
                return
            entry = pending[0]
            stats = self._wait(entry)
            pending.popleft()
            self._record(entry.step, stats, apply_only=entry.apply_only)
            last_poll = self._check_joined(last_poll)

    def _run_segments(self, t: int, pending: deque[_InFlight]) -> None:
        """``reduce: collective``: run from step ``t`` to the end in segments of many steps, one
        task per worker each, the next segment queued behind the one running."""
        after: list[Future] | None = None
        submitted = t
        length = 4  # until step times are known
        last_done = time.perf_counter()
        last_poll = time.monotonic()
        while True:
            while submitted < self.end_step and len(pending) < 2:
                stop = self._segment_stop(submitted, length)
                entry = self._submit_segment(submitted, stop, after)
                pending.append(entry)
                after, submitted = entry.tasks, stop
            if not pending:
                return
            entry = pending[0]
            result = self._wait_segment(entry)
            pending.popleft()
            # Workers time each step; stretch those times to the interval seen here, so that the
            # gaps between segments (task hand-over, driver) count too.
            now, times = time.perf_counter(), [s["step_time_s"] for s in result["steps"]]
            stretch = max(1.0, (now - last_done) / max(sum(times), 1e-9))
            last_done = now
            for i, stats in enumerate(result["steps"]):
                self._record(entry.step + i, stats, step_time=stats["step_time_s"] * stretch)
            stop = entry.step + len(result["steps"])
            if stop % self.plan.steps_per_epoch == 0:  # the epoch closes, with its validation
                self._record(stop, {**StepStats().as_dict(), **(result["val"] or {})}, apply_only=True)
            length = max(1, min(self.LINEAGE_STEPS, round(self.SEGMENT_S * len(times) / max(sum(times), 1e-6))))
            last_poll = self._check_joined(last_poll)

    def _check_joined(self, last_poll: float) -> float:
        """Once a second: raise _WorkersChanged when workers joined (a nanny's restart, a scale-up,
        a late batch job) and the run has shards for them, so they take shards over now. Returns
        the time of the last look."""
        if time.monotonic() - last_poll < 1.0:
            return last_poll
        joined = set(self._alive()) - set(self.workers)
        if joined and len(self.workers) < self.config.train.shards:
            raise _WorkersChanged(f"workers joined: {sorted(joined)}")
        return time.monotonic()

    def _segment_stop(self, start: int, length: int) -> int:
        """Where a segment from ``start`` ends: after ``length`` steps, or at the next epoch
        boundary, checkpoint or end, whichever comes first (those happen between segments)."""
        spe = self.plan.steps_per_epoch
        stop = min(start + length, self.end_step, (start // spe + 1) * spe)
        every = self.config.checkpoint.every_steps
        if every > 0:
            stop = min(stop, (start // every + 1) * every)
        return stop

    def _submit_segment(self, start: int, stop: int, after: list[Future] | None) -> _InFlight:
        spe = self.plan.steps_per_epoch
        every = self.config.checkpoint.every_steps
        boundary = stop % spe == 0 or stop == self.end_step
        checkpoint = boundary or (every > 0 and stop % every == 0)
        tasks = []
        for w, addr in enumerate(self.workers):
            end = SegmentEnd(validate=boundary, checkpoint=self._checkpoint_meta(stop) if checkpoint and w == 0 else None)
            tasks.append(self.client.submit(
                run_segment, self.run_id, start, stop, end, after[w] if after else None,
                workers=[addr], allow_other_workers=False,
                key=f"{self.run_id}-g{self.generation}-segment-{start}-{stop}-w{w}"))
        return _InFlight(start, None, tasks[0], tasks, steps=stop - start)

    def _wait_segment(self, entry: _InFlight) -> dict[str, Any]:
        """A segment's result (rank 0's); on failure, the error of the rank where it began."""
        try:
            return self._wait(entry)
        except _WorkersChanged:
            raise
        except PeerFailedError:
            for task in entry.tasks[1:]:
                try:
                    task.result(timeout=30)
                except PeerFailedError:
                    continue
                except Exception as cause:
                    raise cause from None
            raise

    def _form_group(self) -> None:
        """``reduce: collective``: rendezvous through the scheduler and build the process group."""
        timeout = self.config.train.step_timeout
        tag = f"{self.run_id}-g{self.generation}"
        rendezvous = self.client.submit(open_rendezvous, self.run_id, self.generation, timeout,
                                        workers=[self.workers[0]], allow_other_workers=False, key=f"{tag}-rendezvous")
        (master,) = self._gather_within([rendezvous], self.workers[:1], "opening the rendezvous")
        joined = [self.client.submit(join_group, self.run_id, self.generation, rank, len(self.workers), master,
                                     timeout, workers=[addr], allow_other_workers=False, key=f"{tag}-join-{rank}")
                  for rank, addr in enumerate(self.workers)]
        for info in self._gather_within(joined, self.workers, "joining the process group"):
            log.info("process group joined: %s", info)

    def _record(self, t: int, stats: dict[str, Any], apply_only: bool = False, step_time: float | None = None) -> None:
        """Write the metrics of step ``t`` (and of the epoch it closes), once per step.

        ``step_time`` is the step's duration measured where it ran; by default, the time since
        the last step was recorded here."""
        if t < self.recorded:
            return  # a step recomputed after a regroup: its metrics are already written
        if apply_only:  # the update before step t, and the epoch it closes; step t comes next
            if t % self.plan.steps_per_epoch == 0 and t > self.start_step and t == self.recorded:
                record = self.epoch_acc.close(t // self.plan.steps_per_epoch - 1, t, stats, self.config.loss)
                self.epochs.append(record)
                self.metrics.write(record)
                self.emit(record)
                self.epoch_closed = t
            return
        self.recorded = t + 1
        now = time.perf_counter()
        since_last, self.last_record_time = now - self.last_record_time, now
        step_time = since_last if step_time is None else step_time
        spe = self.plan.steps_per_epoch
        if t % spe == 0 and t > self.start_step and self.epoch_closed != t:
            record = self.epoch_acc.close(t // spe - 1, t, stats, self.config.loss)
            self.epochs.append(record)
            self.metrics.write(record)
            self.emit(record)
        if t < self.end_step:
            record = self._step_record(t, stats, step_time)
            self.epoch_acc.add(stats)
            self.metrics.write(record)
            self.emit(record)

    def _wait(self, entry: _InFlight) -> dict[str, Any]:
        """The stats of a step (or segment), watching for lost workers and stragglers while waiting.

        With ``train.step_timeout`` set, a wait that outlasts it drops the workers the scheduler
        no longer hears from (frozen, whatever task the step is stuck in), and a step (or segment,
        ``step_timeout`` per step) past its deadline drops the workers that have not answered."""
        timeout = self.config.train.step_timeout
        began = time.monotonic()
        deadline = began + timeout * entry.steps if timeout else None
        while True:
            try:
                return entry.stats.result(timeout=self.MEMBERSHIP_POLL_S)
            except TimeoutError:
                pass
            except Exception as exc:
                # With a worker gone, Dask may re-run old steps to rebuild lost results, and the
                # replicas refuse them: an error then means "regroup", not "stop". A genuine
                # error (bad data, NaN) comes back after the regroup and stops the run then.
                if set(self.workers) <= set(self._alive()):
                    # A collective's peer timing out is no error of the run's if that peer froze.
                    silent = [] if isinstance(exc, DasktrainError) or timeout is None else self._await_silence()
                    if not silent:
                        raise
                    raise _WorkersChanged(f"step {entry.step} failed ({exc}) as workers {silent} froze",
                                          exclude=tuple(silent)) from None
                raise _WorkersChanged(f"step {entry.step} failed as workers left: {exc}") from None
            alive = set(self._alive())
            lost = [w for w in self.workers if w not in alive]
            if lost:
                raise _WorkersChanged(f"lost workers {lost} during step {entry.step}")
            if timeout is None or deadline is None:
                continue
            now = time.monotonic()
            silent = self._silent_workers() if now - began > timeout else []
            if silent:
                raise _WorkersChanged(
                    f"step {entry.step} passed train.step_timeout={timeout}s and workers {silent} sent no "
                    f"heartbeat for {self.SILENT_S:.0f} s", exclude=tuple(silent))
            if now > deadline:
                stragglers = self._stragglers(entry)
                if not stragglers and now < deadline + self.SILENT_S:
                    continue  # a frozen worker shows as silent within SILENT_S: name it rather than no one
                raise _WorkersChanged(
                    f"step {entry.step} passed train.step_timeout={timeout}s; not answering: {list(stragglers)}",
                    exclude=stragglers,
                )

    def _stragglers(self, entry: _InFlight) -> tuple[str, ...]:
        """Workers to drop once ``entry`` is past its deadline: those whose own step task is not
        done (tree mode; in collective mode every rank's segment waits in the all-reduce for the
        slow one, so they cannot be told apart that way), and the silent ones."""
        late = set(self._silent_workers())
        if self.config.train.reduce != "collective":
            late.update(w for w, f in zip(self.workers, entry.tasks) if not f.done())
        return tuple(w for w in self.workers if w in late)

    def _await_silence(self) -> list[str]:
        """Silent workers, looked for during SILENT_S (a peer that froze a moment ago shows by then)."""
        until = time.monotonic() + self.SILENT_S + 1.0
        while True:
            silent = self._silent_workers()
            if silent or time.monotonic() > until:
                return silent
            time.sleep(self.MEMBERSHIP_POLL_S)

    def _silent_workers(self) -> list[str]:
        """Workers whose last heartbeat is more than SILENT_S older than the freshest one's
        (scheduler timestamps only, so clocks elsewhere do not matter)."""
        try:
            info = self.client.scheduler_info(n_workers=-1)["workers"]
        except Exception as exc:  # the scheduler itself is in trouble; the caller's deadline still holds
            log.warning("could not read worker heartbeats: %s", exc)
            return []
        seen = {w: info[w].get("last_seen", 0.0) for w in self.workers if w in info}
        if not seen:
            return []
        freshest = max(seen.values())
        return [w for w, last in seen.items() if freshest - last > self.SILENT_S]

    def _submit_step(self, t: int, previous: Root | None, compute: bool = True,
                     after_barrier: bool = False) -> _InFlight:
        """Submit step ``t`` on every worker and the reduction above it.

        ``compute=False`` only applies ``previous`` (and validates/checkpoints at boundaries);
        ``after_barrier`` marks the compute that follows such an apply-only step.
        """
        spe = self.plan.steps_per_epoch
        boundary = not after_barrier and t > self.start_step and (t % spe == 0 or t == self.end_step)
        every = self.config.checkpoint.every_steps
        checkpoint = boundary or (not after_barrier and t > self.start_step and every > 0 and t % every == 0)
        compute = compute and t < self.end_step
        tasks = []
        for w, addr in enumerate(self.workers):
            # Worker 0 writes the checkpoints: every replica holds the same state after an update.
            actions = StepActions(compute=compute, validate=boundary,
                                  checkpoint=self._checkpoint_meta(t) if checkpoint and w == 0 else None)
            recipe, sources = previous if previous is not None else (None, [])
            tasks.append(self.client.submit(
                run_step, self.run_id, t, recipe, sources, actions, workers=[addr], allow_other_workers=False,
                key=f"{self.run_id}-g{self.generation}-step-{t}{'' if compute else 'a'}-w{w}"))
        tag = f"{self.run_id}-g{self.generation}-{t}{'' if compute else 'a'}"
        # Reduction and stats tasks run on the run's workers only: never on one it dropped (a
        # frozen worker the scheduler still lists would hold them forever).
        workers = list(self.workers)
        recipe, sources = submit_tree(self.client, self.layout.tree, tasks, [list(c) for c in self.layout.covers],
                                      key=tag, workers=workers)
        # Stats are picked out where each source lives, so no gradient moves for the driver's
        # sake; with one worker, where everything lives, one task fewer per step.
        parts = sources if len(self.workers) == 1 else [
            self.client.submit(stats_of, s, key=f"{tag}-stats-of-{i}", workers=workers) for i, s in enumerate(sources)]
        stats = self.client.submit(summarize, recipe.picks, *parts, key=f"{tag}-stats", workers=workers)
        extra = [] if parts is sources else parts
        return _InFlight(t, (recipe, sources), stats, [*tasks, *extra], apply_only=not compute and t < self.end_step)

    def _checkpoint_meta(self, t: int) -> dict[str, Any]:
        epoch, k = self.plan.locate(t)
        return {"epoch": epoch, "step_in_epoch": k, "config_digest": self.config.digest(),
                "seed": self.config.train.seed, "config": self.config.model_dump(mode="json"),
                DATA_LAYOUT: self.data_layout}

    def _step_record(self, t: int, stats: dict[str, Any], step_time: float) -> dict[str, Any]:
        epoch, k = self.plan.locate(t)
        count = stats["count"]
        record = {
            "kind": "step", "global_step": t, "epoch": epoch, "step": k, "samples": count,
            "loss": stats["loss_sum"] / count if count else float("nan"),
            "lr": lr_at(self.config, t, self.plan.steps_per_epoch),
            "step_time_s": step_time, "samples_per_s": count / step_time if step_time > 0 else 0.0,
            "data_wait_s": stats["data_wait_s"], "compute_s": stats["compute_s"], "chunks_read": stats["chunks_read"],
            "generation": self.generation, "workers": len(self.workers),
        }
        if "reduce_s" in stats:  # reduce: collective measures its all-reduces on the workers
            record["reduce_s"] = stats["reduce_s"]
        if stats["nonfinite"]:
            record["skipped"] = True
            log.warning("step %d had a non-finite loss on %d shard(s): update skipped", t, stats["nonfinite"])
        return record

    # -- replicas and regrouping ----------------------------------------------------------------

    def _create_replicas(self, state: Future | None, applied: int, checkpoint: Path | None = None) -> None:
        """Build a replica on every worker of the layout: from ``state`` (a surviving replica's,
        worker to worker), from ``checkpoint``, from the newest checkpoint when resuming, or fresh."""
        ckpt = checkpoint
        if ckpt is None and state is None and applied:
            ckpt = latest_checkpoint(self.run_dir)
        if ckpt is not None:
            load_checkpoint(ckpt)  # fail here, with the path, if it does not load
        n = len(self.workers)
        nthreads = self.client.nthreads()
        futures = []
        for w, addr in enumerate(self.workers):
            spec = ReplicaSpec(
                run_id=self.run_id, config=self.config, dataset=self.splits.train,
                train_chunks=self.splits.train_chunks, shards=self.layout.blocks[w],
                cover=self.layout.covers[w], tree_leaves=self.layout.tree.leaves, fan_in=self.layout.tree.fan_in,
                val_dataset=self.splits.val, val_chunks=self.splits.val_chunks[w::n],
                run_dir=str(self.run_dir), resume_from=str(ckpt) if ckpt else None,
                generation=self.generation, applied=applied,
            )
            futures.append(self.client.submit(
                create_replica, spec, nthreads[addr], state, workers=[addr], allow_other_workers=False,
                key=f"{self.run_id}-g{self.generation}-create-w{w}"))
        for info in self._gather_within(futures, self.workers, "building replicas"):
            log.info("replica ready: %s", info)
        if self.config.train.reduce == "collective":
            self._form_group()

    def _regroup(self, reason: str) -> int:
        """Rebuild the replicas on the workers alive now; returns the step to go on from."""
        log.warning("regrouping: %s", reason)
        old = self.workers
        alive = self._alive()
        survivors = [w for w in old if w in alive]
        applied: dict[str, int] = {}
        history: dict[int, dict[str, Any]] = {}
        for w in survivors:
            fut = self.client.submit(replica_applied, self.run_id, workers=[w], allow_other_workers=False,
                                     key=f"{self.run_id}-g{self.generation}-applied-{w}")
            try:
                # A collective run's survivors may first wait out the group's timeout.
                status = fut.result(timeout=(self.config.train.step_timeout or 120) + 30)
                applied[w] = status["applied"]
                history.update(status["history"])
            except TimeoutError:  # frozen, or stuck in a step: it must not hold the regroup up again
                log.warning("worker %s did not give its replica state in time; dropping it", w)
                self.client.cancel([fut])
                self.excluded.add(w)
            except Exception as exc:  # it died too, or holds no replica: not a source
                log.warning("worker %s cannot give its replica state: %s", w, exc)
        alive = [w for w in alive if w not in self.excluded]
        # Updates survivors applied while the driver was not yet told: record them now, from
        # the root stats the replicas kept, so every applied step has its metrics line.
        for t in range(self.recorded, max(applied.values(), default=0)):
            self._record(t, history[t])
        min_workers = self.config.train.min_workers
        grace_end = time.monotonic() + self.config.train.worker_grace_s
        while len(alive) < min_workers and time.monotonic() < grace_end:
            time.sleep(self.MEMBERSHIP_POLL_S)
            alive = self._alive()
        if len(alive) < min_workers:
            where = self._checkpoint_from(applied)
            raise ClusterError(
                f"the cluster shrank to {len(alive)} workers, below train.min_workers={min_workers}; "
                f"{where}; resume with --resume once workers are back"
            )
        self.generation += 1
        self.layout = Layout.for_workers(alive[: self.config.train.shards], self.config)
        if applied:
            step = max(applied.values())
            source = next(w for w, a in applied.items() if a == step)
            state = self.client.submit(export_replica_state, self.run_id, workers=[source],
                                       allow_other_workers=False, key=f"{self.run_id}-g{self.generation}-state")
            self._create_replicas(state=state, applied=step)
        else:
            # No replica survived: go on from a checkpoint, the newest one not past the
            # metrics already written (so no applied step goes without its metrics line).
            found = list_checkpoints(self.run_dir)
            usable = [c for c in found if int(c.name.split("-")[1]) <= self.recorded] or found[-1:]
            chosen = usable[-1] if usable else None
            step = load_checkpoint(chosen).step if chosen else 0
            log.warning("no replica survived; going on from %s", chosen or "the initial weights")
            self._create_replicas(state=None, applied=step, checkpoint=chosen)
        event = {"kind": "regroup", "reason": reason, "global_step": step, "generation": self.generation,
                 "lost": sorted(set(old) - set(alive)), "joined": sorted(set(self.workers) - set(old)),
                 "workers": len(self.workers), "end_step": step}
        self.metrics.write(event)
        self.emit(event)
        return step

    def _checkpoint_from(self, applied: dict[str, int]) -> str:
        if not applied:
            return self._last_good()
        source = max(applied, key=lambda w: applied[w])
        fut = self.client.submit(save_replica_checkpoint, self.run_id, self._checkpoint_meta(applied[source]),
                                 workers=[source], allow_other_workers=False)
        fut.result(timeout=120)
        return f"checkpoint written at step {applied[source]}"

    def _cancel(self, pending: deque[_InFlight]) -> None:
        futures = [f for e in pending for f in (*(e.root[1] if e.root else ()), e.stats, *e.tasks)]
        if futures:
            self.client.cancel(futures)
        pending.clear()

    def _gather_within(self, futures: list[Future], workers: tuple[str, ...] | list[str], what: str) -> list[Any]:
        """Results of one task per worker (``futures[i]`` on ``workers[i]``), waited for at most
        SETUP_S; workers whose task has not ended by then are dropped (the caller regroups)."""
        try:
            wait(futures, timeout=self.SETUP_S)
        except TimeoutError:
            late = tuple(w for w, f in zip(workers, futures) if not f.done())
            raise _WorkersChanged(f"{what}: workers {list(late)} did not answer within {self.SETUP_S:.0f} s",
                                  exclude=late) from None
        return self.client.gather(futures)

    def _final_weights(self) -> dict[str, Any]:
        """The trained weights, from the first replica that hands them over in time."""
        for w, addr in enumerate(self.workers):
            future = self.client.submit(replica_state, self.run_id, workers=[addr], allow_other_workers=False,
                                        key=f"{self.run_id}-weights-w{w}")
            try:
                state: dict[str, Any] = future.result(timeout=self.SETUP_S)
                return state
            except TimeoutError:
                log.warning("worker %s did not hand over the final weights in %.0f s", addr, self.SETUP_S)
                self.client.cancel([future])
        raise ClusterError(f"no worker handed over the final weights within {self.SETUP_S:.0f} s; {self._last_good()}")

    def _drop_replicas(self) -> None:
        """Free the run's replicas, waiting DROP_S at most: a frozen worker must not hold the exit."""
        def drop() -> None:
            try:
                self.client.run(drop_replica, self.run_id, workers=list(self._alive()), on_error="ignore")
            except Exception as exc:  # the cluster may be gone already; nothing to free then
                log.debug("could not drop replicas of %s: %s", self.run_id, exc)

        dropper = threading.Thread(target=drop, name=f"drop-{self.run_id}", daemon=True)
        dropper.start()
        dropper.join(self.DROP_S)
        if dropper.is_alive():
            log.warning("some workers did not free run %s's replicas within %.0f s", self.run_id, self.DROP_S)

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


def _dashboard_link(client: Client, wanted: bool) -> str | None:
    """The dashboard's address, when one was asked for and can be drawn (it needs bokeh)."""
    if not wanted or importlib.util.find_spec("bokeh") is None:
        return None
    if "dashboard" not in client.scheduler_info(n_workers=0).get("services", {}):
        return None
    return client.dashboard_link
