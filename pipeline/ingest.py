"""Writing datasets: NumPy, NPZ and CSV files (or a bundled example) into a Zarr store.

The store is a Zarr v3 group of sample-major arrays chunked along axis 0, compressed with zstd
with a checksum per chunk (so a corrupt chunk is detected, not trained on). Its attributes
record what it holds. The store is written under a temporary name and renamed into place, so an
interrupted ingest never leaves a half-written store where a good one was. On object storage
(a URL: no rename there) the arrays are written first and the group's ``zarr.json`` last: a store
exists, for every reader, once that object does.
"""

from __future__ import annotations

import csv
import functools
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from dasktrain.errors import DataError
from dasktrain.storage import AnyPath, ObjectPath, locate, open_zarr_group, options_for
from dasktrain.store import ATTRS_KEY, replace_store

EXAMPLES = ("digits", "text")
TEXT_CONTEXT = 64
"""Bytes per sample of the ``text`` example by default (``--context``)."""


def write_store(
    path: str | Path,
    arrays: Mapping[str, np.ndarray],
    chunk_size: int = 1024,
    overwrite: bool = False,
    source: str = "",
    storage_options: Mapping[str, Any] | None = None,
) -> AnyPath:
    """Write ``arrays`` (same length along axis 0) as a chunked Zarr v3 group at ``path`` (a local
    path, or a URL with the fsspec ``storage_options``)."""
    where = locate(path, storage_options, "ingest output")
    if chunk_size < 1:
        raise DataError(f"chunk size must be at least 1, got {chunk_size}")
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"arrays to ingest differ in length: {lengths}")
    for name, a in arrays.items():
        _check_numeric(a, f"array '{name}' from {source or 'input'}")
    if where.exists() and not overwrite:
        raise DataError(f"{where} already exists; pass --overwrite to replace it")
    attrs: dict[str, Any] = {
        "samples": next(iter(lengths.values())),
        "chunk_size": chunk_size,
        "arrays": {name: {"dtype": str(a.dtype), "sample_shape": list(a.shape[1:])} for name, a in arrays.items()},
        "source": source,
    }
    if isinstance(where, ObjectPath):
        where.remove_tree()  # --overwrite: the old store goes first, its group metadata with it
        url = str(where)
        for name, a in arrays.items():
            _write_array(functools.partial(zarr.create_array, f"{url}/{name}",
                                           storage_options=options_for(url, storage_options)), a, chunk_size)
        group = open_zarr_group(url, "a", storage_options)  # the group's zarr.json, last: the store now exists
        group.attrs[ATTRS_KEY] = attrs
        return where
    tmp = where.with_name(f".{where.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    group = zarr.open_group(str(tmp), mode="w")
    for name, a in arrays.items():
        _write_array(functools.partial(group.create_array, name), a, chunk_size)
    group.attrs[ATTRS_KEY] = attrs
    replace_store(tmp, where)
    return where


def _write_array(create: Any, a: np.ndarray, chunk_size: int) -> None:
    """Create one array with ``create(**settings)`` and write ``a`` into it, chunked along axis 0."""
    a = np.ascontiguousarray(a)
    arr = create(shape=a.shape, dtype=a.dtype, chunks=(min(chunk_size, max(len(a), 1)), *a.shape[1:]),
                 compressors=ZstdCodec(level=3, checksum=True),
                 # Write every chunk, even all-zero ones: then a missing chunk file means damage.
                 config={"write_empty_chunks": True})
    arr[...] = a


def example_arrays(name: str, image: bool = False, context: int = TEXT_CONTEXT) -> dict[str, np.ndarray]:
    """A bundled example dataset; the data ships with Python or scikit-learn, so no network is needed.

    ``digits``: scikit-learn's 8x8 handwritten digits, 1797 samples. Inputs are float32 scaled to
    [0, 1], flat (64,) or, with ``image``, (1, 8, 8); targets int64 class labels.

    ``text``: the bytes of :func:`text_corpus` (vocabulary 256) cut into non-overlapping windows
    of ``context + 1`` bytes, for next-byte prediction: ``inputs`` holds a window's first
    ``context`` bytes and ``targets`` the same bytes shifted by one, both int64 of shape
    (``context``,) per sample (train with ``data.inputs_dtype: int64``). The bytes left over
    after the last whole window are dropped.
    """
    if name == "text":
        if context < 1:
            raise DataError(f"the text example needs a context of at least 1 byte, got {context}")
        corpus = np.frombuffer(text_corpus(), dtype=np.uint8).astype(np.int64)
        windows = len(corpus) // (context + 1)
        if windows == 0:
            raise DataError(f"the text corpus ({len(corpus)} bytes) is shorter than one window of {context + 1} bytes")
        rows = corpus[: windows * (context + 1)].reshape(windows, context + 1)
        return {"inputs": np.ascontiguousarray(rows[:, :-1]), "targets": np.ascontiguousarray(rows[:, 1:])}
    if name != "digits":
        raise DataError(f"unknown example {name!r}; examples: {', '.join(EXAMPLES)}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = (digits.data / 16.0).astype(np.float32)
    if image:
        inputs = inputs.reshape(-1, 1, 8, 8)
    return {"inputs": inputs, "targets": digits.target.astype(np.int64)}


def text_corpus() -> bytes:
    """The ``text`` example's corpus: the topics of Python's own reference documentation, the
    text ``help()`` shows for keywords and statements (``pydoc_data.topics``, part of the standard
    library), in the order of their sorted names, UTF-8 encoded. About 460 KB of English prose
    with code examples (466,117 bytes on Python 3.11.7); the same bytes for a given Python version.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package it apart from the interpreter
        raise DataError("the text example reads Python's pydoc_data.topics, which this Python lacks "
                        "(on Debian and Ubuntu it is in the libpython3 stdlib package)") from None
    return "".join(topics[key] for key in sorted(topics)).encode("utf-8")


def read_npy(inputs: str | Path, targets: str | Path) -> dict[str, np.ndarray]:
    """Inputs and targets from two ``.npy`` files."""
    return {"inputs": _load_npy(inputs), "targets": _load_npy(targets)}


def read_npz(path: str | Path, inputs_key: str = "inputs", targets_key: str = "targets") -> dict[str, np.ndarray]:
    """Inputs and targets from two arrays of one ``.npz`` file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in (inputs_key, targets_key) if k not in npz.files]
        if missing:
            raise DataError(f"{path} has no array {missing[0]!r} (arrays present: {npz.files})")
        return {"inputs": npz[inputs_key], "targets": npz[targets_key]}


def read_csv(path: str | Path, target_column: str | None = None, classification: bool = True) -> dict[str, np.ndarray]:
    """A CSV file with a header row: the target column (default: the last) and the rest as inputs.

    Every cell must be a number; the first that is not is named by line and column. Targets are
    int64 class labels with ``classification``, float32 values otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    try:
        return _parse_csv(path, target_column, classification)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: byte {exc.object[exc.start]:#04x} at offset {exc.start} "
                        "cannot be decoded; save the file as UTF-8") from None


def _parse_csv(path: Path, target_column: str | None, classification: bool) -> dict[str, np.ndarray]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path} is empty") from None
        target = target_column if target_column is not None else header[-1]
        if target not in header:
            raise DataError(f"{path} has no column {target!r} (columns: {header})")
        t_idx = header.index(target)
        rows: list[list[float]] = []
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path} line {line_no}: {len(row)} fields, the header has {len(header)}")
            values = []
            for col, cell in zip(header, row):
                try:
                    values.append(float(cell))
                except ValueError:
                    raise DataError(f"{path} line {line_no}, column {col!r}: {cell!r} is not a number") from None
            rows.append(values)
    if not rows:
        raise DataError(f"{path} has a header but no data rows")
    table = np.asarray(rows, dtype=np.float64)
    inputs = np.delete(table, t_idx, axis=1).astype(np.float32)
    labels = table[:, t_idx]
    if classification:
        if not np.all(labels == np.round(labels)):
            raise DataError(f"{path} column {target!r} holds non-integer values; use --regression for real-valued targets")
        return {"inputs": inputs, "targets": labels.astype(np.int64)}
    return {"inputs": inputs, "targets": labels.astype(np.float32)[:, None]}


def store_summary(path: str | AnyPath, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a store's attributes say it holds."""
    group = open_zarr_group(path, "r", storage_options)
    summary = group.attrs.get(ATTRS_KEY, {})
    return dict(summary) if isinstance(summary, dict) else {}


def _load_npy(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{path} is not a plain numeric .npy file: {exc}") from None


def _check_numeric(a: np.ndarray, what: str) -> None:
    if not (np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.bool_)):
        raise DataError(f"{what} has dtype {a.dtype}, needs a numeric dtype")
    if a.ndim < 1:
        raise DataError(f"{what} is a scalar; needs a sample axis 0")
