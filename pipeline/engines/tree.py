"""``reduce: tree``: one Dask task per worker per step, gradients summed by a tree of tasks.

Each step, every worker's step task applies the previous step's reduced gradient (it sums the
root's children itself, so no root task sits on the critical path), computes its shards'
gradient and returns one flat buffer; the tree tasks (:mod:`dasktrain.reduce`) sum the buffers.
The step's small numbers reach the driver as each worker's event (:mod:`dasktrain.step_events`),
not through tasks: no gradient moves, and a step is only its step tasks (and, above four workers,
the tree's). The run loop keeps ``train.ahead`` steps in flight behind the one it waits on.

Every LINEAGE_STEPS steps the chain of step tasks is cut: Dask keeps the whole chain of finished
tasks to be able to recompute it, so the pending update is applied on its own (an apply-only
step), waited for, and the next step starts with no dependency. It costs one pipeline bubble.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from distributed import Future

from dasktrain.engines.base import Outcome, RunContext, StepResult
from dasktrain.engines.replicas import ReplicaEngine
from dasktrain.reduce import RootRecipe, StepStats, stats_of, submit_tree
from dasktrain.replica import StepActions, run_step
from dasktrain.step_events import GRACE_S, StepInbox

log = logging.getLogger(__name__)

Root = tuple[RootRecipe, list[Future]]
"""A step's reduced gradient as the next step's tasks take it: the recipe and its sources."""


@dataclass
class _InFlight:
    step: int
    root: Root
    tasks: list[Future]
    """The step task of each worker, in worker order."""
    compute: bool
    validate: bool
    cut: bool = False
    """An apply-only step that cuts the task chain: nothing is submitted behind it."""


class TreeEngine(ReplicaEngine):
    """Data parallelism with gradients summed by Dask tasks."""

    LINEAGE_STEPS = 64
    EVENTS_GRACE_S = GRACE_S
    """Seconds a step's events may lag its tasks before the numbers are asked of the tasks."""

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.inbox = StepInbox(self.client, ctx.run_id)
        self.reset()

    def reset(self) -> None:
        self.inbox.forget()
        self.previous: Root | None = None
        self.first: int | None = None
        """The first step submitted since the replicas were (re)built."""

    def first_submission(self, t: int) -> int | None:
        """Always ``t``: at the end too, an apply-only step applies the last update (and
        validates and checkpoints the end, after a regroup there)."""
        return t

    def ready(self, pending: Sequence[_InFlight]) -> bool:
        return not any(e.cut for e in pending) and len(pending) <= self.config.train.ahead

    def submit(self, t: int) -> tuple[_InFlight, int | None]:
        end = self.ctx.cadence.end
        if self.first is None:
            self.first = t
        if self.previous is not None and t < end and t % self.LINEAGE_STEPS == 0:
            entry = self._submit_step(t, self.previous, compute=False, repeat=False)
            entry.cut = True
            self.previous = None
            return entry, t  # the same step, computed once the cut has been applied
        entry = self._submit_step(t, self.previous, compute=t < end, repeat=self.previous is None and t > self.first)
        self.previous = entry.root
        return entry, (t + 1 if t < end else None)

    def _submit_step(self, t: int, previous: Root | None, compute: bool, repeat: bool) -> _InFlight:
        """Submit step ``t`` on every worker and the reduction above it.

        ``compute=False`` only applies ``previous`` (and validates/checkpoints at boundaries);
        ``repeat`` marks the compute that follows a cut, whose boundary work the cut did."""
        ctx = self.ctx
        validate = not repeat and ctx.cadence.epoch_end(t)
        checkpoint = not repeat and ctx.cadence.checkpoint(t)
        gen = f"{ctx.run_id}-g{self.generation}"
        suffix = "" if compute else "a"
        tasks = []
        for w, addr in enumerate(self.workers):
            # Worker 0 writes the checkpoints: every replica holds the same state after an update.
            actions = StepActions(compute=compute, validate=validate,
                                  checkpoint=ctx.checkpoint_meta(t) if checkpoint and w == 0 else None)
            recipe, sources = previous if previous is not None else (None, [])
            tasks.append(self.client.submit(
                run_step, ctx.run_id, t, recipe, sources, actions, workers=[addr], allow_other_workers=False,
                key=f"{gen}-step-{t}{suffix}-w{w}"))
        # Reduction tasks run on the run's workers only: never on one it dropped (a frozen
        # worker the scheduler still lists would hold them forever).
        recipe, sources = submit_tree(self.client, self.layout.tree, tasks, [list(c) for c in self.layout.covers],
                                      key=f"{gen}-{t}{suffix}", workers=list(self.workers))
        return _InFlight(t, (recipe, sources), tasks, compute=compute, validate=validate)

    def wait(self, handle: _InFlight) -> Outcome:
        self.watch_all(handle.tasks, handle.step)
        stats = self._stats(handle).as_dict()
        steps = [StepResult(handle.step, stats, extra=self.step_extra())] if handle.compute else []
        if not handle.validate:
            return Outcome(steps)
        return Outcome(steps, validated=handle.step, validation=stats)

    def _stats(self, handle: _InFlight) -> StepStats:
        """The step's numbers: every worker's, summed in worker order. From the workers' events;
        should one be missing, from their step tasks' results (a task each, no gradient moved)."""
        parts = self.inbox.take((self.generation, handle.step, handle.compute), self.workers, self.EVENTS_GRACE_S)
        if parts is None:
            log.warning("step %d: the workers' step events did not all arrive; asking their tasks", handle.step)
            picked = [self.client.submit(stats_of, task, workers=[addr], allow_other_workers=False, pure=False)
                      for addr, task in zip(self.workers, handle.tasks)]
            parts = [p or StepStats() for p in self.gather_within(picked, self.workers, f"step {handle.step}'s numbers")]
        total = StepStats()
        for part in parts:
            total = total + part
        return total

    def cancel(self, pending: Sequence[_InFlight]) -> None:
        futures = [f for e in pending for f in (*e.root[1], *e.tasks)]
        if futures:
            self.client.cancel(futures)

    def close(self) -> None:
        self.inbox.close()
        super().close()
