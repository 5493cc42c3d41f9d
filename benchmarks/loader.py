"""How fast a worker process decodes its chunks, against zarr-python's own whole-array read.

    python -m benchmarks.loader                                  # CNN-shaped samples, zstd
    python -m benchmarks.loader --samples 40000 --chunk 512 --processes 1,2 --codecs default,zarrs

Writes one store as ``dasktrain ingest`` does (zstd level 3 with checksums, chunked along the
samples), then reads it, for each codec pipeline (``--codecs``):

- ``zarr whole array``: ``group["inputs"][:]`` and ``group["targets"][:]`` in one process, zarr's
  own concurrent read of every chunk: the ceiling of a one-process reader;
- ``dasktrain reader xP``: P processes at once (``--processes``), each reading every P-th chunk
  with the reader a worker's shard feed uses (``dasktrain.store.ChunkReader``: a check that the
  chunk exists, then the chunk's rows of every array), as P workers on one machine do. MB/s is
  per process, then the sum.

``default`` is zarr's own codec pipeline; ``zarrs`` the Rust one of the ``zarrs`` package
(``pip install zarrs``), set with ``zarr.config`` ``codec_pipeline.path``, when it is installed.
MB are decoded bytes (what the model gets), 10**6 bytes. Nothing is asserted: these machines are
shared, only figures measured side by side mean anything.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from benchmarks.compare import machine
from dasktrain.ingest import write_store
from dasktrain.store import ChunkReader, open_dataset

PIPELINES = {"default": "zarr.core.codec_pipeline.BatchedCodecPipeline", "zarrs": "zarrs.ZarrsCodecPipeline"}
"""``--codecs`` names: the ``codec_pipeline.path`` each sets."""


def _use(codecs: str) -> None:
    zarr.config.set({"codec_pipeline.path": PIPELINES[codecs]})


def whole_array_mb_s(store: str, codecs: str) -> float:
    """Decoded MB/s of zarr reading both arrays whole, in this process."""
    _use(codecs)
    group = zarr.open_group(store, mode="r")
    began = time.perf_counter()
    nbytes = sum(np.asarray(group[name][:]).nbytes for name in ("inputs", "targets"))
    return nbytes / 1e6 / (time.perf_counter() - began)


def _read_share(store: str, codecs: str, rank: int, size: int) -> float:
    """In a child process: read every ``size``-th chunk from ``rank`` with the shard feed's reader."""
    _use(codecs)
    info = open_dataset(store, "inputs", "targets")
    reader = ChunkReader(info)
    chunks = info.chunks()[rank::size]
    began = time.perf_counter()
    nbytes = 0
    for chunk in chunks:
        x, y = reader.read(chunk)
        assert isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
        nbytes += x.nbytes + y.nbytes
    return nbytes / 1e6 / (time.perf_counter() - began)


def reader_mb_s(store: str, codecs: str, processes: int) -> list[float]:
    """Decoded MB/s of each of ``processes`` processes reading their share of the chunks at once."""
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return pool.starmap(_read_share, [(store, codecs, rank, processes) for rank in range(processes)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loader", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--shape", default="3,32,32", help="one sample's shape (float32)")
    parser.add_argument("--chunk", type=int, default=256, help="samples per chunk")
    parser.add_argument("--processes", default="1,2", help="reader process counts, comma-separated")
    parser.add_argument("--codecs", default="default,zarrs", help="codec pipelines: default, zarrs")
    args = parser.parse_args(argv)
    shape = tuple(int(n) for n in args.shape.split(","))
    counts = [int(n) for n in args.processes.split(",") if n]
    rows: list[tuple[str, str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        arrays = {"inputs": rng.normal(size=(args.samples, *shape)).astype(np.float32),
                  "targets": rng.integers(0, 10, args.samples).astype(np.int64)}
        store = str(write_store(Path(tmp) / "loader.zarr", arrays, chunk_size=args.chunk))
        stored = sum(p.stat().st_size for p in Path(store).rglob("*") if p.is_file())
        decoded = sum(a.nbytes for a in arrays.values())
        del arrays
        for codecs in [c for c in args.codecs.split(",") if c]:
            if codecs not in PIPELINES:
                parser.error(f"--codecs: unknown pipeline {codecs!r}; choose from {', '.join(PIPELINES)}")
            if importlib.util.find_spec(PIPELINES[codecs].split(".")[0]) is None:
                rows.append((codecs, "-", "not installed (pip install zarrs)"))
                continue
            rows.append((codecs, "zarr whole array, 1 process", f"{whole_array_mb_s(store, codecs):8.0f}"))
            for n in counts:
                each = reader_mb_s(store, codecs, n)
                rows.append((codecs, f"dasktrain reader x{n}",
                             f"{np.median(each):8.0f} per process, {sum(each):6.0f} in all"))
    info = machine()
    print(f"machine: {info['host']}, {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
          f"load {info['load_1min']}; zarr {zarr.__version__}")
    print(f"{args.samples} samples of {shape} float32 + int64 targets, chunks of {args.chunk}, zstd level 3: "
          f"{decoded / 1e6:.0f} MB decoded, {stored / 1e6:.0f} MB stored\n")
    print(f"{'codecs':8} {'reader':30} decoded MB/s")
    for codecs, reader, figure in rows:
        print(f"{codecs:8} {reader:30} {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
