"""The contract between the run loop and an engine, and what they hand each other.

The run loop (:mod:`dasktrain.run_loop`) owns the run: its steps, records, checkpoint cadence and
reaction to a changed worker set. An engine owns only what differs between kinds of
parallelism: where the training state lives and how a step (or a segment of steps) is
scheduled. Its methods, in the order the loop calls them:

- :meth:`Engine.start`: build the training state on the workers, at the run's first step;
- :meth:`Engine.ready` / :meth:`Engine.submit`: put work in flight ahead of the one waited on;
- :meth:`Engine.wait`: the :class:`Outcome` of the oldest work in flight (per-step stats, the
  epoch-end validation); raises :class:`WorkersChanged` when the worker set changed;
- :meth:`Engine.recover`: after a change, rebuild the state on the workers there are now and
  say the step to go on from;
- :meth:`Engine.final_weights`, :meth:`Engine.close`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from distributed import Client, Future

from dasktrain.checkpoint import DATA_LAYOUT, write_file_atomic
from dasktrain.config import RunConfig
from dasktrain.plan import SamplingPlan
from dasktrain.preflight import DataSplits
from dasktrain.storage import AnyPath

log = logging.getLogger(__name__)


class WorkersChanged(Exception):
    """Raised by an engine while waiting: workers were lost, joined, froze or passed the step
    timeout. ``exclude`` names workers the run must not use again."""

    def __init__(self, reason: str, exclude: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.exclude = exclude


@dataclass(frozen=True)
class Cadence:
    """Where the run wants something to happen between two steps, as step boundaries: boundary
    ``b`` is the moment after ``b`` updates. Engines schedule validation and checkpoints at the
    boundaries this says, and never run a segment across one."""

    start: int
    end: int
    steps_per_epoch: int
    every_steps: int

    def epoch_end(self, b: int) -> bool:
        """Whether the weights after ``b`` updates close an epoch (or the run): validated."""
        return b > self.start and (b % self.steps_per_epoch == 0 or b == self.end)

    def checkpoint(self, b: int) -> bool:
        """Whether the weights after ``b`` updates are checkpointed."""
        return self.epoch_end(b) or (b > self.start and self.every_steps > 0 and b % self.every_steps == 0)

    def stop_after(self, start: int, length: int) -> int:
        """Where a segment from ``start`` ends: after ``length`` steps or at the next boundary
        where something happens (epoch end, checkpoint, end of the run), whichever comes first."""
        spe = self.steps_per_epoch
        stop = min(start + length, self.end, (start // spe + 1) * spe)
        if self.every_steps > 0:
            stop = min(stop, (start // self.every_steps + 1) * self.every_steps)
        return stop


@dataclass(frozen=True)
class RunContext:
    """What every engine of a run is given: the config, the cluster, the data and the run directory."""

    config: RunConfig
    client: Client
    splits: DataSplits
    plan: SamplingPlan
    run_dir: AnyPath
    """The run directory: a local path, or a URL's :class:`~dasktrain.storage.ObjectPath`."""
    run_id: str
    cadence: Cadence
    data_layout: dict[str, Any]
    """Recorded in every checkpoint's ``state.json`` (checked by ``--resume``)."""

    def checkpoint_meta(self, step: int) -> dict[str, Any]:
        """The ``state.json`` fields of the checkpoint after ``step`` updates, besides the
        optimizer's own (every engine writes the same)."""
        epoch, k = self.plan.locate(step)
        return {"step": step, "epoch": epoch, "step_in_epoch": k, "config_digest": self.config.digest(),
                "seed": self.config.train.seed, "config": self.config.model_dump(mode="json"),
                DATA_LAYOUT: self.data_layout}


@dataclass
class StepResult:
    """One applied step's numbers, as the workers measured them.

    ``stats`` holds ``loss_sum``, ``count``, ``correct``, ``nonfinite`` (units whose loss was
    not finite: the update was skipped), ``data_wait_s``, ``compute_s``, ``chunks_read``;
    ``extra`` what only this engine measures (it goes into the step record as is)."""

    step: int
    stats: dict[str, Any]
    step_time_s: float | None = None
    """Seconds the step took where it ran; None: the time since the last record, on the driver."""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """What one piece of work in flight gave: its steps in order, and the validation of the
    weights at a boundary ``validated`` (after that many updates), when it ran one."""

    steps: list[StepResult]
    validated: int | None = None
    validation: dict[str, Any] | None = None
    """``val_loss_sum``, ``val_count``, ``val_correct`` over the validation split."""


