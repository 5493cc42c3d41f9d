"""The Zarr dataset: validating a store against a config, its chunk layout, and chunk reads.

A dataset is a Zarr v3 group of sample-major arrays (axis 0 = sample) chunked alike along
axis 0. Everything the sampling plan needs is the chunk layout (sample ranges of chunks); the
data itself is only ever read on workers, one chunk range at a time.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr
from zarr.core.sync import sync

from dasktrain.errors import DataError
from dasktrain.rows import Rows
from dasktrain.storage import ObjectPath, locate, open_zarr_group

ATTRS_KEY = "dasktrain"


@dataclass(frozen=True)
class Chunk:
    """One chunk along the sample axis: its index in the store and its sample range."""

    index: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ArraySpec:
    """What the store says about one array: per-sample shape and dtype."""

    name: str
    sample_shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class DatasetInfo:
    """A validated store: where it is, its arrays, sample count and chunking."""

    path: str
    inputs: ArraySpec
    """The inputs array; with ``fields``, the first of them (its shape stands for the inputs')."""
    targets: ArraySpec | None
    """The targets array; None where the loss needs none (``loss: model``)."""
    samples: int
    chunk_size: int
    fields: tuple[ArraySpec, ...] = ()
    """The arrays of ``data.fields`` (each once, in order); empty: the model takes ``inputs``."""
    storage_options: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)
    """The config's ``storage_options`` when ``path`` is a URL: workers open the store themselves."""

    def chunks(self) -> tuple[Chunk, ...]:
        """All chunks of the store in index order."""
        starts = range(0, self.samples, self.chunk_size)
        return tuple(Chunk(i, s, min(s + self.chunk_size, self.samples)) for i, s in enumerate(starts))


def open_group(path: str, what: str = "dataset store", storage_options: Mapping[str, Any] | None = None) -> zarr.Group:
    """Open a store's group read-only, a local path or a URL (with ``storage_options``); errors say
    which store is missing or unreadable."""
    where = locate(path, storage_options, what)
    # An object store has no directories: a store exists when its group's metadata object does.
    found = (where / "zarr.json").exists() if isinstance(where, ObjectPath) else where.exists()
    if not found:
        raise DataError(f"{what} {path} does not exist (write one with `dasktrain ingest`)")
    try:
        group: zarr.Group = open_zarr_group(path, "r", storage_options)
        return group
    except Exception as exc:  # zarr raises several types for a non-group path
        raise DataError(f"{path} is not a readable Zarr group: {exc}") from None


VOLATILE_ATTRS = ("normalization",)
"""Keys of the group's ``dasktrain`` attributes left out of :func:`store_layout`'s fingerprint: the
flow's prepare stage rewrites the normalisation statistics on every run, resumes included."""


def store_layout(path: str | Path, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a run's trajectory depends on in a store besides its bytes, as JSON.

    ``arrays`` gives every array's shape, dtype and chunk shape; ``fingerprint`` is a hash of the
    group's and arrays' ``zarr.json`` metadata documents (as Zarr parses them, keys sorted, so
    formatting does not count): it changes with a re-ingest from another source, other codecs or
    attributes, even at equal shapes. It reads metadata only, never chunk data, so it costs the
    same for any store size; data rewritten in place with identical metadata goes unnoticed.
    Checkpoints record it so that ``--resume`` can refuse a store that changed under the run.
    """
    group = open_group(str(path), storage_options=storage_options)
    group_doc = group.metadata.to_dict()
    attrs = group_doc.get("attributes", {}).get(ATTRS_KEY)
    if isinstance(attrs, dict):
        group_doc["attributes"] = {**group_doc["attributes"],
                                   ATTRS_KEY: {k: v for k, v in attrs.items() if k not in VOLATILE_ATTRS}}
    docs: dict[str, Any] = {"": group_doc}
    arrays: dict[str, dict[str, Any]] = {}
    for name, node in sorted(group.members(max_depth=None), key=lambda m: m[0]):
        docs[name] = node.metadata.to_dict()
        if isinstance(node, zarr.Array):
            arrays[name] = {"shape": list(node.shape), "dtype": str(node.dtype), "chunks": list(node.chunks)}
    digest = hashlib.sha256(json.dumps(docs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"path": str(path), "arrays": arrays, "fingerprint": digest}


def replace_store(tmp: Path, final: Path) -> None:
    """Move a store written under a temporary name into place, replacing any old one whole."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, final)


def open_dataset(path: str | Path, inputs: str, targets: str | None, fields: tuple[str, ...] = (),
                 storage_options: Mapping[str, Any] | None = None) -> DatasetInfo:
    """Open a store and check that it can feed training; errors name the store and the array.

    ``fields``: arrays the model is called with instead of ``inputs``; ``targets`` None: the loss
    reads none. Every array named must exist, be numeric and have the same length and chunking."""
    path = str(path)
    group = open_group(path, storage_options=storage_options)
    x_names = tuple(dict.fromkeys(fields)) or (inputs,)
    names = x_names + ((targets,) if targets is not None and targets not in x_names else ())
    specs: dict[str, ArraySpec] = {}
    lengths: dict[str, int] = {}
    chunkings: dict[str, int] = {}
    for name in names:
        if name not in group:
            present = sorted(group.array_keys())
            raise DataError(f"store {path} has no array '{name}' (arrays present: {present})")
        arr = group[name]
        if not isinstance(arr, zarr.Array):
            raise DataError(f"'{name}' in store {path} is a group, not an array")
        if arr.ndim < 1:
            raise DataError(f"array '{name}' in store {path} is a scalar; needs a sample axis 0")
        if not (np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)):
            raise DataError(
                f"array '{name}' in store {path} has dtype {arr.dtype}, needs a numeric dtype"
            )
        specs[name] = ArraySpec(name, tuple(arr.shape[1:]), np.dtype(arr.dtype))
        lengths[name] = arr.shape[0]
        chunkings[name] = arr.chunks[0]
    first = names[0]
    for name in names[1:]:
        if lengths[name] != lengths[first]:
            raise DataError(
                f"arrays in store {path} differ in length: '{first}' has {lengths[first]} samples, "
                f"'{name}' has {lengths[name]}"
            )
        if chunkings[name] != chunkings[first]:
            raise DataError(
                f"arrays in store {path} are chunked differently along axis 0: '{first}' by "
                f"{chunkings[first]}, '{name}' by {chunkings[name]}; re-ingest with one --chunk-size"
            )
    if lengths[first] == 0:
        raise DataError(f"store {path} holds no samples")
    return DatasetInfo(path, specs[x_names[0]], specs[targets] if targets is not None else None, lengths[first],
                       chunkings[first], tuple(specs[n] for n in x_names) if fields else (), storage_options)


