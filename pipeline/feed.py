"""A worker's data feed: its shards' samples for each step, read chunk-aligned and prefetched.

Each owned shard streams its windows (groups of chunks shuffled together) in plan order. A
window is assembled once, on a background thread; while a step consumes its windows the next
step's are already being assembled (as many windows after the step's last as the step took, into
the next epoch at an epoch's end), so reading and decompression stay off the critical path even
when a step spans several small windows. Windows behind the stream position are dropped.

Without a cache a window's chunks are read from the store every epoch. With a
:class:`~dasktrain.cache.ChunkCache` (``data.cache``) each chunk is read once and then taken from
the cache; chunks the cache holds on the GPU are concatenated and shuffled there with torch, so
batches come out as device tensors and a cached epoch's samples never pass through the host.
Batches are therefore numpy arrays or torch tensors, with ``data.fields`` dicts of them, and
targets may be absent (:mod:`dasktrain.rows`); :func:`join_batches` takes any of these.

Every consumer reads through :func:`open_reader` (a :class:`~dasktrain.store.ChunkReader`, which
names a missing or corrupt chunk, normalising inputs with ``data.normalize``): the shard feed
here, the replicas' validation, and a pipeline stage's rows of a step (:class:`StepRows`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import numpy as np

from dasktrain import rows
from dasktrain.cache import ChunkCache
from dasktrain.config import DataConfig
from dasktrain.normalize import Normalization, read_normalization
from dasktrain.plan import SamplingPlan
from dasktrain.rows import Rows
from dasktrain.store import ArraySpec, Chunk, ChunkReader, DatasetInfo

WindowKey = tuple[int, int, int]  # (epoch, shard, window)
Batch = tuple[Rows, Rows]
"""Inputs and targets of some samples (see :mod:`dasktrain.rows` for the shapes they take)."""


def join_batches(batches: Sequence[Batch]) -> Batch:
    """Several ``(inputs, targets)`` batches as one, in order (a device tensor if any part is one)."""
    return rows.concat([b[0] for b in batches]), rows.concat([b[1] for b in batches])


class NormalizedReader(ChunkReader):
    """A :class:`ChunkReader` whose inputs come out standardised (``data.normalize``)."""

    def __init__(self, info: DatasetInfo, normalization: Normalization) -> None:
        super().__init__(info)
        self.normalization = normalization

    def read_inputs(self, chunk: Chunk) -> np.ndarray:
        return self.normalization.apply(super().read_inputs(chunk))


def open_reader(info: DatasetInfo, data: DataConfig) -> ChunkReader:
    """The reader of a store for training or evaluation: normalising with the statistics of the
    training store (``data.store``) when ``data.normalize`` is on, also for other stores."""
    if not data.normalize:
        return ChunkReader(info)
    return NormalizedReader(info, read_normalization(data.store, data.inputs, info.storage_options))


class StepRows:
    """One array of a store by sample index, for a consumer that takes rows rather than windows:
    a pipeline replica's part of a step (inputs at its first stage, targets at its last).

    Whole chunks are read through a :class:`ChunkReader`, as every consumer reads, so a missing
    or corrupt chunk is named and ``data.normalize`` applies; the chunks of the last call are
    kept, since a shard's window spans consecutive steps.
    """

    def __init__(self, reader: ChunkReader, array: Literal["inputs", "targets"]) -> None:
        self.reader = reader
        spec = reader.info.inputs if array == "inputs" else reader.info.targets
        assert spec is not None, "a pipeline's last stage reads targets, which its loss needs"
        self.spec = spec
        self.read = reader.read_inputs if array == "inputs" else reader.read_targets
        """Reads one chunk of this array."""
        self.reads = 0
        """Chunks read from the store since the last :meth:`take_reads`."""
        self._chunks: dict[int, np.ndarray] = {}

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows ``indices`` of the array, in that order."""
        info = self.reader.info
        which = indices // info.chunk_size
        needed = [int(c) for c in np.unique(which)]
        # Keep what this call needs, drop the rest.
        self._chunks = {c: self._chunks[c] if c in self._chunks else self._read(c) for c in needed}
        if not needed:
            return np.empty((0, *self.spec.sample_shape), self.spec.dtype)
        first = self._chunks[needed[0]]  # the reader's dtype (float32 once normalised)
        out = np.empty((len(indices), *first.shape[1:]), dtype=first.dtype)
        for c in needed:
            mask = which == c
            out[mask] = self._chunks[c][indices[mask] - c * info.chunk_size]
        return out

    def take_reads(self) -> int:
        reads, self.reads = self.reads, 0
        return reads

    def _read(self, c: int) -> np.ndarray:
        info = self.reader.info
        self.reads += 1
        return self.read(Chunk(c, c * info.chunk_size, min((c + 1) * info.chunk_size, info.samples)))