class StepSink(Protocol):
    """The part of the run's records an engine's recovery writes to: survivors may have applied
    steps whose numbers the loop had not received yet."""

    recorded: int
    """Steps below this have their records written."""

    def step(self, result: StepResult) -> None: ...


class Engine(ABC):
    """One kind of parallelism: where the state lives and how a step is scheduled."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.client = ctx.client

    @property
    @abstractmethod
    def workers(self) -> tuple[str, ...]:
        """The workers holding the run's state now."""

    def start_info(self) -> dict[str, Any]:
        """Fields this engine adds to the run's ``start`` event."""
        return {}

    @abstractmethod
    def start(self, step: int) -> None:
        """Build the training state on the workers: from the newest checkpoint when ``step`` > 0."""

    def first_submission(self, t: int) -> int | None:
        """The step the first submission starts at when the state on the workers holds ``t``
        updates (None: nothing left to submit)."""
        return t if t < self.ctx.cadence.end else None

    @abstractmethod
    def ready(self, pending: Sequence[Any]) -> bool:
        """Whether more work may go in flight behind ``pending``."""

    @abstractmethod
    def submit(self, t: int) -> tuple[Any, int | None]:
        """Put the work starting at step ``t`` in flight; returns its handle and the step the
        next submission starts at (None: nothing more to submit)."""

    @abstractmethod
    def wait(self, handle: Any) -> Outcome:
        """The outcome of ``handle``; raises :class:`WorkersChanged` when the worker set changed."""

    @abstractmethod
    def cancel(self, pending: Sequence[Any]) -> None:
        """Drop work in flight (after a change, or on the way out)."""

    @abstractmethod
    def recover(self, change: WorkersChanged, sink: StepSink) -> tuple[int, dict[str, Any]]:
        """Rebuild the state on the workers there are now; returns the step to go on from and
        the ``regroup`` event (lost and joined workers). May raise :class:`WorkersChanged` again."""

    @abstractmethod
    def poll(self) -> None:
        """Between results: raise :class:`WorkersChanged` when workers joined that the run can use."""

    @abstractmethod
    def final_weights(self) -> dict[str, Any]:
        """The trained model's ``state_dict`` (once, at the end)."""

    @abstractmethod
    def close(self) -> None:
        """Free the run's state on the workers; never blocks for long."""


def wait_done(futures: Sequence[Future], timeout: float) -> bool:
    """Whether every one of ``futures`` is done, waiting at most ``timeout`` seconds.

    Woken by the futures' done callbacks, so a wait ends the moment the last one finishes (a
    polling sleep would add its period to every replica setup and regroup)."""
    end = time.monotonic() + timeout
    changed = threading.Event()
    for future in futures:
        future.add_done_callback(lambda _: changed.set())
    while not all(f.done() for f in futures):
        left = end - time.monotonic()
        if left <= 0:
            return False
        changed.wait(left)
        changed.clear()
    return True


def silent_workers(client: Client, workers: Sequence[str], silent_s: float) -> list[str]:
    """Workers whose last heartbeat is more than ``silent_s`` older than the freshest one's
    (scheduler timestamps only, so clocks elsewhere do not matter): frozen (SIGSTOP, a hung node)."""
    try:
        info = client.scheduler_info(n_workers=-1)["workers"]
    except Exception as exc:  # the scheduler itself is in trouble; the caller's deadline still holds
        log.warning("could not read worker heartbeats: %s", exc)
        return []
    seen = {w: info[w].get("last_seen", 0.0) for w in workers if w in info}
    if not seen:
        return []
    freshest = max(seen.values())
    return [w for w, last in seen.items() if freshest - last > silent_s]


def write_manifest(directory: AnyPath, manifest: dict[str, Any]) -> None:
    """Write ``state.json`` into a checkpoint directory being filled (last: it marks it complete)."""
    write_file_atomic(directory / "state.json", json.dumps(manifest, indent=1).encode())


Emit = Callable[[dict[str, Any]], None]
