"""What the two data-parallel engines share: a replica of the model on every worker.

``tree`` and ``collective`` both keep one replica (model, optimizer, shard streams) per worker in
the worker-resident registry (:mod:`dasktrain.replica`) and differ only in how a step's gradient
sum is formed. This module holds the rest: which worker streams which shards, building the
replicas, watching the workers while a step runs (lost, joined, frozen, past
``train.step_timeout``), and regrouping when the worker set changed.

Regrouping: the steps in flight are dropped, the state of the most advanced surviving replica is
copied worker to worker onto every worker of the new set, the shards are dealt anew, and the run
goes on from the first step whose update no survivor applied. The plan does not change, so
neither does the sequence of global batches.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from distributed import Future

from dasktrain.checkpoint import checkpoint_step, latest_checkpoint, list_checkpoints
from dasktrain.config import RunConfig
from dasktrain.engines.base import Engine, RunContext, StepResult, StepSink, WorkersChanged, silent_workers, wait_done
from dasktrain.errors import ClusterError, DasktrainError
from dasktrain.reduce import NodeId, ReductionTree, default_fan_in
from dasktrain.replica import (
    ReplicaSpec,
    create_replica,
    drop_replica,
    export_replica_state,
    replica_applied,
    replica_state,
    save_replica_checkpoint,
)
from dasktrain.storage import AnyPath

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Which worker streams which shards, and the reduction tree over their partials."""

    workers: tuple[str, ...]
    blocks: tuple[tuple[int, ...], ...]
    tree: ReductionTree
    covers: tuple[tuple[NodeId, ...], ...]

    @classmethod
    def for_workers(cls, workers: Sequence[str], config: RunConfig) -> Layout:
        shards = config.train.shards
        blocks = tuple(tuple(int(s) for s in b) for b in np.array_split(np.arange(shards), len(workers)))
        leaves = shards if config.train.deterministic else len(workers)
        tree = ReductionTree(leaves, config.train.fan_in or default_fan_in(leaves))
        if config.train.deterministic:
            covers = tuple(tuple(tree.cover(b[0], b[-1] + 1)) for b in blocks)
        else:
            covers = tuple(((0, w),) for w in range(len(workers)))
        return cls(tuple(workers), blocks, tree, covers)


