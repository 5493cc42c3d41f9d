"""The prepare stage: ingest the store when only its source exists, check the store against the
config (on the driver, metadata only: :func:`dasktrain.preflight.preflight`), and compute the
normalisation statistics on the cluster."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from distributed import Client

from dasktrain import ingest
from dasktrain.config import DataConfig, RunConfig
from dasktrain.errors import ConfigError, DataError
from dasktrain.normalize import compute_normalization
from dasktrain.preflight import Preflight, preflight
from dasktrain.storage import ObjectPath, is_url, locate


def store_pending(data: DataConfig, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``data.store`` is still to be ingested from ``data.source`` (so it cannot be checked yet)."""
    where = locate(data.store, storage_options, "data.store")
    # An object store has no directories: a store exists there when its group's metadata does.
    return bool(data.source) and not (where / "zarr.json" if isinstance(where, ObjectPath) else where).exists()


def ensure_store(data: DataConfig, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Write ``data.store`` from ``data.source`` when the store does not exist yet; True if it did."""
    if not store_pending(data, storage_options):
        return False
    source = data.source
    assert source is not None  # store_pending said so
    if source.startswith("example:"):
        arrays = ingest.example_arrays(source.removeprefix("example:"))
    elif source.endswith(".npz"):
        arrays = ingest.read_npz(source, data.inputs, data.targets)
    elif source.endswith(".csv"):
        arrays = ingest.read_csv(source)
    else:
        raise ConfigError(f"data.source {source!r}: give example:NAME, an .npz or a .csv file")
    arrays = {data.inputs: arrays["inputs"], data.targets: arrays["targets"]}
    ingest.write_store(data.store, arrays, chunk_size=data.source_chunk_size, source=source,
                       storage_options=storage_options)
    return True


def prepare_data(config: RunConfig, connect: Callable[[], Client],
                 checked: Preflight | None = None) -> tuple[Preflight, dict[str, Any]]:
    """Ingest if needed; check (unless ``checked`` holds the checks already made for this config);
    then, the checks passed, get the cluster from ``connect`` and compute the normalisation
    statistics on it (``data.normalize``). Returns the checks, for the run, and facts for the run
    summary."""
    ingested = ensure_store(config.data, config.storage_options)
    if ingested or checked is None or not checked.fits(config):
        checked = preflight(config)
    splits = checked.splits
    client = connect()
    facts: dict[str, Any] = {
        "store": splits.train.path, "samples": splits.train.samples, "chunks": len(splits.train.chunks()),
        "train_chunks": len(splits.train_chunks), "ingested": ingested, "normalized": False,
        "workers": len(client.nthreads()),
    }
    if config.data.normalize:
        if not is_url(config.data.store) and not Path(config.data.store).is_dir():
            raise DataError(f"data.normalize: store {config.data.store} is not a directory store")
        compute_normalization(client, config.data.store, config.data.inputs, splits.train_chunks,
                              config.storage_options)
        facts["normalized"] = True
    return checked, facts
