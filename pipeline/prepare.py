"""The prepare stage: ingest the store when only its source exists, check the store against the
config (on the driver, metadata only), and compute the normalisation statistics on the cluster."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from distributed import Client

from dasktrain import ingest
from dasktrain.config import DataConfig, RunConfig
from dasktrain.errors import ConfigError, DataError
from dasktrain.normalize import compute_normalization
from dasktrain.preflight import DataSplits, build_plan, check_model_fits, check_workers_fit, resolve_splits


def ensure_store(data: DataConfig) -> bool:
    """Write ``data.store`` from ``data.source`` when the store does not exist yet; True if it did."""
    if Path(data.store).exists() or not data.source:
        return False
    source = data.source
    if source.startswith("example:"):
        arrays = ingest.example_arrays(source.removeprefix("example:"))
    elif source.endswith(".npz"):
        arrays = ingest.read_npz(source, data.inputs, data.targets)
    elif source.endswith(".csv"):
        arrays = ingest.read_csv(source)
    else:
        raise ConfigError(f"data.source {source!r}: give example:NAME, an .npz or a .csv file")
    arrays = {data.inputs: arrays["inputs"], data.targets: arrays["targets"]}
    ingest.write_store(data.store, arrays, chunk_size=data.source_chunk_size, source=source)
    return True


def check_run(config: RunConfig) -> DataSplits:
    """Every check that needs no cluster: the stores, the plan, the model against the data."""
    if config.data.normalize and config.parallel.pipeline > 1:
        raise ConfigError("data.normalize is not supported with parallel.pipeline > 1 (pipeline stages read raw inputs)")
    splits = resolve_splits(config)
    build_plan(config, splits)
    check_model_fits(config, splits.train)
    check_workers_fit(config)  # before any cluster is started
    return splits


def preflight(config: RunConfig) -> None:
    """:func:`check_run`, unless the store is still to be ingested from ``data.source``."""
    if config.data.source and not Path(config.data.store).exists():
        return
    check_run(config)


def prepare_data(config: RunConfig, connect: Callable[[], Client]) -> dict[str, Any]:
    """Ingest if needed, check, then (the checks passed) get the cluster from ``connect`` and
    compute the normalisation statistics on it (``data.normalize``); returns facts for the run summary."""
    ingested = ensure_store(config.data)
    splits = check_run(config)
    client = connect()
    facts: dict[str, Any] = {
        "store": splits.train.path, "samples": splits.train.samples, "chunks": len(splits.train.chunks()),
        "train_chunks": len(splits.train_chunks), "ingested": ingested, "normalized": False,
        "workers": len(client.nthreads()),
    }
    if config.data.normalize:
        if not Path(config.data.store).is_dir():
            raise DataError(f"data.normalize: store {config.data.store} is not a directory store")
        compute_normalization(client, config.data.store, config.data.inputs, splits.train_chunks)
        facts["normalized"] = True
    return facts
