"""The sampling plan: which samples every shard contributes to every global step.

The plan is a pure function of (chunk layout, shards, global batch, seed, epoch, shuffle window)
and never of the number of workers, so the global batch sequence is the same on 1 or 100
workers, after a resume, and in the single-process reference loop.

Per epoch:

1. the training chunks are permuted with a generator seeded by ``(seed, epoch)`` and dealt
   round-robin into ``shards`` logical shards (with ``deal_once``, as for a worker-side chunk
   cache, they are dealt by the epoch-0 permutation for the whole run, and each shard permutes
   its own chunks, seeded by ``(seed, epoch, shard)``, from epoch 1 on);
2. each shard streams its chunks in that order through a shuffle buffer of ``shuffle_window``
   chunks: the samples of each window of consecutive chunks are permuted together;
3. the epoch has ``ceil(N / batch_size)`` steps; step ``k`` takes the first ``min((k+1)B, N)``
   samples of a fixed interleaving of all shards, so every step has exactly ``B`` samples except
   possibly the last, every shard contributes about ``B * n_s / N`` to every step (shards finish
   together), and every sample is used exactly once.

The interleaving orders the i-th sample of shard s (of n_s) by its relative position
``(i + 1/2) / n_s``, ties going to the lower shard.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from dasktrain.config import RunConfig
from dasktrain.errors import PlanError
from dasktrain.store import Chunk


@dataclass(frozen=True)
class ShardWindow:
    """Consecutive chunks of one shard shuffled together, and that shuffle.

    ``order[j]`` is the position, within the window's chunks laid end to end, of the window's
    j-th sample in stream order.
    """

    chunks: tuple[Chunk, ...]
    order: np.ndarray

    @property
    def size(self) -> int:
        return len(self.order)

    def sample_indices(self) -> np.ndarray:
        """Store sample indices of the window in stream order."""
        flat = np.concatenate([np.arange(c.start, c.stop) for c in self.chunks])
        return flat[self.order]


class EpochPlan:
    """The plan of one epoch; build it with :meth:`SamplingPlan.epoch`."""

    def __init__(self, windows: tuple[tuple[ShardWindow, ...], ...], batch_size: int) -> None:
        self.windows = windows
        self.shards = len(windows)
        self.shard_sizes = np.array([sum(w.size for w in ws) for ws in windows], dtype=np.int64)
        self.samples = int(self.shard_sizes.sum())
        self.steps = math.ceil(self.samples / batch_size)
        # Interleave all shards by relative position; cumulative per-shard counts at each
        # global-batch boundary say how many samples each shard has given up to that step.
        labels = np.concatenate([np.full(n, s, dtype=np.int64) for s, n in enumerate(self.shard_sizes)])
        position = np.concatenate([(np.arange(n) + 0.5) / n for n in self.shard_sizes])
        merged = labels[np.lexsort((labels, position))]
        bounds = np.minimum(np.arange(self.steps + 1) * batch_size, self.samples)
        # offsets[s, k]: samples of shard s used before step k.
        self.offsets = np.stack(
            [np.searchsorted(np.flatnonzero(merged == s), bounds) for s in range(self.shards)]
        )

    @cached_property
    def window_starts(self) -> tuple[np.ndarray, ...]:
        """Per shard, the stream position where each window begins (plus the end)."""
        return tuple(np.cumsum([0] + [w.size for w in ws]) for ws in self.windows)

    def shard_counts(self, step: int) -> np.ndarray:
        """Samples each shard contributes to ``step``."""
        return self.offsets[:, step + 1] - self.offsets[:, step]

    def shard_span(self, step: int, shard: int) -> tuple[int, int]:
        """Stream positions ``[start, stop)`` of ``shard`` used by ``step``."""
        return int(self.offsets[shard, step]), int(self.offsets[shard, step + 1])

    def shard_stream(self, shard: int) -> np.ndarray:
        """Store sample indices of ``shard`` in the order it streams them this epoch."""
        return np.concatenate([w.sample_indices() for w in self.windows[shard]])

    def samples_of(self, step: int, shard: int) -> np.ndarray:
        """Store sample indices ``shard`` contributes to ``step``, in order."""
        start, stop = self.shard_span(step, shard)
        return self.shard_stream(shard)[start:stop]

    def global_batch(self, step: int) -> np.ndarray:
        """Store sample indices of global batch ``step``: the shards' parts in shard order."""
        return np.concatenate([self.samples_of(step, s) for s in range(self.shards)])


