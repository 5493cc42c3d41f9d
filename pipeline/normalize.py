"""Per-feature normalisation statistics: computed on the cluster, kept in the store's attributes.

``data.normalize: true`` standardises every input feature (each element of a sample) with the
mean and standard deviation of the training chunks. The statistics are a ``dask.array``
reduction over the store's chunks, computed by the workers (each reads its chunks; only the
per-chunk partial sums reach the driver), and are written into the store's ``dasktrain``
attributes, where every replica and the inference tasks read them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
from distributed import Client

from dasktrain.errors import DataError
from dasktrain.storage import is_url, open_zarr_group, options_for
from dasktrain.store import ATTRS_KEY, Chunk

NORMALIZATION_KEY = "normalization"


@dataclass(frozen=True)
class Normalization:
    """Mean and standard deviation per input feature (arrays of the sample shape)."""

    array: str
    mean: np.ndarray
    std: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std`` as float32; features with zero spread are only centred."""
        scale = np.where(self.std > 0, self.std, 1.0)
        return ((x - self.mean) / scale).astype(np.float32)

    def as_attrs(self, samples: int, chunks: int) -> dict[str, Any]:
        return {"array": self.array, "mean": self.mean.tolist(), "std": self.std.tolist(),
                "samples": samples, "chunks": chunks}


def compute_normalization(client: Client, store: str, inputs: str, chunks: Sequence[Chunk],
                          storage_options: Mapping[str, Any] | None = None) -> Normalization:
    """Mean and std of array ``inputs`` over ``chunks`` of ``store`` (a path or a URL, with the
    config's ``storage_options``), computed on ``client``'s workers and written into the store's
    attributes."""
    remote = {"storage_options": options_for(store, storage_options)} if is_url(store) else {}
    x = da.from_zarr(store, component=inputs, **remote)
    if len(chunks) != x.numblocks[0]:  # a held-out split: only the training chunks count
        x = da.concatenate([x[c.start : c.stop] for c in chunks], axis=0)
    # float64 accumulators: float32 sums of many samples lose the digits that std needs.
    mean, std = client.compute([x.mean(axis=0, dtype=np.float64), x.std(axis=0, dtype=np.float64)], sync=True)
    stats = Normalization(inputs, np.asarray(mean), np.asarray(std))
    group = open_zarr_group(store, "r+", storage_options)
    found = group.attrs.get(ATTRS_KEY)
    attrs: dict[str, Any] = dict(found) if isinstance(found, dict) else {}
    attrs[NORMALIZATION_KEY] = stats.as_attrs(samples=int(x.shape[0]), chunks=len(chunks))
    group.attrs[ATTRS_KEY] = attrs
    return stats


def read_normalization(store: str, inputs: str, storage_options: Mapping[str, Any] | None = None) -> Normalization:
    """The statistics that :func:`compute_normalization` wrote into ``store``; errors name the store."""
    try:
        attrs = open_zarr_group(store, "r", storage_options).attrs.get(ATTRS_KEY, {})
    except Exception as exc:  # zarr raises several types for a non-group path
        raise DataError(f"{store} is not a readable Zarr group: {exc}") from None
    found = attrs.get(NORMALIZATION_KEY) if isinstance(attrs, dict) else None
    if not found or found.get("array") != inputs:
        raise DataError(
            f"data.normalize is on but store {store} holds no normalisation statistics of array '{inputs}'; "
            "run the flow (`dasktrain run`), whose prepare stage computes them"
        )
    return Normalization(inputs, np.asarray(found["mean"], dtype=np.float64), np.asarray(found["std"], dtype=np.float64))
