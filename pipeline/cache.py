"""A worker's cache of decoded training chunks (``data.cache``), so the store is read once per run.

With the cache on, the plan deals the chunks to shards once per run (``deal_once``), so a worker
streams the same chunks every epoch and only their order changes: after the first epoch every
chunk it needs is already here, decoded (and normalised).

Where chunks live:

* on the worker's GPU, as torch tensors, while they fit in half of the GPU memory that was free
  when the first chunk arrived (the other half stays for activations and the allocator's slack);
  windows of such chunks are then shuffled on the GPU and a cached epoch never touches the host;
* otherwise (a CPU worker, a full GPU, a dtype torch cannot hold) as host numpy arrays, up to
  ``limit_bytes`` in all;
* a chunk that fits nowhere is not kept: it is read from the store again next time.

Chunks are kept first come, first kept, never evicted: with a fixed chunk set per worker, the
chunks cached in epoch 0 are the ones needed again in every later epoch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np
import torch

from dasktrain import rows
from dasktrain.rows import Array, Rows
from dasktrain.store import Chunk

log = logging.getLogger(__name__)

HostChunk = tuple[Rows, Rows]
"""A chunk's inputs and targets as read (see :mod:`dasktrain.rows`)."""
DeviceChunk = tuple[Rows, Rows]

DEVICE_FRACTION = 0.5
"""Share of the GPU memory free when caching starts that the cache may fill."""


class ChunkCache:
    """Decoded ``(inputs, targets)`` of chunks, on the device while they fit, else on the host.

    One per feed (so per replica); it is used from the feed's prefetch thread and read (stats)
    from the step's thread, hence the lock. The store is read outside the lock.
    """

    def __init__(self, limit_bytes: int, device: torch.device | str = "cpu",
                 device_limit_bytes: int | None = None) -> None:
        """``limit_bytes``: most bytes of chunks held as host arrays. ``device_limit_bytes``: most
        bytes held as tensors on ``device``; by default, on CUDA, :data:`DEVICE_FRACTION` of the
        GPU memory free when the first chunk arrives, and none on a CPU device."""
        for name, value in (("limit_bytes", limit_bytes), ("device_limit_bytes", device_limit_bytes)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.limit_bytes = limit_bytes
        self.device = torch.device(device)
        self._host: dict[Chunk, HostChunk] = {}
        self._dev: dict[Chunk, DeviceChunk] = {}
        self._device_budget = device_limit_bytes
        if device_limit_bytes is None and self.device.type != "cuda":
            self._device_budget = 0
        self._lock = threading.Lock()
        self._closed = False
        self._warned_full = False
        self.hits = 0
        self.misses = 0
        """Chunks read from the store (a chunk that was not kept counts each time it is read)."""
        self.host_bytes = 0
        self.device_bytes = 0

    def get(self, chunk: Chunk, read: Callable[[Chunk], HostChunk]) -> HostChunk | DeviceChunk:
        """The chunk's data: from the cache, or read with ``read`` (and kept if it fits).

        Returns torch tensors on :attr:`device` for a chunk held there, else numpy arrays; both
        are shared with the cache and must not be modified.
        """
        with self._lock:
            if chunk in self._dev:
                self.hits += 1
                return self._dev[chunk]
            if chunk in self._host:
                self.hits += 1
                return self._host[chunk]
            self.misses += 1
        x, y = read(chunk)
        return self._insert(chunk, x, y)

    def _insert(self, chunk: Chunk, x: Rows, y: Rows) -> HostChunk | DeviceChunk:
        nbytes = rows.nbytes(x) + rows.nbytes(y)
        if self._device_room(nbytes):
            try:
                on_device = rows.apply(self._to_device, x, ""), rows.apply(self._to_device, y, "")
            except (TypeError, ValueError, torch.cuda.OutOfMemoryError) as exc:
                # A dtype torch has no tensor for, or the GPU filled up after all: the host it is,
                # for this chunk and (after an OOM) every later one.
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    with self._lock:
                        self._device_budget = self.device_bytes
            else:
                with self._lock:
                    if not self._closed:
                        self._dev[chunk] = on_device
                        self.device_bytes += nbytes
                return on_device
        with self._lock:
            if not self._closed and self.host_bytes + nbytes <= self.limit_bytes:
                self._host[chunk] = (x, y)
                self.host_bytes += nbytes
            elif not self._closed and not self._warned_full:
                self._warned_full = True
                log.info("chunk cache full (%.1f MiB on %s, %.1f MiB on the host, host limit %.1f MiB): "
                         "chunks beyond it are read from the store every epoch",
                         self.device_bytes / 2**20, self.device, self.host_bytes / 2**20, self.limit_bytes / 2**20)
        return x, y

    def _to_device(self, array: Array, _: str) -> Array:
        return torch.from_numpy(array).to(self.device) if isinstance(array, np.ndarray) else array.to(self.device)

    def _device_room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit in the device part (fixing its budget on the first call)."""
        with self._lock:
            if self._closed:
                return False
            if self._device_budget is None:  # CUDA, no limit given: measure now, once
                free, _ = torch.cuda.mem_get_info(self.device)
                self._device_budget = int(free * DEVICE_FRACTION)
                log.debug("chunk cache may hold %.1f MiB on %s", self._device_budget / 2**20, self.device)
            return self.device_bytes + nbytes <= self._device_budget

    def stats(self) -> dict[str, int]:
        """Hits, misses (store reads), chunks held and bytes held on the host and on the device."""
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "chunks": len(self._host) + len(self._dev),
                    "host_bytes": self.host_bytes, "device_bytes": self.device_bytes}

    def close(self) -> None:
        """Drop every chunk (freeing GPU memory now) and keep no more; the counts stay."""
        with self._lock:
            self._closed = True
            self._host.clear()
            self._dev.clear()
            self.host_bytes = self.device_bytes = 0
