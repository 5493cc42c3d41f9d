"""Checks made on the driver before any cluster starts, so bad input fails in seconds.

:func:`preflight` makes them all, once per run: it opens the stores, splits the training chunks
from the validation ones, builds the sampling plan and runs the model on a sample of the inputs'
shape, and hands what it found (:class:`Preflight`) to the run, which uses it rather than redo it.
They read only store metadata (never data) and run the model on the ``meta`` device, which
checks shapes without allocating or computing anything, whatever the model's size. The rules
the config alone decides are not here: :func:`dasktrain.config.cross_section_problems` checks
them when the config is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dasktrain.config import RunConfig
from dasktrain.errors import ShapeMismatchError
from dasktrain.models import build_model
from dasktrain.objective import call_model, model_loss, output_logits, probe_inputs
from dasktrain.plan import SamplingPlan, plan_for, split_validation
from dasktrain.stages import as_sequential, build_layers, plan_stages
from dasktrain.store import Chunk, DatasetInfo, open_dataset


@dataclass(frozen=True)
class DataSplits:
    """The training store and chunks, and where validation samples come from."""

    train: DatasetInfo
    train_chunks: tuple[Chunk, ...]
    val: DatasetInfo | None
    val_chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class Preflight:
    """What :func:`preflight` found: the run trains on these splits with this plan, and need not
    open the stores or check the model again."""

    splits: DataSplits
    """The training store and chunks, and the validation source."""
    plan: SamplingPlan
    """The sampling plan over ``splits.train_chunks``."""
    digest: str
    """:meth:`RunConfig.digest` of the config checked: the settings that decide the splits, the
    plan and the model (not where the run goes: the cluster, ``output_dir``)."""

    def fits(self, config: RunConfig) -> bool:
        """Whether these checks were made for ``config`` (or a variant differing only in where it runs)."""
        return self.digest == config.digest()


def preflight(config: RunConfig) -> Preflight:
    """Every check a run makes before any cluster starts, each once: open the stores named by the
    config (metadata only), split training from validation chunks, build the sampling plan, and,
    on the ``meta`` device, cut a pipeline model into its stages and run the model on the
    inputs' sample shape. Raises :class:`~dasktrain.errors.DataError` (and its
    :class:`~dasktrain.errors.ShapeMismatchError`), :class:`~dasktrain.errors.PlanError` or
    :class:`~dasktrain.errors.ConfigError`, each naming the store, array or key."""
    splits = resolve_splits(config)
    plan = build_plan(config, splits)
    if config.parallel.pipeline > 1:
        check_stages(config)
    check_model_fits(config, splits.train)
    return Preflight(splits, plan, config.digest())


def resolve_splits(config: RunConfig) -> DataSplits:
    """Open the stores a config names and split training from validation chunks."""
    data = config.data
    targets = data.targets if config.needs_targets else None
    fields = data.field_arrays if data.fields is not None else ()
    train = open_dataset(data.store, data.inputs, targets, fields, config.storage_options)
    chunks = train.chunks()
    split = data.validation
    if split is None:
        return DataSplits(train, chunks, None, ())
    if split.fraction is not None:
        train_chunks, val_chunks = split_validation(chunks, split.fraction, config.train.seed)
        return DataSplits(train, train_chunks, train, val_chunks)
    assert split.store is not None
    val = open_dataset(split.store, data.inputs, targets, fields, config.storage_options)
    pairs = [(f"array '{a.name}'", a, b) for a, b in zip(train.fields, val.fields)] or [("inputs", train.inputs, val.inputs)]
    if train.targets is not None and val.targets is not None:
        pairs.append(("targets", train.targets, val.targets))
    for name, a, b in pairs:
        if a.sample_shape != b.sample_shape:
            raise ShapeMismatchError(
                f"validation store {val.path} array '{b.name}' has samples of shape {b.sample_shape}, "
                f"the training store's {name} have {a.sample_shape}"
            )
    return DataSplits(train, chunks, val, val.chunks())


def build_plan(config: RunConfig, splits: DataSplits) -> SamplingPlan:
    return plan_for(config, splits.train_chunks)


def check_stages(config: RunConfig) -> None:
    """Raise :class:`~dasktrain.errors.ConfigError` if the model cannot be cut into
    ``parallel.pipeline`` stages (at ``parallel.cuts``, when given). The cut itself is the run's
    to make: ``balance: time`` measures the layers, which the counts checked here do not need."""
    par = config.parallel
    by_params = config.model_copy(update={"parallel": par.model_copy(update={"balance": "params"})})
    plan_stages(by_params, ())


def check_model_fits(config: RunConfig, dataset: DatasetInfo) -> None:
    """Raise :class:`ShapeMismatchError` if the model cannot take the inputs or fit the targets.

    A pipeline model (``parallel.pipeline > 1``) is run as its layers or named stages in a row,
    as the stages will run it."""
    where = f"store {dataset.path}"
    inputs, targets = dataset.inputs, dataset.targets
    fields = config.data.fields
    with torch.device("meta"):
        model: nn.Module
        if config.parallel.pipeline > 1:
            model = as_sequential(build_layers(config, device="meta")[0])
        else:
            model = build_model(config.model, config.train.seed)
        x = probe_inputs(config.data, dataset.fields, inputs.sample_shape)
        if dataset.fields:
            taken = ", ".join(f"'{spec.name}' {spec.sample_shape}" for spec in dataset.fields)
        else:
            taken = f"'{inputs.name}', whose samples have shape {inputs.sample_shape}"
        try:
            out = call_model(model, fields, x)
        except Exception as exc:
            raise ShapeMismatchError(
                f"model {config.model.factory} with {config.model.kwargs} cannot take array(s) {taken} of {where}: {exc}"
            ) from None
        if config.loss == "model":
            try:
                model_loss(out)
            except ValueError as exc:
                raise ShapeMismatchError(f"model {config.model.factory} on {where}: {exc}") from None
            return
        if ":" in config.loss:  # a loss of the user's own: its shape is checked on the first batch
            return
        try:
            out = output_logits(config.loss, out)
        except ValueError as exc:
            raise ShapeMismatchError(f"model {config.model.factory}: {exc}") from None
    assert targets is not None, "a built-in loss reads targets"
    if config.loss == "cross_entropy":
        # One class label per sample against (batch, classes) logits, or a label per position of a
        # sequence, (T,) per sample, against (batch, T, classes) logits: the classes come last.
        if not np.issubdtype(targets.dtype, np.integer):
            raise ShapeMismatchError(
                f"loss cross_entropy needs integer class labels (one per sample, or one per position of a "
                f"sequence); array '{targets.name}' of {where} holds {targets.dtype} samples of shape "
                f"{targets.sample_shape}"
            )
        if out.ndim < 2 or tuple(out.shape[1:-1]) != targets.sample_shape:
            wanted = f"(batch, {''.join(f'{n}, ' for n in targets.sample_shape)}classes)"
            raise ShapeMismatchError(
                f"loss cross_entropy with targets of shape {targets.sample_shape} per sample (array "
                f"'{targets.name}' of {where}) needs model outputs of shape {wanted}; "
                f"{config.model.factory} gives {tuple(out.shape[1:])} per sample"
            )
    elif tuple(out.shape[1:]) != targets.sample_shape:
        raise ShapeMismatchError(
            f"model {config.model.factory} gives outputs of shape {tuple(out.shape[1:])} per sample, "
            f"array '{targets.name}' of {where} holds targets of shape {targets.sample_shape}"
        )