class SamplingPlan:
    """Deals the training chunks into shards, epoch by epoch; see the module docstring."""

    def __init__(
        self,
        chunks: Sequence[Chunk],
        shards: int,
        batch_size: int,
        seed: int,
        shuffle_window: int = 2,
        deal_once: bool = False,
    ) -> None:
        if len(chunks) < shards:
            raise PlanError(
                f"the training data has {len(chunks)} chunks, needs at least one per shard "
                f"(shards={shards}); ingest with a smaller --chunk-size or lower train.shards"
            )
        self.chunks = tuple(chunks)
        self.shards = shards
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_window = shuffle_window
        self.deal_once = deal_once
        self.samples = sum(c.size for c in self.chunks)
        self.steps_per_epoch = math.ceil(self.samples / batch_size)
        self._plans = lru_cache(maxsize=4)(self._build_epoch)
        self._building = threading.Lock()

    def epoch(self, epoch: int) -> EpochPlan:
        """The plan of ``epoch``, built once (cached: workers ask for the same epoch every step).

        A worker's training thread and its feed's read-ahead thread ask for the next epoch at
        about the same time; ``lru_cache`` alone would let both build it (about 35 ms for 100k
        samples), so one waits for the other."""
        with self._building:
            return self._plans(epoch)

    def _build_epoch(self, epoch: int) -> EpochPlan:
        perm = np.random.default_rng([self.seed, 0 if self.deal_once else epoch, 0]).permutation(len(self.chunks))
        windows = []
        for shard in range(self.shards):
            mine = [self.chunks[i] for i in perm[shard :: self.shards]]
            if self.deal_once and epoch > 0:  # same chunks per shard, a new order every epoch
                mine = [mine[i] for i in np.random.default_rng([self.seed, epoch, 2, shard]).permutation(len(mine))]
            shard_windows = []
            for w, first in enumerate(range(0, len(mine), self.shuffle_window)):
                group = tuple(mine[first : first + self.shuffle_window])
                size = sum(c.size for c in group)
                order = np.random.default_rng([self.seed, epoch, 1, shard, w]).permutation(size)
                shard_windows.append(ShardWindow(group, order))
            windows.append(tuple(shard_windows))
        return EpochPlan(tuple(windows), self.batch_size)

    def locate(self, global_step: int) -> tuple[int, int]:
        """``(epoch, step within epoch)`` of a global step."""
        return divmod(global_step, self.steps_per_epoch)


def split_validation(chunks: Sequence[Chunk], fraction: float, seed: int) -> tuple[tuple[Chunk, ...], tuple[Chunk, ...]]:
    """Hold out a seeded ``fraction`` of the chunks (at least one) for validation.

    Returns ``(training chunks, validation chunks)``, each in store order; the split is fixed
    for the run (it depends on the seed, not the epoch).
    """
    n_val = max(1, round(fraction * len(chunks)))
    if n_val >= len(chunks):
        raise PlanError(
            f"validation fraction {fraction} of {len(chunks)} chunks leaves none for training"
        )
    held = set(np.random.default_rng([seed, 2**31 - 1]).permutation(len(chunks))[:n_val].tolist())
    train = tuple(c for i, c in enumerate(chunks) if i not in held)
    val = tuple(c for i, c in enumerate(chunks) if i in held)
    return train, val


def plan_for(config: RunConfig, train_chunks: tuple[Chunk, ...]) -> SamplingPlan:
    """The sampling plan a config gives over its training chunks (driver, replicas, reference)."""
    t = config.train
    return SamplingPlan(train_chunks, t.shards, t.batch_size, t.seed, config.data.shuffle_window,
                        deal_once=config.data.cache)
