"""``reduce: tree``: one Dask task per worker per step, gradients summed by a tree of tasks.

Each step, every worker's step task applies the previous step's reduced gradient (it sums the
root's children itself, so no root task sits on the critical path), computes its shards'
gradient and returns one flat buffer; the tree tasks (:mod:`dasktrain.reduce`) sum the buffers,
and a small stats task picks the numbers out where each source lives, so no gradient moves for
the driver's sake. The run loop keeps ``train.ahead`` steps in flight behind the one it waits on.

Every LINEAGE_STEPS steps the chain of step tasks is cut: Dask keeps the whole chain of finished
tasks to be able to recompute it, so the pending update is applied on its own (an apply-only
step), waited for, and the next step starts with no dependency. It costs one pipeline bubble.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from distributed import Future

from dasktrain.engines.base import Outcome, RunContext, StepResult
from dasktrain.engines.replicas import ReplicaEngine
from dasktrain.reduce import RootRecipe, stats_of, submit_tree, summarize
from dasktrain.replica import StepActions, run_step

Root = tuple[RootRecipe, list[Future]]
"""A step's reduced gradient as the next step's tasks take it: the recipe and its sources."""


@dataclass
class _InFlight:
    step: int
    root: Root
    stats: Future
    tasks: list[Future]
    """The step task of each worker first (in worker order), then the stats-picking tasks."""
    compute: bool
    validate: bool
    cut: bool = False
    """An apply-only step that cuts the task chain: nothing is submitted behind it."""


class TreeEngine(ReplicaEngine):
    """Data parallelism with gradients summed by Dask tasks."""

    LINEAGE_STEPS = 64

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.reset()

    def reset(self) -> None:
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
        tag = f"{gen}-{t}{suffix}"
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
        return _InFlight(t, (recipe, sources), stats, [*tasks, *extra], compute=compute, validate=validate)

    def wait(self, handle: _InFlight) -> Outcome:
        stats: dict[str, Any] = self.watch(handle.stats, handle.step, 1, handle.tasks)
        steps = [StepResult(handle.step, stats, extra=self.step_extra())] if handle.compute else []
        if not handle.validate:
            return Outcome(steps)
        return Outcome(steps, validated=handle.step, validation=stats)

    def cancel(self, pending: Sequence[_InFlight]) -> None:
        futures = [f for e in pending for f in (*e.root[1], e.stats, *e.tasks)]
        if futures:
            self.client.cancel(futures)
