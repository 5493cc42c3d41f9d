"""Checks made on the driver before any cluster starts, so bad input fails in seconds.

They read only store metadata (never data) and run the model on the ``meta`` device, which
checks shapes without allocating or computing anything, whatever the model's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dasktrain.config import RunConfig
from dasktrain.errors import ClusterError, ShapeMismatchError
from dasktrain.models import build_model
from dasktrain.plan import SamplingPlan, split_validation
from dasktrain.store import Chunk, DatasetInfo, open_dataset


@dataclass(frozen=True)
class DataSplits:
    """The training store and chunks, and where validation samples come from."""

    train: DatasetInfo
    train_chunks: tuple[Chunk, ...]
    val: DatasetInfo | None
    val_chunks: tuple[Chunk, ...]


def resolve_splits(config: RunConfig) -> DataSplits:
    """Open the stores a config names and split training from validation chunks."""
    data = config.data
    train = open_dataset(data.store, data.inputs, data.targets)
    chunks = train.chunks()
    split = data.validation
    if split is None:
        return DataSplits(train, chunks, None, ())
    if split.fraction is not None:
        train_chunks, val_chunks = split_validation(chunks, split.fraction, config.train.seed)
        return DataSplits(train, train_chunks, train, val_chunks)
    assert split.store is not None
    val = open_dataset(split.store, data.inputs, data.targets)
    for name, a, b in (("inputs", train.inputs, val.inputs), ("targets", train.targets, val.targets)):
        if a.sample_shape != b.sample_shape:
            raise ShapeMismatchError(
                f"validation store {val.path} array '{b.name}' has samples of shape {b.sample_shape}, "
                f"the training store's {name} have {a.sample_shape}"
            )
    return DataSplits(train, chunks, val, val.chunks())


def build_plan(config: RunConfig, splits: DataSplits) -> SamplingPlan:
    return plan_for(config, splits.train_chunks)


def plan_for(config: RunConfig, train_chunks: tuple[Chunk, ...]) -> SamplingPlan:
    """The sampling plan a config gives over its training chunks (driver, replicas, reference)."""
    t = config.train
    return SamplingPlan(train_chunks, t.shards, t.batch_size, t.seed, config.data.shuffle_window,
                        deal_once=config.data.cache)


def check_workers_fit(config: RunConfig) -> None:
    """Raise :class:`ClusterError` if the spec asks for more data-parallel workers than shards."""
    asked = config.cluster.workers
    if config.parallel.pipeline == 1 and asked is not None and asked > config.train.shards:
        raise ClusterError(
            f"cluster.workers={asked} is more than train.shards={config.train.shards} "
            "(each worker streams at least one shard); raise train.shards or use fewer workers"
        )


def check_model_fits(config: RunConfig, dataset: DatasetInfo) -> None:
    """Raise :class:`ShapeMismatchError` if the model cannot take the inputs or fit the targets."""
    where = f"store {dataset.path}"
    inputs, targets = dataset.inputs, dataset.targets
    with torch.device("meta"):
        model = build_model(config.model, config.train.seed)
        x = torch.empty((2, *inputs.sample_shape))
        try:
            out = model(x)
        except Exception as exc:
            raise ShapeMismatchError(
                f"model {config.model.factory} with {config.model.kwargs} cannot take array "
                f"'{inputs.name}' of {where}, whose samples have shape {inputs.sample_shape}: {exc}"
            ) from None
    if config.loss == "cross_entropy":
        if targets.sample_shape != () or not np.issubdtype(targets.dtype, np.integer):
            raise ShapeMismatchError(
                f"loss cross_entropy needs integer class labels, one per sample; array "
                f"'{targets.name}' of {where} holds {targets.dtype} samples of shape {targets.sample_shape}"
            )
        if out.ndim != 2:
            raise ShapeMismatchError(
                f"loss cross_entropy needs model outputs of shape (batch, classes); "
                f"{config.model.factory} gives {tuple(out.shape[1:])} per sample"
            )
    elif tuple(out.shape[1:]) != targets.sample_shape:
        raise ShapeMismatchError(
            f"model {config.model.factory} gives outputs of shape {tuple(out.shape[1:])} per sample, "
            f"array '{targets.name}' of {where} holds targets of shape {targets.sample_shape}"
        )
