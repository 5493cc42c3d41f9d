"""Messages between the driver, the scheduler and the workers sent when they are ready.

Dask batches the small messages of its long-lived streams (task assignments, task-finished
reports, results for the client): a stream sends at most once per interval, fixed in the code
(scheduler to worker 5 ms, worker to scheduler 2 ms, client to scheduler 10 ms, scheduler to
client 2 ms). That is a good trade for a graph of thousands of small tasks, where batching saves
messages. A training run is the opposite: a few tasks per step, each waiting on the last, so a
step paid up to one interval per hop on its critical path; on a small model that was most of
the step (at 2 workers, tree mode: 15.7 ms per step, 11.7 ms without the wait).

:func:`send_without_delay` sets the interval of those streams to zero for the client it is
given, the scheduler (every stream it has, and those of workers that join later) and every
worker, now and later (a plugin each, named after :data:`PLUGIN_NAME`). A scheduler that
cannot load the plugin (one started elsewhere, without dasktrain installed) keeps its own
intervals: the run is slower, not wrong, and a warning says so.
"""

from __future__ import annotations

import logging
from typing import Any

from distributed import Client, SchedulerPlugin, WorkerPlugin

log = logging.getLogger(__name__)

PLUGIN_NAME = "dasktrain-send-without-delay"
INTERVAL_S = 0.0
"""Seconds a stream waits after one send before the next: none."""


class _WorkerStreams(WorkerPlugin):
    """On every worker (and every one that joins): its stream to the scheduler sends at once."""

    idempotent = True  # registered again by every run: nothing more to do

    def setup(self, worker: Any) -> None:
        worker.batched_stream.interval = INTERVAL_S


class _SchedulerStreams(SchedulerPlugin):
    """On the scheduler: its streams to the workers and to the connected clients send at once.

    Registered once per client (its name holds the client's id): the stream to a client exists
    only once the client has connected, so each new client's run sets its own."""

    idempotent = True

    async def start(self, scheduler: Any) -> None:
        for stream in [*scheduler.stream_comms.values(), *scheduler.client_comms.values()]:
            stream.interval = INTERVAL_S

    def add_worker(self, scheduler: Any, worker: str) -> None:
        stream = scheduler.stream_comms.get(worker)
        if stream is not None:
            stream.interval = INTERVAL_S


def send_without_delay(client: Client) -> None:
    """Make the streams of ``client``'s cluster send each message as soon as it is made.

    Only a speed-up: where a part cannot be set (a scheduler that cannot load the plugin, or one
    gone already, whose loss the run's next call reports), a warning says so and the run goes on."""
    comm = client.scheduler_comm
    if comm is None or client.status != "running":  # the scheduler is gone: no wait on it here
        log.warning("the client is not connected to its scheduler (%s); Dask's batching delays stay", client.status)
        return
    comm.interval = INTERVAL_S
    for plugin, name, where in ((_WorkerStreams(), PLUGIN_NAME, "workers"),
                                (_SchedulerStreams(), f"{PLUGIN_NAME}-{client.id}", "scheduler")):
        try:
            client.register_plugin(plugin, name=name)
        except Exception as exc:
            log.warning("the %s kept Dask's batching delays (%s); each step may wait a few milliseconds longer",
                        where, exc)
