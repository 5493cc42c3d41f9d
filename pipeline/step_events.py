"""A tree step's numbers, from each worker to the driver, as Dask events instead of tasks.

In ``reduce: tree`` the driver needs a step's small numbers (loss sum, sample count, validation
sums, ...) but never its gradient. Getting them through tasks cost, per step, a task on each
worker to pick the numbers out of its partial, a task to sum them and a fetch of the sum: more
than half of a small model's step on two workers (see the README's overhead table). Instead,
each worker's step task, once its part of the step is done, logs its own numbers as a Dask event
(``Worker.log_event``): a small message on the stream the worker reports to the scheduler on
anyway, forwarded by the scheduler to the driver, which subscribed to the run's topic
(``Client.subscribe_topic``). The driver sums the workers' numbers, in worker order.

Order: a worker sends the event before it reports its task finished, on the same stream, and
the scheduler forwards both to the client in that order; so once the driver sees every task of
a step finished, every event of the step has arrived. Should one still be missing after
:data:`GRACE_S` (a scheduler that drops events), the caller falls back to a task.

The scheduler keeps the last ``distributed.admin.low-level-log-length`` events of each topic
(1000 by default): a run leaves at most that many small messages behind it there.
"""

from __future__ import annotations

import threading
import time
from dataclasses import fields
from typing import Any

from distributed import Client, get_worker

from dasktrain.reduce import StepStats

GRACE_S = 2.0
"""Seconds the driver waits for a step's events once all its tasks have finished."""

StepId = tuple[int, int, bool]
"""(generation, step, computed): a step task of one worker set; an apply-only step (a cut, the
end) shares its step number with the computed step after it."""


def topic(run_id: str) -> str:
    return f"dasktrain-step-stats-{run_id}"


def publish(run_id: str, generation: int, t: int, computed: bool, stats: StepStats) -> None:
    """On a worker, in a step task: log this worker's numbers of step ``t``."""
    worker = get_worker()
    worker.log_event(topic(run_id), {"generation": generation, "step": t, "computed": computed,
                                     "worker": worker.address, "stats": stats.as_dict()})


class StepInbox:
    """The driver's side: the events of one run, kept by step until taken."""

    def __init__(self, client: Client, run_id: str) -> None:
        self.client = client
        self.topic = topic(run_id)
        self.arrived: dict[StepId, dict[str, dict[str, Any]]] = {}
        """Per step, each worker's numbers by worker address."""
        self.changed = threading.Condition()
        client.subscribe_topic(self.topic, self._receive)

    def _receive(self, event: tuple[float, dict[str, Any]]) -> None:
        """On the client's event loop: file one worker's numbers."""
        msg = event[1]
        with self.changed:
            self.arrived.setdefault((msg["generation"], msg["step"], msg["computed"]), {})[msg["worker"]] = msg["stats"]
            self.changed.notify_all()

    def take(self, step: StepId, workers: tuple[str, ...], grace_s: float = GRACE_S) -> list[StepStats] | None:
        """Each of ``workers``' numbers of ``step``, in their order, once all have arrived
        (``grace_s`` at most); None if some have not. Forgets the step and the ones before it."""
        until = time.monotonic() + grace_s
        with self.changed:
            while not set(workers) <= set(self.arrived.get(step, {})):
                left = until - time.monotonic()
                if left <= 0:
                    return None
                self.changed.wait(left)
            found = self.arrived[step]
            for done in [s for s in self.arrived if s[:2] < step[:2] or s == step]:
                del self.arrived[done]
        names = {f.name for f in fields(StepStats)}
        return [StepStats(**{k: v for k, v in found[w].items() if k in names}) for w in workers]

    def forget(self) -> None:
        """Drop what arrived (a regroup: the steps in flight are gone)."""
        with self.changed:
            self.arrived.clear()

    def close(self) -> None:
        try:
            self.client.unsubscribe_topic(self.topic)
        except Exception:  # the client is closing or gone: nothing left to unsubscribe from
            pass