class ReplicaEngine(Engine):
    """A replica per worker, regrouped when the worker set changes."""

    MEMBERSHIP_POLL_S = 0.5
    SETUP_S = 300.0
    """Longest wait for a setup task on every worker (build a replica, join a group, hand over weights)."""
    DROP_S = 10.0
    SILENT_S = 5.0
    """A worker whose heartbeat (every 0.5 s on small clusters) is this much older than the
    freshest worker's is taken as frozen (SIGSTOP, a hung node) once a step is past its deadline."""
    MAX_REGROUPS = 50
    JOIN_POLL_S = 1.0
    """Seconds between two looks for workers that joined (each asks the scheduler)."""

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.excluded: set[str] = set()
        self.generation = 0
        self.regroups = 0
        workers = self._alive()
        if not workers:
            raise ClusterError("the cluster has no workers")
        shards = self.config.train.shards
        if len(workers) > shards:
            raise ClusterError(
                f"found {len(workers)} workers, needs at most train.shards={shards} "
                "(each worker streams at least one shard); raise train.shards or use fewer workers"
            )
        self.layout = Layout.for_workers(workers, self.config)
        self.last_poll = time.monotonic()

    @property
    def workers(self) -> tuple[str, ...]:
        return self.layout.workers

    def start_info(self) -> dict[str, Any]:
        return {"dashboard": _dashboard_link(self.client, self.config.cluster.dashboard)}

    def reset(self) -> None:
        """Forget what was submitted: the replicas are being (re)built, nothing in flight stands."""

    def start(self, step: int) -> None:
        self.reset()
        try:
            self._create_replicas(state=None, applied=step)
        except WorkersChanged as exc:
            raise ClusterError(f"the run could not start: {exc}") from None

    def step_extra(self) -> dict[str, Any]:
        """Fields every step record of this engine carries."""
        return {"generation": self.generation, "workers": len(self.workers)}

    # -- the worker set ---------------------------------------------------------------------

    def _alive(self) -> list[str]:
        """Workers the scheduler knows now (asked, not cached), minus those this run excluded.

        Raises :class:`ClusterError` when the client has lost the scheduler: its tasks and their
        results are gone with it, and Dask's client would otherwise retry for minutes."""
        if self.client.status != "running":
            raise ClusterError(f"lost the Dask scheduler {self.client.scheduler.address if self.client.scheduler else ''} "
                               f"(client {self.client.status}); go on with --resume once a scheduler is back")
        try:
            nthreads = self.client.nthreads()
        except Exception as exc:  # the scheduler went away between the check and the call
            raise ClusterError(f"lost the Dask scheduler ({type(exc).__name__}: {exc}); "
                               "go on with --resume once a scheduler is back") from None
        return sorted(set(nthreads) - self.excluded)

    def poll(self) -> None:
        """Every JOIN_POLL_S (a second): workers that joined (a nanny's restart, a scale-up, a late batch job)
        take shards over now, when the run has shards for them."""
        if time.monotonic() - self.last_poll < self.JOIN_POLL_S:
            return
        joined = set(self._alive()) - set(self.workers)
        self.last_poll = time.monotonic()
        if joined and len(self.workers) < self.config.train.shards:
            raise WorkersChanged(f"workers joined: {sorted(joined)}")

    def watch(self, result: Future, step: int, steps: int, unfinished: Sequence[Future] | None) -> Any:
        """The value of ``result`` (the work from ``step``: one step or a segment of ``steps``),
        watching the workers while waiting (see :meth:`_watch`)."""
        return self._watch([result], step, steps, unfinished, lambda: result.result(timeout=5.0))

    def watch_all(self, futures: Sequence[Future], step: int) -> None:
        """Return once every one of ``futures`` (the tasks of ``step``, one per worker in worker
        order) has finished, their values left where they are; raise the error of one that
        failed. Watches the workers meanwhile, as :meth:`_watch` says."""

        def raise_failed() -> None:
            for future in futures:
                if future.done() and future.status != "finished":
                    future.result(timeout=5.0)  # raises its error; only the error travels

        self._watch(futures, step, 1, futures, raise_failed)

    def _watch(self, futures: Sequence[Future], step: int, steps: int, unfinished: Sequence[Future] | None,
               take: Callable[[], Any]) -> Any:
        """``take()`` once every one of ``futures`` is done (or one failed), watching the workers.

        With ``train.step_timeout`` set, a wait that outlasts it drops the workers the scheduler
        no longer hears from (frozen, whatever task the step is stuck in), and a wait past
        ``steps`` x the timeout drops the workers whose task in ``unfinished`` has not ended
        (or, without such tasks, the silent ones)."""
        timeout = self.config.train.step_timeout
        began = time.monotonic()
        deadline = began + timeout * steps if timeout else None
        # Waited for with callbacks, and taken only once done: ``result(timeout=...)`` on a
        # future still running can race inside Dask's sync() (an UnboundLocalError from
        # distributed.utils.sync). A result whose worker died goes back to pending: then the
        # callback is set again and the worker set is looked at, as for a step still running.
        finished = threading.Event()

        def arm() -> None:
            finished.clear()
            for future in futures:
                if not future.done():
                    future.add_done_callback(lambda _: finished.set())
            if all(f.done() for f in futures):
                finished.set()

        arm()
        looked = time.monotonic()
        while True:
            try:
                if finished.wait(self.MEMBERSHIP_POLL_S):
                    if all(f.done() for f in futures) or any(f.status == "error" for f in futures):
                        return take()
                    arm()
                    if time.monotonic() - looked < self.MEMBERSHIP_POLL_S:
                        continue  # one more task of the step done: the worker set is looked at on the poll
            except TimeoutError:
                pass  # lost again between the look and the fetch: the checks below say why
            except Exception as exc:
                # With a worker gone, Dask may re-run old steps to rebuild lost results, and the
                # replicas refuse them: an error then means "regroup", not "stop". A genuine
                # error (bad data, NaN) comes back after the regroup and stops the run then.
                if set(self.workers) <= set(self._alive()):
                    # A collective's peer timing out is no error of the run's if that peer froze.
                    silent = [] if isinstance(exc, DasktrainError) or timeout is None else self._await_silence()
                    if not silent:
                        raise
                    raise WorkersChanged(f"step {step} failed ({exc}) as workers {silent} froze",
                                         exclude=tuple(silent)) from None
                raise WorkersChanged(f"step {step} failed as workers left: {exc}") from None
            looked = time.monotonic()
            alive = set(self._alive())
            lost = [w for w in self.workers if w not in alive]
            if lost:
                raise WorkersChanged(f"lost workers {lost} during step {step}")
            if timeout is None or deadline is None:
                continue
            now = time.monotonic()
            silent = self._silent_workers() if now - began > timeout else []
            if silent:
                raise WorkersChanged(
                    f"step {step} passed train.step_timeout={timeout}s and workers {silent} sent no "
                    f"heartbeat for {self.SILENT_S:.0f} s", exclude=tuple(silent))
            if now > deadline:
                late = set(self._silent_workers())
                if unfinished is not None:
                    late.update(w for w, f in zip(self.workers, unfinished) if not f.done())
                stragglers = tuple(w for w in self.workers if w in late)
                if len(stragglers) in (0, len(self.workers)) and now < deadline + self.SILENT_S:
                    # A frozen worker shows as silent within SILENT_S: name it, rather than no one,
                    # or everyone (the others' steps wait on its data or in its all-reduce).
                    continue
                raise WorkersChanged(f"step {step} passed train.step_timeout={timeout}s; not answering: {list(stragglers)}",
                                     exclude=stragglers)

    def _await_silence(self) -> list[str]:
        """Silent workers, looked for during SILENT_S (a peer that froze a moment ago shows by then)."""
        until = time.monotonic() + self.SILENT_S + 1.0
        while True:
            silent = self._silent_workers()
            if silent or time.monotonic() > until:
                return silent
            time.sleep(self.MEMBERSHIP_POLL_S)

    def _silent_workers(self) -> list[str]:
        return silent_workers(self.client, self.workers, self.SILENT_S)

    def gather_within(self, futures: list[Future], workers: Sequence[str], what: str) -> list[Any]:
        """Results of one task per worker (``futures[i]`` on ``workers[i]``), waited for at most
        SETUP_S. A worker that leaves meanwhile (its pinned task would wait for it for good)
        makes the caller regroup at once; workers whose task has not ended by SETUP_S are dropped."""
        deadline = time.monotonic() + self.SETUP_S
        while not wait_done(futures, self.MEMBERSHIP_POLL_S):
            lost = [w for w in workers if w not in self._alive()]
            if lost:
                raise WorkersChanged(f"{what}: workers {lost} left")
            if time.monotonic() > deadline:
                late = tuple(w for w, f in zip(workers, futures) if not f.done())
                raise WorkersChanged(f"{what}: workers {list(late)} did not answer within {self.SETUP_S:.0f} s",
                                     exclude=late)
        return self.client.gather(futures)

    # -- replicas ---------------------------------------------------------------------------

    def _create_replicas(self, state: Future | None, applied: int, checkpoint: AnyPath | None = None) -> None:
        """Build a replica on every worker of the layout: from ``state`` (a surviving replica's,
        worker to worker), from ``checkpoint``, from the newest checkpoint when resuming, or fresh."""
        ctx = self.ctx
        ckpt = checkpoint
        if ckpt is None and state is None and applied:
            ckpt = latest_checkpoint(ctx.run_dir)
        n = len(self.workers)
        nthreads = self.client.nthreads()
        gone = [addr for addr in self.workers if addr not in nthreads]
        if gone:  # left since the layout was made (a kill during a regroup)
            raise WorkersChanged(f"workers {gone} left while the replicas were being built")
        futures = []
        for w, addr in enumerate(self.workers):
            spec = ReplicaSpec(
                run_id=ctx.run_id, config=self.config, dataset=ctx.splits.train,
                train_chunks=ctx.splits.train_chunks, shards=self.layout.blocks[w],
                cover=self.layout.covers[w], tree_leaves=self.layout.tree.leaves, fan_in=self.layout.tree.fan_in,
                val_dataset=ctx.splits.val, val_chunks=ctx.splits.val_chunks[w::n],
                run_dir=str(ctx.run_dir), resume_from=str(ckpt) if ckpt else None,
                generation=self.generation, applied=applied,
            )
            futures.append(self.client.submit(
                create_replica, spec, nthreads[addr], state, workers=[addr], allow_other_workers=False,
                key=f"{ctx.run_id}-g{self.generation}-create-w{w}"))
        for info in self.gather_within(futures, self.workers, "building replicas"):
            log.info("replica ready: %s", info)
        self.after_create()

    def after_create(self) -> None:
        """What an engine adds once every replica is built (the collective forms its group)."""

    def recover(self, change: WorkersChanged, sink: StepSink) -> tuple[int, dict[str, Any]]:
        """Rebuild the replicas on the workers alive now; returns the step to go on from."""
        self.reset()
        self.regroups += 1
        if self.regroups > self.MAX_REGROUPS:
            raise ClusterError(f"the worker set kept changing ({self.regroups} regroups); last: {change}")
        self.excluded.update(change.exclude)
        reason = str(change)
        log.warning("regrouping: %s", reason)
        ctx = self.ctx
        old = self.workers
        alive = self._alive()
        survivors = [w for w in old if w in alive]
        applied: dict[str, int] = {}
        history: dict[int, dict[str, Any]] = {}
        asked = {w: self.client.submit(replica_applied, ctx.run_id, workers=[w], allow_other_workers=False,
                                       key=f"{ctx.run_id}-g{self.generation}-applied-{w}") for w in survivors}
        # A collective run's survivors may first wait out the group's timeout.
        deadline = time.monotonic() + (self.config.train.step_timeout or 120) + 30
        gone: set[str] = set()  # survivors that left too: no source, and their pinned task would wait for them
        while not wait_done([f for w, f in asked.items() if w not in gone], self.MEMBERSHIP_POLL_S):
            if time.monotonic() > deadline:
                break
            gone.update(w for w in asked if w not in self._alive())
        for w, fut in asked.items():
            if w in gone and not fut.done():
                log.warning("worker %s left during the regroup", w)
                self.client.cancel([fut])
                continue
            if not fut.done():  # frozen, or stuck in a step: it must not hold the regroup up again
                log.warning("worker %s did not give its replica state; dropping it", w)
                self.client.cancel([fut])
                self.excluded.add(w)
                continue
            try:
                status = fut.result()
                applied[w] = status["applied"]
                history.update(status["history"])
            except Exception as exc:  # it died too, or holds no replica: not a source
                log.warning("worker %s cannot give its replica state: %s", w, exc)
        alive = [w for w in alive if w not in self.excluded]
        # Updates survivors applied while the driver was not yet told: record them now, from
        # the root stats the replicas kept, so every applied step has its metrics line.
        for t in range(sink.recorded, max(applied.values(), default=0)):
            sink.step(StepResult(t, history[t], extra=self.step_extra()))
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
            state = self.client.submit(export_replica_state, ctx.run_id, workers=[source],
                                       allow_other_workers=False, key=f"{ctx.run_id}-g{self.generation}-state")
            self._create_replicas(state=state, applied=step)
        else:
            # No replica survived: go on from a checkpoint, the newest one not past the
            # records already written (so no applied step goes without its metrics line).
            found = list_checkpoints(ctx.run_dir)
            usable = [c for c in found if checkpoint_step(c) <= sink.recorded] or found[-1:]
            chosen = usable[-1] if usable else None
            step = checkpoint_step(chosen) if chosen else 0
            log.warning("no replica survived; going on from %s", chosen or "the initial weights")
            self._create_replicas(state=None, applied=step, checkpoint=chosen)
        event = {"kind": "regroup", "reason": reason, "global_step": step, "generation": self.generation,
                 "lost": sorted(set(old) - set(alive)), "joined": sorted(set(self.workers) - set(old)),
                 "workers": len(self.workers), "end_step": step}
        return step, event

    def _checkpoint_from(self, applied: dict[str, int]) -> str:
        if not applied:
            return "no replica survived to checkpoint"
        source = max(applied, key=lambda w: applied[w])
        fut = self.client.submit(save_replica_checkpoint, self.ctx.run_id, self.ctx.checkpoint_meta(applied[source]),
                                 workers=[source], allow_other_workers=False)
        fut.result(timeout=120)
        return f"checkpoint written at step {applied[source]}"

    def final_weights(self) -> dict[str, Any]:
        """The trained weights, from the first replica that hands them over in time."""
        for w, addr in enumerate(self.workers):
            future = self.client.submit(replica_state, self.ctx.run_id, workers=[addr], allow_other_workers=False,
                                        key=f"{self.ctx.run_id}-weights-w{w}")
            try:
                state: dict[str, Any] = future.result(timeout=self.SETUP_S)
                return state
            except TimeoutError:
                log.warning("worker %s did not hand over the final weights in %.0f s", addr, self.SETUP_S)
                self.client.cancel([future])
        raise ClusterError(f"no worker handed over the final weights within {self.SETUP_S:.0f} s")

    def close(self) -> None:
        """Free the run's replicas, waiting DROP_S at most: a frozen worker must not hold the exit."""
        run_id = self.ctx.run_id

        def drop() -> None:
            try:
                self.client.run(drop_replica, run_id, workers=list(self._alive()), on_error="ignore")
            except Exception as exc:  # the cluster may be gone already; nothing to free then
                log.debug("could not drop replicas of %s: %s", run_id, exc)

        dropper = threading.Thread(target=drop, name=f"drop-{run_id}", daemon=True)
        dropper.start()
        dropper.join(self.DROP_S)
        if dropper.is_alive():
            log.warning("some workers did not free run %s's replicas within %.0f s", run_id, self.DROP_S)


def _dashboard_link(client: Any, wanted: bool) -> str | None:
    """The dashboard's address, when one was asked for and can be drawn (it needs bokeh)."""
    if not wanted or importlib.util.find_spec("bokeh") is None:
        return None
    if "dashboard" not in client.scheduler_info(n_workers=0).get("services", {}):
        return None
    link: str = client.dashboard_link
    return link
