"""The run loop: one training run, for every kind of parallelism, read top to bottom.

1. Preflight on the driver (config rules, stores, splits, plan, model shapes), before any
   cluster starts, unless the caller made it already.
2. Lock the run directory, and choose the steps this call trains (a fresh run, or a resume
   from the newest whole checkpoint).
3. Open the cluster (or use the caller's client) and start the engine: ``tree``, ``collective``
   or ``pipeline`` (:mod:`dasktrain.engines`), which builds the training state on the workers.
4. Loop: keep work submitted ahead of the one waited on; take each outcome into the records
   (step and epoch records, skipped steps under ``train.on_nan``, validation at epoch ends);
   when the worker set changed, let the engine recover and go on from the step it says.
   Checkpoints are written on the cadence the engine is given (:class:`Cadence`), through
   :mod:`dasktrain.checkpoint` only.
5. At the end: the final weights, ``summary.json``; in ``finally``, the engine's state on the
   workers is freed and the lock released, whatever happened.

The driver never receives a gradient, parameter tensor or batch while training: engines hand
back numbers only (the final weights are fetched once, at the end).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from distributed import Client

from dasktrain.checkpoint import save_model
from dasktrain.cluster import open_cluster, send_without_delay, upload_user_code, workers_to_start
from dasktrain.config import RunConfig, cross_section_problems
from dasktrain.engines import make_engine
from dasktrain.engines.base import Cadence, Engine, RunContext, WorkersChanged
from dasktrain.errors import ConfigError, DasktrainError
from dasktrain.metrics import MetricsLog
from dasktrain.preflight import Preflight, preflight
from dasktrain.records import Event, Recorder
from dasktrain.run_dir import MODEL_FILE, SUMMARY_FILE, RunResult, data_layout, last_good, run_span
from dasktrain.run_lock import run_lock
from dasktrain.stages import plan_stages
from dasktrain.storage import locate
from dasktrain.tracking import RunObserver, observing

log = logging.getLogger(__name__)

__all__ = ["Event", "RunResult", "train"]


def train(
    config: RunConfig,
    *,
    client: Client | None = None,
    resume: bool = False,
    until_epoch: int | None = None,
    on_event: Callable[[Event], None] | None = None,
    checked: Preflight | None = None,
    observers: Sequence[RunObserver] = (),
) -> RunResult:
    """Train ``config`` on ``client``'s cluster (or on one started from ``config.cluster``).

    ``until_epoch`` stops after that many epochs, with a checkpoint, so that ``resume`` can go on
    later. ``on_event`` receives ``start``, ``step``, ``epoch``, ``regroup`` and ``end`` records
    (the CLI's progress display). ``checked``: the :func:`~dasktrain.preflight.preflight` the
    caller already made for this config (the flow's prepare stage), not made again. ``observers``
    are told the records too (:mod:`dasktrain.tracking`; the flow's progress), besides the
    trackers of ``config.tracking``. Raises
    :class:`DasktrainError` subclasses for every user-fixable problem.
    """
    problems = cross_section_problems(config)  # a config changed with model_copy skipped them
    if problems:
        raise ConfigError("; ".join(problems))
    if checked is None or not checked.fits(config):
        checked = preflight(config)
    splits, plan = checked.splits, checked.plan
    # Where the model is cut: on the driver, before the cluster starts (``balance: time`` measures).
    stages = plan_stages(config, splits.train.inputs.sample_shape) if config.parallel.pipeline > 1 else None
    run_dir = locate(config.output_dir, config.storage_options, "output_dir")  # a local path, or a URL
    with run_lock(run_dir, "train"):  # one writer per run directory, released on every exit
        start, end = run_span(config, run_dir, plan, resume, until_epoch)
        cadence = Cadence(start, end, plan.steps_per_epoch, config.checkpoint.every_steps)
        # Trackers open before the cluster starts: a missing package or a bad URI fails at once.
        with observing(config, start, on_event, observers) as emit, _client_for(config, client) as c:
            upload_user_code(c, config.model.upload)  # the user's code on every worker, also those that join later
            send_without_delay(c)  # a step waits on a few small messages: no batching delay on them
            ctx = RunContext(config, c, splits, plan, run_dir, uuid.uuid4().hex[:10], cadence, data_layout(config))
            engine = make_engine(ctx, stages)
            metrics = MetricsLog(run_dir, resume_step=start if start else None)
            try:
                recorder = Recorder(config, metrics, plan.steps_per_epoch, start, emit)
                engine.start(start)
                recorder.write({"kind": "start", "start_step": start, "end_step": end,
                                "steps_per_epoch": plan.steps_per_epoch, "workers": list(engine.workers),
                                "run_dir": str(run_dir), "dashboard": None, **engine.start_info()})
                try:
                    _train_steps(engine, recorder, start)
                except DasktrainError as exc:  # every error leaving the loop says where to go on from
                    raise type(exc)(f"{exc}; {last_good(run_dir)}") from None
                completed = end == config.train.epochs * plan.steps_per_epoch
                if completed:
                    save_model(run_dir / MODEL_FILE, engine.final_weights())
                (run_dir / SUMMARY_FILE).write_text(json.dumps(
                    {"steps": end, "completed": completed, "epochs": recorder.epochs}, indent=1))
                recorder.write({"kind": "end", "completed": completed, "steps": end, "epochs": recorder.epochs,
                                "model": str(run_dir / MODEL_FILE) if completed else None})
                return RunResult(run_dir, end, completed, recorder.epochs)
            finally:
                metrics.close()
                engine.close()


def _train_steps(engine: Engine, recorder: Recorder, start: int) -> None:
    """From step ``start`` to the end of the engine's cadence: submit ahead, record outcomes,
    recover from worker-set changes."""
    next_step = engine.first_submission(start)
    pending: deque[Any] = deque()
    try:
        while True:
            try:
                while next_step is not None and engine.ready(pending):
                    handle, next_step = engine.submit(next_step)
                    pending.append(handle)
                if not pending:
                    return
                outcome = engine.wait(pending[0])
                pending.popleft()
                recorder.take(outcome)
                engine.poll()
            except WorkersChanged as first:
                engine.cancel(pending)
                pending.clear()
                change: WorkersChanged | None = first
                while change is not None:  # a recovery can itself meet a worker that stopped answering
                    try:
                        step, event = engine.recover(change, recorder)
                        change = None
                    except WorkersChanged as again:
                        change = again
                recorder.write(event)
                next_step = engine.first_submission(step)
    finally:
        engine.cancel(pending)


@contextmanager
def _client_for(config: RunConfig, client: Client | None) -> Iterator[Client]:
    if client is not None:
        yield client
        return
    with open_cluster(config.cluster, start_with=workers_to_start(config)) as started:
        yield started
