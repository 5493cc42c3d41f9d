"""Run observers: the run's records, as the run loop writes them, passed on to experiment trackers.

A :class:`RunObserver` is told what the run loop records in ``metrics.jsonl``: the run's start,
every step record, every epoch record (with its validation), the end (with the final model), and
is closed once, in the run loop's ``finally``, whether the run finished or not. It runs on the
driver, from the numbers the driver receives anyway: it never asks the workers for anything.

Two trackers are built from ``config.tracking``: MLflow (params = the resolved config, flattened;
metrics per step and per epoch; the config and the final model as artifacts) and TensorBoard
(scalars per step and per epoch). Callers add their own observers (the Prefect flow reports
progress with one). Step and epoch metrics are named ``step/<field>`` and ``epoch/<field>`` after
the record's fields (``step/loss``, ``step/lr``, ``epoch/val_loss``), both on the axis of global
steps: a step's at its ``global_step``, an epoch's at its last step (``end_step - 1``), so that a
resume from the epoch's checkpoint (at ``end_step``) replaces what follows it and keeps the epoch.

Tracking must not slow or stop training: MLflow's step metrics are sent in batches (every few
seconds, and at each epoch end), TensorBoard writes from its own thread, and an observer that
raises while the run trains is logged and dropped, and the run goes on. Opening a tracker is
different: a missing package or an unreachable tracking URI fails before the cluster starts.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from dasktrain.config import MlflowConfig, RunConfig
from dasktrain.errors import ConfigError
from dasktrain.records import Event

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'dasktrain[tracking]'"
IDENTIFIERS = frozenset({"kind", "global_step", "epoch", "step", "end_step"})
"""Record fields that say where a record belongs, not what was measured: never logged as metrics."""
MLFLOW_FLUSH_S = 5.0
"""Longest time buffered MLflow step metrics wait before they are sent (and at every epoch end)."""
MLFLOW_BATCH = 1000
"""Most metrics in one MLflow request (MLflow's own limit for ``log_batch``)."""
PARAM_VALUE_LIMIT = 6000
"""Longest param value MLflow stores; the whole config is also logged as ``config.yaml``."""
RUN_DIR_TAG = "dasktrain.run_dir"


class RunObserver(Protocol):
    """What the run loop tells while it trains; each method is called on the driver, in order."""

    def started(self, event: Event) -> None:
        """The run started: ``start_step``, ``end_step``, ``steps_per_epoch``, ``workers``, ``run_dir``."""

    def step(self, record: Event) -> None:
        """One applied step's record, as written to ``metrics.jsonl``."""

    def epoch(self, record: Event) -> None:
        """One epoch's record, as written to ``metrics.jsonl`` (``val_loss`` and metrics with a validation split)."""

    def finished(self, event: Event) -> None:
        """The run ended without an error: ``completed``, ``steps``, ``epochs``, ``model`` (its path, or None)."""

    def close(self) -> None:
        """Last call, on every exit; a run that never reached :meth:`finished` failed or was interrupted."""


@contextmanager
def observing(config: RunConfig, start: int, on_event: Callable[[Event], None] | None,
              observers: Sequence[RunObserver] = ()) -> Iterator[Callable[[Event], None]]:
    """Open the trackers ``config.tracking`` names (``start`` > 0: a resumed run), and yield the run's
    ``emit``: every event to ``on_event``, and to each observer by kind. Closes every observer on exit."""
    opened = [*open_trackers(config, start), *observers]
    fan_out = _FanOut(opened, on_event)
    try:
        yield fan_out
    finally:
        fan_out.close()


def open_trackers(config: RunConfig, start: int = 0) -> list[RunObserver]:
    """The trackers of ``config.tracking``, opened; raises :class:`ConfigError` naming the key when a
    package is missing or the tracker cannot be reached."""
    trackers: list[RunObserver] = []
    try:
        if config.tracking.mlflow is not None:
            trackers.append(MlflowTracker(config, config.tracking.mlflow, resumed=start > 0))
        if config.tracking.tensorboard is not None:
            trackers.append(TensorBoardTracker(config, Path(config.tracking.tensorboard), start))
    except BaseException:
        for tracker in trackers:
            tracker.close()
        raise
    return trackers


class _FanOut:
    """The run's ``emit``: each event to the caller's callback, then to the observers by kind. An
    observer that raises is logged once and dropped: tracking never stops a training run."""

    def __init__(self, observers: list[RunObserver], on_event: Callable[[Event], None] | None) -> None:
        self.observers = observers
        self.on_event = on_event

    def __call__(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)
        kind = event["kind"]
        method = {"start": "started", "step": "step", "epoch": "epoch", "end": "finished"}.get(kind)
        if method is None:
            return
        for observer in list(self.observers):
            try:
                getattr(observer, method)(event)
            except Exception as exc:
                log.warning("%s failed on a %s record and is dropped for the rest of the run: %s: %s",
                            type(observer).__name__, kind, type(exc).__name__, exc)
                self.observers.remove(observer)
                self._close(observer)

    def close(self) -> None:
        for observer in self.observers:
            self._close(observer)
        self.observers = []

    @staticmethod
    def _close(observer: RunObserver) -> None:
        try:
            observer.close()
        except Exception as exc:  # the run's own outcome matters more than its tracker's
            log.warning("%s could not be closed: %s: %s", type(observer).__name__, type(exc).__name__, exc)


def measured(record: Event) -> dict[str, float]:
    """A record's numeric fields that are measurements (not identifiers, not flags)."""
    return {key: float(value) for key, value in record.items()
            if key not in IDENTIFIERS and isinstance(value, (int, float)) and not isinstance(value, bool)}


def flat_params(config: RunConfig) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys (``train.batch_size``), JSON values (strings as they are)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[prefix] = text[:PARAM_VALUE_LIMIT]

    walk("", config.model_dump(mode="json"))
    return flat


def run_label(config: RunConfig) -> str:
    """The run directory as trackers name it: an absolute path, or the URL as given."""
    return config.output_dir if "://" in config.output_dir else str(Path(config.output_dir).resolve())


def _require(module: str, key: str, package: str) -> ModuleType:
    """Import ``module`` (of ``package``) for the tracker of config key ``key``, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{key} is set, but {package} cannot be imported ({exc}): {INSTALL_HINT}") from None


def _check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail at once when an MLflow server's address does not answer (MLflow's own client retries a
    refused connection for minutes). Any HTTP answer will do: a proxy may not pass ``/health`` on."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        pass  # it answered
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"tracking.mlflow.uri: {uri} cannot be reached ({reason}); start that MLflow server "
                          "or fix the URI") from None


class MlflowTracker:
    """One MLflow run per run directory: created on a fresh run, continued on a resume (found by its
    ``dasktrain.run_dir`` tag). Params and ``config.yaml`` are logged once, when the run is created."""

    def __init__(self, config: RunConfig, settings: MlflowConfig, resumed: bool) -> None:
        tracking = _require("mlflow.tracking", "tracking.mlflow", "mlflow")
        self._entities = _require("mlflow.entities", "tracking.mlflow", "mlflow")
        self.config = config
        self.pending: list[Any] = []
        self._last_flush = time.monotonic()
        self._finished = False
        try:
            _check_reachable(settings.uri)
            self.client = tracking.MlflowClient(tracking_uri=settings.uri)
            experiment = self.client.get_experiment_by_name(settings.experiment)
            experiment_id = (experiment.experiment_id if experiment is not None else
                             self.client.create_experiment(settings.experiment, settings.artifact_location))
            self.run_id = self._earlier_run(experiment_id) if resumed else None
            if self.run_id is not None:
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                self.run_id = self._new_run(experiment_id)
        except ConfigError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ConfigError(f"tracking.mlflow: cannot record in experiment {settings.experiment!r} at "
                              f"{settings.uri}: {type(exc).__name__}: {first}") from None
        log.info("MLflow run %s in experiment %r at %s", self.run_id, settings.experiment, settings.uri)

    def _earlier_run(self, experiment_id: str) -> str | None:
        label = run_label(self.config).replace("'", "\\'")
        runs = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{label}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def _new_run(self, experiment_id: str) -> str:
        e = self._entities
        run = self.client.create_run(experiment_id, run_name=Path(self.config.output_dir).name or None,
                                     tags={RUN_DIR_TAG: run_label(self.config),
                                           "dasktrain.config_digest": self.config.digest()})
        run_id: str = run.info.run_id
        params = [e.Param(key, value) for key, value in flat_params(self.config).items()]
        for first in range(0, len(params), 100):  # MLflow takes at most 100 params a request
            self.client.log_batch(run_id, params=params[first:first + 100])
        self.client.log_text(run_id, self.config.to_yaml(), "config.yaml")
        return run_id

    def started(self, event: Event) -> None:
        pass  # the MLflow run exists from the moment the tracker opened

    def step(self, record: Event) -> None:
        self._add(record, "step", record["global_step"])
        if len(self.pending) >= MLFLOW_BATCH or time.monotonic() - self._last_flush >= MLFLOW_FLUSH_S:
            self.flush()

    def epoch(self, record: Event) -> None:
        self._add(record, "epoch", record["end_step"] - 1)
        self.flush()

    def finished(self, event: Event) -> None:
        self.flush()
        model = event.get("model")
        if model and "://" not in model and Path(model).is_file():
            self.client.log_artifact(self.run_id, model)
        elif model:  # on object storage: named, not copied
            self.client.set_tag(self.run_id, "dasktrain.model", model)
        self._finished = True

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status="FINISHED" if self._finished else "FAILED")

    def _add(self, record: Event, prefix: str, step: int) -> None:
        now = int(time.time() * 1000)
        self.pending += [self._entities.Metric(f"{prefix}/{key}", value, now, step)
                         for key, value in measured(record).items()]

    def flush(self) -> None:
        """Send the buffered metrics, in requests of at most :data:`MLFLOW_BATCH`."""
        pending, self.pending = self.pending, []
        self._last_flush = time.monotonic()
        for first in range(0, len(pending), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=pending[first:first + MLFLOW_BATCH])


class TensorBoardTracker:
    """Scalars in ``DIR/<run directory name>``; a resumed run's events from its start step on replace
    the earlier ones there (TensorBoard's ``purge_step``)."""

    FLUSH_S = 10
    """Longest time an event waits in the writer's queue before it reaches the file."""

    def __init__(self, config: RunConfig, folder: Path, start: int) -> None:
        board = _require("torch.utils.tensorboard", "tracking.tensorboard", "tensorboard")
        self.log_dir = folder / (Path(config.output_dir).name or "run")
        try:
            self.writer = board.SummaryWriter(log_dir=str(self.log_dir), purge_step=start or None,
                                              flush_secs=self.FLUSH_S)
        except OSError as exc:
            raise ConfigError(f"tracking.tensorboard: cannot write to {self.log_dir}: {exc}") from None
        if not start:
            self.writer.add_text("config", "    " + config.to_yaml().replace("\n", "\n    "), 0)

    def started(self, event: Event) -> None:
        pass

    def step(self, record: Event) -> None:
        for key, value in measured(record).items():
            self.writer.add_scalar(f"step/{key}", value, record["global_step"])

    def epoch(self, record: Event) -> None:
        for key, value in measured(record).items():
            self.writer.add_scalar(f"epoch/{key}", value, record["end_step"] - 1)
        self.writer.flush()

    def finished(self, event: Event) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
