"""``reduce: collective``: a torch.distributed process group over the workers, many steps per task.

After the replicas are built, rank 0 opens a rendezvous and every rank joins a private process
group (:mod:`dasktrain.collective`, the worker side). Then one task per worker runs a *segment*
of steps (about SEGMENT_S seconds, never across a boundary where the run validates or
checkpoints), the next segment queued behind the one running; per-step numbers reach the run
loop once per segment. A lost worker leaves the others blocked in the group until its timeout;
the run then regroups as in tree mode, with a new group.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from distributed import Future

from dasktrain.collective import PeerFailedError, SegmentEnd, join_group, open_rendezvous, run_segment
from dasktrain.engines.base import Outcome, RunContext, StepResult
from dasktrain.engines.replicas import ReplicaEngine


@dataclass
class _Segment:
    start: int
    stop: int
    tasks: list[Future]
    """One per rank, in rank order; rank 0's result carries the summed numbers."""
    validate: bool


class CollectiveEngine(ReplicaEngine):
    """Data parallelism with gradients summed by an all-reduce inside many-step tasks."""

    SEGMENT_S = 2.0
    """Seconds of training one segment task aims at (progress arrives per segment)."""
    MAX_SEGMENT = 64

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.reset()

    def reset(self) -> None:
        self.length = 4  # steps per segment, until step times are known
        self.after: list[Future] | None = None
        self.last_done = time.perf_counter()

    def after_create(self) -> None:
        """Rendezvous through the scheduler and build the process group of this generation."""
        timeout = self.config.train.step_timeout
        run_id = self.ctx.run_id
        tag = f"{run_id}-g{self.generation}"
        rendezvous = self.client.submit(open_rendezvous, run_id, self.generation, timeout,
                                        workers=[self.workers[0]], allow_other_workers=False, key=f"{tag}-rendezvous")
        (master,) = self.gather_within([rendezvous], self.workers[:1], "opening the rendezvous")
        joined = [self.client.submit(join_group, run_id, self.generation, rank, len(self.workers), master,
                                     timeout, workers=[addr], allow_other_workers=False, key=f"{tag}-join-{rank}")
                  for rank, addr in enumerate(self.workers)]
        self.gather_within(joined, self.workers, "joining the process group")

    def ready(self, pending: Sequence[_Segment]) -> bool:
        return len(pending) < 2

    def submit(self, t: int) -> tuple[_Segment, int | None]:
        cadence = self.ctx.cadence
        stop = cadence.stop_after(t, self.length)
        validate = cadence.epoch_end(stop)
        checkpoint = cadence.checkpoint(stop)
        tasks = []
        for w, addr in enumerate(self.workers):
            end = SegmentEnd(validate=validate,
                             checkpoint=self.ctx.checkpoint_meta(stop) if checkpoint and w == 0 else None)
            tasks.append(self.client.submit(
                run_segment, self.ctx.run_id, t, stop, end, self.after[w] if self.after else None,
                workers=[addr], allow_other_workers=False,
                key=f"{self.ctx.run_id}-g{self.generation}-segment-{t}-{stop}-w{w}"))
        self.after = tasks
        return _Segment(t, stop, tasks, validate), (stop if stop < cadence.end else None)

    def wait(self, handle: _Segment) -> Outcome:
        result = self._result(handle)
        # Workers time each step; stretch those times to the interval seen here, so that the
        # gaps between segments (task hand-over, driver) count too.
        now, times = time.perf_counter(), [s["step_time_s"] for s in result["steps"]]
        stretch = max(1.0, (now - self.last_done) / max(sum(times), 1e-9))
        self.last_done = now
        self.length = max(1, min(self.MAX_SEGMENT, round(self.SEGMENT_S * len(times) / max(sum(times), 1e-6))))
        steps = [StepResult(handle.start + i, stats, step_time_s=stats["step_time_s"] * stretch,
                            extra={"reduce_s": stats["reduce_s"], **self.step_extra()})
                 for i, stats in enumerate(result["steps"])]
        if not handle.validate:
            return Outcome(steps)
        return Outcome(steps, validated=handle.stop, validation=result["val"])

    def _result(self, handle: _Segment) -> dict[str, Any]:
        """Rank 0's result; on failure, the error of the rank where it began (the others only
        saw a peer fail)."""
        try:
            # Every rank waits in the all-reduce for a slow one: ranks cannot be told apart by
            # their unfinished tasks, only by their heartbeats.
            result: dict[str, Any] = self.watch(handle.tasks[0], handle.start, handle.stop - handle.start, None)
            return result
        except PeerFailedError:
            for task in handle.tasks[1:]:
                try:
                    task.result(timeout=30)
                except PeerFailedError:
                    continue
                except Exception as cause:
                    raise cause from None
            raise

    def cancel(self, pending: Sequence[_Segment]) -> None:
        futures = [f for e in pending for f in e.tasks]
        if futures:
            self.client.cancel(futures)