class ShardFeed:
    """Serves ``(inputs, targets)`` of owned shards for any (epoch, step) of the plan.

    ``cache``: keep decoded chunks for later epochs (the plan should deal chunks once per run,
    ``SamplingPlan(..., deal_once=True)``, or each epoch brings other chunks to this worker).
    """

    def __init__(self, plan: SamplingPlan, reader: ChunkReader, shards: Sequence[int], epochs: int,
                 cache: ChunkCache | None = None) -> None:
        self.plan = plan
        self.reader = reader
        self.shards = tuple(shards)
        self.epochs = epochs
        self.cache = cache
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dasktrain-prefetch")
        self._windows: dict[WindowKey, Future[Batch]] = {}
        self.wait_s = 0.0
        self.reads = 0
        """Chunks read from the store (not from the cache) since the last :meth:`take_reads`."""
        """Seconds spent blocked on reads since the last :meth:`take_wait`."""

    def step_batches(self, epoch: int, step: int) -> list[Batch]:
        """Per owned shard, in shard order, the samples it contributes to ``step`` of ``epoch``."""
        plan = self.plan.epoch(epoch)
        return [self._take(epoch, s, *plan.shard_span(step, s)) for s in self.shards]

    def take_wait(self) -> float:
        waited, self.wait_s = self.wait_s, 0.0
        return waited

    def take_reads(self) -> int:
        reads, self.reads = self.reads, 0
        return reads

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._windows.clear()
        if self.cache is not None:
            self.cache.close()

    def _take(self, epoch: int, shard: int, start: int, stop: int) -> Batch:
        if start == stop:  # a small shard may give nothing to a step
            return self._empty()
        starts = self.plan.epoch(epoch).window_starts[shard]
        first = int(np.searchsorted(starts, start, side="right")) - 1
        last = int(np.searchsorted(starts, stop - 1, side="right")) - 1
        pieces_x: list[Rows] = []
        pieces_y: list[Rows] = []
        for w in range(first, last + 1):
            x, y = self._window(epoch, shard, w)
            lo = max(start - starts[w], 0)
            hi = min(stop - starts[w], rows.count(x))
            pieces_x.append(rows.take(x, lo, hi))
            pieces_y.append(rows.take(y, lo, hi))
        self._forget_before(epoch, shard, first)
        self._prefetch_after(epoch, shard, last, last - first + 1)
        return rows.concat(pieces_x), rows.concat(pieces_y)

    def _empty(self) -> Batch:
        """No samples, in the shapes and dtypes of the store's arrays."""
        info = self.reader.info

        def none_of(spec: ArraySpec) -> np.ndarray:
            return np.empty((0, *spec.sample_shape), spec.dtype)

        x: Rows = {spec.name: none_of(spec) for spec in info.fields} if info.fields else none_of(info.inputs)
        return x, none_of(info.targets) if info.targets is not None else None

    def _window(self, epoch: int, shard: int, w: int) -> Batch:
        key = (epoch, shard, w)
        if key not in self._windows:
            self._windows[key] = self._pool.submit(self._read_window, key)
        fut = self._windows[key]
        if not fut.done():
            t0 = time.perf_counter()
            result = fut.result()
            self.wait_s += time.perf_counter() - t0
            return result
        return fut.result()

    def _read_window(self, key: WindowKey) -> Batch:
        epoch, shard, w = key
        window = self.plan.epoch(epoch).windows[shard][w]
        parts: list[Batch] = [self.cache.get(c, self._read) if self.cache else self._read(c) for c in window.chunks]
        x = rows.permute(rows.concat([p[0] for p in parts]), window.order)
        y = rows.permute(rows.concat([p[1] for p in parts]), window.order)
        return x, y

    def _read(self, chunk: Chunk) -> Batch:
        self.reads += 1  # one prefetch thread: no other writer
        return self.reader.read(chunk)

    def _prefetch_after(self, epoch: int, shard: int, w: int, count: int) -> None:
        """Start assembling the ``count`` windows after window ``w`` of ``epoch``, into the next
        epoch's first windows when this epoch ends (about the next step's share of the shard)."""
        for _ in range(count):
            if w + 1 < len(self.plan.epoch(epoch).windows[shard]):
                w += 1
            elif epoch + 1 < self.epochs:
                epoch, w = epoch + 1, 0
            else:
                return
            key = (epoch, shard, w)
            if key not in self._windows:
                self._windows[key] = self._pool.submit(self._read_window, key)

    def _forget_before(self, epoch: int, shard: int, w: int) -> None:
        for key in [k for k in self._windows if k[1] == shard and (k[0], k[2]) < (epoch, w)]:
            del self._windows[key]
