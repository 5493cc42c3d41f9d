"""A run directory: what a run leaves in it, and where a call starts and ends in it.

Layout: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (:mod:`dasktrain.metrics`),
``checkpoints/step-NNNNNNNN/`` (:mod:`dasktrain.checkpoint`), ``model.safetensors`` and
``summary.json`` once the run completes, and ``.lock`` while a process writes it
(:mod:`dasktrain.run_lock`). Choosing where a call starts reads checkpoints' ``state.json``
only, never their tensors. ``output_dir`` may be a URL on object storage
(:mod:`dasktrain.storage`): the same layout, as objects, with each checkpoint committed by a marker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dasktrain.checkpoint import DATA_LAYOUT, check_data_layout, checkpoint_state, latest_checkpoint, set_aside_damaged
from dasktrain.config import RunConfig
from dasktrain.errors import CheckpointError
from dasktrain.plan import SamplingPlan
from dasktrain.storage import AnyPath, locate
from dasktrain.store import store_layout

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"


@dataclass
class RunResult:
    """What a finished (or stopped) run leaves: where, how far, and its epoch metrics."""

    run_dir: AnyPath
    steps: int
    completed: bool
    epochs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def model_path(self) -> AnyPath:
        return self.run_dir / MODEL_FILE


def run_location(config: RunConfig) -> AnyPath:
    """Where ``config``'s run directory is: a local path, or an object-storage prefix of a URL
    ``output_dir`` (with the config's ``storage_options``)."""
    return locate(config.output_dir, config.storage_options, "output_dir")


def data_layout(config: RunConfig) -> dict[str, Any]:
    """The layout of every store the trajectory depends on, by config key; recorded in each
    checkpoint's ``state.json`` and checked by ``--resume`` (:func:`dasktrain.checkpoint.check_data_layout`)."""
    layouts = {"data.store": store_layout(config.data.store, config.storage_options)}
    validation = config.data.validation
    if validation is not None and validation.store is not None:
        layouts["data.validation.store"] = store_layout(validation.store, config.storage_options)
    return layouts


def run_span(config: RunConfig, run_dir: AnyPath, plan: SamplingPlan, resume: bool,
             until_epoch: int | None) -> tuple[int, int]:
    """The global steps ``[start, end)`` this call trains: from the run directory's state
    (:func:`prepare_run_dir`, with its lock held) to the end, or to the end of ``until_epoch``."""
    start_step = prepare_run_dir(config, run_dir, resume)
    stop_epoch = min(config.train.epochs, until_epoch or config.train.epochs)
    end_step = stop_epoch * plan.steps_per_epoch
    if start_step > end_step:
        raise CheckpointError(f"the newest checkpoint in {run_dir} is at step {start_step}, past the requested end {end_step}")
    return start_step, end_step


def prepare_run_dir(config: RunConfig, run_dir: AnyPath, resume: bool) -> int:
    """Check the run directory against ``resume``; returns the step training starts at.

    Called with the run directory's lock held. A resume goes on from the newest checkpoint that
    reads back whole (newer, damaged ones are set aside, saying so); it is refused when that
    checkpoint was written by another configuration, or when a store changed since (its length,
    chunking, arrays or metadata: the same config on other data is another trajectory)."""
    if resume:
        set_aside_damaged(run_dir)
    newest = latest_checkpoint(run_dir)
    if not resume:
        if newest is not None:
            raise CheckpointError(
                f"output_dir {run_dir} already holds a run (checkpoint {newest.name}); pass --resume "
                "to continue it, or choose another output_dir"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(config.to_yaml())
        return 0
    if newest is None:
        raise CheckpointError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    state = checkpoint_state(newest)
    if state.get("config_digest") != config.digest():
        raise CheckpointError(
            f"--resume: checkpoint {newest} was written by a different configuration (digest "
            f"{state.get('config_digest')}, this config {config.digest()}); the trajectory cannot continue"
        )
    check_data_layout(newest, state.get(DATA_LAYOUT), data_layout(config))
    return int(state["step"])


def last_good(run_dir: AnyPath) -> str:
    """Where a stopped run can go on from, for error messages."""
    newest = latest_checkpoint(run_dir)
    return f"last good checkpoint: {newest}" if newest else "no checkpoint was written"
