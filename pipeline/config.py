"""Run configuration: YAML validated into frozen, typed objects.

A config travels from the driver to every worker, so it is immutable (``frozen=True``) and
variants are made with ``model_copy(update=...)`` or ``--set key=value`` overrides. Unknown keys
and wrong types are errors that name the key and the file. Relative paths are taken relative to
the current working directory, as the CLI is run from the project root.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import ConfigError


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ValidationSplit(_Frozen):
    """Where validation samples come from: a fraction of the store's chunks, or a second store."""

    fraction: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Share of the training store's chunks held out for validation (chosen once, by seed)."""
    store: str | None = None
    """Path of a separate Zarr store with the same arrays, used whole for validation."""

    @model_validator(mode="after")
    def _one_source(self) -> ValidationSplit:
        if (self.fraction is None) == (self.store is None):
            raise ValueError("give exactly one of 'fraction' or 'store'")
        return self


class DataConfig(_Frozen):
    """The Zarr dataset: a group of sample-major arrays chunked along axis 0."""

    store: str
    """Path of the Zarr v3 group written by ``dasktrain ingest``."""
    inputs: str = "inputs"
    """Name of the input array in the group."""
    targets: str = "targets"
    """Name of the target array in the group."""
    validation: ValidationSplit | None = None
    """Validation split; none means no validation metrics."""
    shuffle_window: int = Field(default=2, ge=1)
    """Chunks a shard shuffles together (the shuffle buffer, in chunks)."""


class ModelConfig(_Frozen):
    """The model, built on every worker from an import path and keyword arguments."""

    factory: str = Field(pattern=r"^[\w.]+:[\w.]+$")
    """``module:callable`` returning an ``nn.Module``; built-ins: ``pipeline.models:mlp``, ``pipeline.models:cnn``."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the factory."""


class OptimizerConfig(_Frozen):
    """Optimizer and its hyper-parameters (unused ones are ignored by the chosen optimizer)."""

    name: Literal["sgd", "adam", "adamw"] = "adamw"
    """Which torch optimizer."""
    lr: float = Field(default=1e-3, gt=0.0)
    """Peak learning rate."""
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    """SGD momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    """L2 (SGD, Adam) or decoupled (AdamW) weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/AdamW moment coefficients."""
    eps: float = Field(default=1e-8, gt=0.0)
    """Adam/AdamW denominator term."""


class ScheduleConfig(_Frozen):
    """Learning-rate schedule over global steps."""

    name: Literal["constant", "warmup_cosine"] = "constant"
    """``constant``, or linear warmup then cosine decay to ``min_lr`` at the last step."""
    warmup_steps: int = Field(default=0, ge=0)
    """Steps of linear warmup (warmup_cosine)."""
    min_lr: float = Field(default=0.0, ge=0.0)
    """Learning rate reached at the last step (warmup_cosine)."""


class TrainConfig(_Frozen):
    """The training loop and the sampling plan."""

    epochs: int = Field(default=1, ge=1)
    """Passes over the training chunks."""
    batch_size: int = Field(default=64, ge=1)
    """Global batch size: samples per optimizer step over all workers."""
    shards: int = Field(default=4, ge=1)
    """Logical shards the chunks are dealt into each epoch; the plan depends on this, not on the worker count."""
    seed: int = 0
    """Seed of the plan (chunk dealing, shuffles), of the model's initial weights and of dropout."""
    deterministic: bool = False
    """Per-shard micro-batches and a reduction tree fixed over shards: bitwise-identical weights for any worker count."""
    fan_in: int | None = Field(default=None, ge=2)
    """Inputs per reduction task; none picks one from the number of leaves."""
    ahead: int = Field(default=2, ge=1)
    """Steps the driver keeps submitted beyond the one it waits on."""


class ClusterConfig(_Frozen):
    """The Dask cluster to train on."""

    kind: Literal["local"] = "local"
    """``local``: a ``distributed.LocalCluster`` of worker processes on this machine."""
    workers: int = Field(default=2, ge=1)
    """Worker processes; each holds one model replica."""
    threads_per_worker: int = Field(default=1, ge=1)
    """Threads per worker; torch uses as many for its kernels."""
    memory_limit: str = "auto"
    """Memory limit per worker (Dask syntax, e.g. ``4GiB``)."""
    dashboard: bool = True
    """Serve the Dask dashboard on a free port (needs ``bokeh``)."""


class ParallelConfig(_Frozen):
    """Model (pipeline) parallelism: the model cut into stages, each a Dask actor on its own worker."""

    pipeline: int = Field(default=1, ge=1)
    """Pipeline stages P (1: pure data parallelism)."""
    micro_batches: int = Field(default=1, ge=1)
    """Micro-batches m each global batch is split into for the pipeline schedule."""
    schedule: Literal["gpipe", "1f1b"] = "1f1b"
    """GPipe (all forwards, then all backwards) or 1F1B (at most P activations alive per stage)."""
    data: int = Field(default=1, ge=1)
    """Pipeline replicas R (DP x PP): R x P workers; each stage's gradients are tree-reduced across replicas."""
    balance: Literal["params", "time"] = "params"
    """Cut the model into stages of about equal parameter count, or equal measured forward/backward time."""
    cuts: tuple[int, ...] | None = None
    """Explicit cut points (layer indices where stages 2..P begin); overrides ``balance``."""


class CheckpointConfig(_Frozen):
    """When checkpoints are written, and how many are kept."""

    every_steps: int = Field(default=0, ge=0)
    """Also checkpoint every this many global steps (0: only at epoch ends and at the end)."""
    keep: int = Field(default=3, ge=1)
    """Newest checkpoints kept; older ones are deleted after a newer one is complete."""


class RunConfig(_Frozen):
    """Everything a training run needs; saved as ``config.yaml`` in the run directory."""

    data: DataConfig
    model: ModelConfig
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    """Per-sample loss, averaged over the global batch."""
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    cluster: ClusterConfig = ClusterConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    output_dir: str = "runs/default"
    """Run directory: model, metrics, checkpoints, resolved config."""

    def digest(self) -> str:
        """Short hash of the settings that decide the training trajectory (not of where it runs)."""
        relevant = self.model_dump(mode="json", exclude={"cluster", "output_dir", "checkpoint"})
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config, apply ``key.sub=value`` overrides, and validate it.

    Raises :class:`ConfigError` naming the file and every offending key.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, found {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item, path)
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Validate a plain mapping into a :class:`RunConfig`; errors name ``source`` and the keys."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key '{key}'")
            elif err["type"] == "missing":
                problems.append(f"missing key '{key}'")
            else:
                problems.append(f"'{key}': {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def _apply_override(raw: dict[str, Any], item: str, path: Path) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: '{part}' in {path} is not a mapping")
        node = child
    node[parts[-1]] = value