class ChunkReader:
    """Reads chunk-aligned sample ranges of the input and target arrays of one store.

    Opened once per worker and reused; every read names the array and chunk on failure, so a
    corrupt or missing chunk file stops the run with its location.
    """

    def __init__(self, info: DatasetInfo) -> None:
        self.info = info
        group = open_zarr_group(info.path, "r", info.storage_options)  # a URL: read from here, not via the driver
        # open_dataset checked that every one is an array
        self._inputs = cast(zarr.Array, group[info.inputs.name])
        self._fields = {spec.name: cast(zarr.Array, group[spec.name]) for spec in info.fields}
        self._targets = cast(zarr.Array, group[info.targets.name]) if info.targets is not None else None

    def read(self, chunk: Chunk) -> tuple[Rows, Rows]:
        """Inputs (a dict of the fields' arrays, with ``data.fields``) and targets (None where the
        loss reads none) of ``chunk``."""
        x: Rows = ({name: self._read(arr, chunk) for name, arr in self._fields.items()} if self._fields
                   else self.read_inputs(chunk))
        return x, self.read_targets(chunk) if self._targets is not None else None

    def read_inputs(self, chunk: Chunk) -> np.ndarray:
        """The inputs array of ``chunk`` alone (a pipeline's first stage needs no targets)."""
        return self._read(self._inputs, chunk)

    def read_targets(self, chunk: Chunk) -> np.ndarray:
        """The targets of ``chunk`` alone (a pipeline's last stage needs no inputs)."""
        assert self._targets is not None, "this store was opened without targets"
        return self._read(self._targets, chunk)

    def _read(self, arr: zarr.Array, chunk: Chunk) -> np.ndarray:
        # Zarr reads a missing chunk as fill values; training on those would be silent damage.
        grid = [range(math.ceil(n / c)) for n, c in zip(arr.shape[1:], arr.chunks[1:])]
        for rest in itertools.product(*grid):
            key = f"{arr.store_path.path}/{arr.metadata.encode_chunk_key((chunk.index, *rest))}"
            if not sync(arr.store_path.store.exists(key)):
                raise DataError(
                    f"chunk {chunk.index} (samples {chunk.start}-{chunk.stop}) of array '{arr.basename}' "
                    f"in store {self.info.path} is missing (no object {key!r})"
                )
        try:
            data = np.asarray(arr[chunk.start : chunk.stop])
        except Exception as exc:
            raise DataError(
                f"cannot read chunk {chunk.index} (samples {chunk.start}-{chunk.stop}) of array "
                f"'{arr.basename}' in store {self.info.path}: {type(exc).__name__}: {exc}"
            ) from None
        if data.shape[0] != chunk.size:
            raise DataError(
                f"chunk {chunk.index} of array '{arr.basename}' in store {self.info.path} holds "
                f"{data.shape[0]} samples, expected {chunk.size}"
            )
        return data
