"""A run's records: one per applied step and one per epoch, in ``metrics.jsonl`` and as events.

The run loop hands every engine :class:`~dasktrain.engines.base.Outcome` here. Each step is
recorded once, in step order (a step recomputed after a regroup or a recovery is not recorded
again: with the same plan it has the same numbers); an epoch's record is written once its last
step is recorded, with the validation of the weights at its end when the engine ran one. A new
metric is a field of the step stats (worker side) and a line here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from dasktrain.config import RunConfig
from dasktrain.engines.base import Outcome, StepResult
from dasktrain.metrics import MetricsLog
from dasktrain.objective import lr_at

log = logging.getLogger(__name__)

Event = dict[str, Any]


class Recorder:
    """Writes step and epoch records (``metrics.jsonl``) and passes them to ``emit``."""

    def __init__(self, config: RunConfig, metrics: MetricsLog, steps_per_epoch: int, start: int,
                 emit: Callable[[Event], None]) -> None:
        self.config = config
        self.metrics = metrics
        self.steps_per_epoch = steps_per_epoch
        self.start = start
        self.emit = emit
        self.recorded = start
        """Steps below this have their records written."""
        self.epochs: list[dict[str, Any]] = []
        self._closed: set[int] = set()
        self._last_time = time.perf_counter()
        self._epoch = _EpochSums()

    def write(self, event: Event) -> None:
        """An event of the run itself (start, regroup, end)."""
        if event["kind"] != "start" and event["kind"] != "end":
            self.metrics.write(event)
        self.emit(event)

    def take(self, outcome: Outcome) -> None:
        """Record an engine's outcome: its steps in order, and the epoch its boundary closes."""
        for result in outcome.steps:
            if outcome.validated == result.step:
                self.close_epoch(result.step, outcome.validation)
            self.step(result)
        if outcome.validated is not None:
            self.close_epoch(outcome.validated, outcome.validation)

    def step(self, result: StepResult) -> None:
        """Record one applied step (and, before it, the epoch it starts, if not yet closed)."""
        t = result.step
        if t < self.recorded:
            return  # recomputed after a regroup: recorded already, with the same numbers
        if t % self.steps_per_epoch == 0:
            self.close_epoch(t, None)
        self.recorded = t + 1
        now = time.perf_counter()
        since_last, self._last_time = now - self._last_time, now
        step_time = since_last if result.step_time_s is None else result.step_time_s
        stats = result.stats
        epoch, k = divmod(t, self.steps_per_epoch)
        count = stats["count"]
        record = {
            "kind": "step", "global_step": t, "epoch": epoch, "step": k, "samples": count,
            "loss": stats["loss_sum"] / count if count else float("nan"),
            "lr": lr_at(self.config, t, self.steps_per_epoch),
            "step_time_s": step_time, "samples_per_s": count / step_time if step_time > 0 else 0.0,
            "data_wait_s": stats["data_wait_s"], "compute_s": stats["compute_s"], "chunks_read": stats["chunks_read"],
            **result.extra,
        }
        if stats["nonfinite"]:  # train.on_nan: skip_step (with "stop" the step raised instead)
            record["skipped"] = True
            log.warning("step %d had a non-finite loss in %d unit(s): update skipped", t, stats["nonfinite"])
        self._epoch.add(stats, result.extra)
        self.metrics.write(record)
        every = self.config.checkpoint.every_steps
        if every and (t + 1) % every == 0:
            # The update of step t makes checkpoint t + 1: its records are made durable now (on
            # object storage they are uploaded now and then), so a resume from it finds them.
            self.metrics.flush()
        self.emit(record)

    def close_epoch(self, boundary: int, validation: dict[str, Any] | None) -> None:
        """Write the record of the epoch that ends at ``boundary``, once, when all its steps are recorded."""
        spe = self.steps_per_epoch
        if boundary % spe or boundary <= self.start or boundary in self._closed or boundary != self.recorded:
            return
        self._closed.add(boundary)
        record = self._epoch.close(boundary // spe - 1, boundary, validation, self.config.loss)
        self.epochs.append(record)
        self.metrics.write(record)
        self.metrics.flush()
        self.emit(record)


class _EpochSums:
    """A training epoch's sums, from its step stats."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum = 0.0
        self.count = 0
        self.correct = 0
        self.efficiency: list[float] = []
        self.started = time.perf_counter()

    def add(self, stats: dict[str, Any], extra: dict[str, Any]) -> None:
        self.loss_sum += stats["loss_sum"]
        self.count += stats["count"]
        self.correct += stats["correct"]
        if "pipeline_efficiency" in extra:
            self.efficiency.append(extra["pipeline_efficiency"])

    def close(self, epoch: int, end_step: int, validation: dict[str, Any] | None, loss: str) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started
        record: dict[str, Any] = {
            "kind": "epoch", "epoch": epoch, "end_step": end_step, "samples": self.count,
            "train_loss": self.loss_sum / self.count if self.count else None, "time_s": elapsed,
            "samples_per_s": self.count / elapsed if elapsed > 0 else 0.0,
        }
        if self.efficiency:
            record["pipeline_efficiency"] = sum(self.efficiency) / len(self.efficiency)
        if loss == "cross_entropy" and self.count:
            record["train_accuracy"] = self.correct / self.count
        if validation and validation.get("val_count"):
            record["val_loss"] = validation["val_loss_sum"] / validation["val_count"]
            record["val_samples"] = validation["val_count"]
            if loss == "cross_entropy":
                record["val_accuracy"] = validation["val_correct"] / validation["val_count"]
            for name, (total, count) in validation.get("val_metrics", {}).items():
                record[f"val_{name}"] = total / count if count else None
        self.reset()
        return record
