"""The train stage's live progress in Prefect: a run observer (:class:`dasktrain.tracking.RunObserver`).

While the run loop trains inside the train task, this observer, told the run's records on the
driver, writes one line per epoch through the task's run logger (so the Prefect UI shows them as
they come) and keeps a progress artifact up to date, from its start to 100 at the end of the span
the task trains. Its key is the flow run's artifact key (stable per deployment), so the progress of
every scheduled run is one history in the UI.

The step loop must not wait on the API: the artifact is updated at most every
:data:`UPDATE_EVERY_S` seconds between epochs, and at each epoch end and at the end.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from dasktrain.run_loop import Event

UPDATE_EVERY_S = 2.0
"""Least time between two updates of the progress artifact while an epoch runs."""


class PrefectProgress:
    """Epoch lines through the Prefect run logger and a progress artifact keyed ``key`` (made in the
    train task, whose logger it takes)."""

    def __init__(self, key: str, epochs: int) -> None:
        self.key = key
        self.epochs = epochs
        self.logger: logging.Logger | logging.LoggerAdapter[Any] = get_run_logger()
        self.artifact: Any = None
        self.end_step = 0
        self._last_update = 0.0

    def started(self, event: Event) -> None:
        self.end_step = event["end_step"]
        self.artifact = create_progress_artifact(
            self._percent(event["start_step"]), key=self.key,
            description=f"training steps {event['start_step']}..{event['end_step']} of {event['run_dir']}")
        self._last_update = time.monotonic()
        self.logger.info("training from step %d to %d on %d worker(s), %d steps per epoch", event["start_step"],
                         event["end_step"], len(event["workers"]), event["steps_per_epoch"])

    def step(self, record: Event) -> None:
        if time.monotonic() - self._last_update >= UPDATE_EVERY_S:
            self._update(record["global_step"] + 1)

    def epoch(self, record: Event) -> None:
        self.logger.info(epoch_line(record, self.epochs))
        self._update(record["end_step"])

    def finished(self, event: Event) -> None:
        self._update(event["steps"])

    def close(self) -> None:
        pass  # an interrupted run's artifact keeps the progress it reached

    def _percent(self, done: int) -> float:
        return round(100.0 * done / self.end_step, 1) if self.end_step else 100.0

    def _update(self, done: int) -> None:
        if self.artifact is not None:
            update_progress_artifact(self.artifact, self._percent(done))
        self._last_update = time.monotonic()


def epoch_line(record: Event, epochs: int) -> str:
    """One epoch's record in words: ``epoch 2/5: train loss 0.412, val loss 0.398, val accuracy 91.3%, ...``."""
    parts = [f"epoch {record['epoch'] + 1}/{epochs}:"]
    numbers = [f"train loss {record['train_loss']:.4g}" if record.get("train_loss") is not None else None]
    for key, value in record.items():
        if key.startswith("val_") and key != "val_samples" and isinstance(value, (int, float)):
            name = key.replace("_", " ")
            numbers.append(f"{name} {value:.1%}" if key == "val_accuracy" else f"{name} {value:.4g}")
    numbers.append(f"{record['samples_per_s']:,.0f} samples/s")
    return " ".join(parts) + " " + ", ".join(n for n in numbers if n)
