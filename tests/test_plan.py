"""The sampling plan: exact once-per-epoch accounting, reproducibility, and independence of workers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from dasktrain.errors import PlanError
from dasktrain.plan import SamplingPlan, split_validation
from dasktrain.store import Chunk


def chunks_of(samples: int, size: int) -> tuple[Chunk, ...]:
    return tuple(Chunk(i, s, min(s + size, samples)) for i, s in enumerate(range(0, samples, size)))


@pytest.mark.parametrize("samples,chunk,shards,batch,window", [
    (1000, 64, 4, 64, 2), (1001, 50, 3, 100, 1), (777, 10, 7, 33, 3), (100, 100, 1, 7, 2), (130, 13, 10, 128, 4),
])
def test_every_sample_exactly_once_per_epoch(samples, chunk, shards, batch, window):
    plan = SamplingPlan(chunks_of(samples, chunk), shards, batch, seed=1, shuffle_window=window)
    for epoch in range(3):
        ep = plan.epoch(epoch)
        batches = [ep.global_batch(k) for k in range(ep.steps)]
        used = np.concatenate(batches)
        assert np.array_equal(np.sort(used), np.arange(samples))
        sizes = [len(b) for b in batches]
        # Every step is a full global batch except possibly the last, which is the remainder.
        assert sizes[:-1] == [batch] * (len(sizes) - 1)
        assert sizes[-1] == samples - batch * (len(sizes) - 1)
        assert ep.steps == plan.steps_per_epoch


def test_shards_contribute_in_proportion_every_step():
    plan = SamplingPlan(chunks_of(4096, 64), shards=8, batch_size=256, seed=0)
    ep = plan.epoch(0)
    for k in range(ep.steps):
        counts = ep.shard_counts(k)
        expected = 256 * ep.shard_sizes / ep.samples
        assert np.all(np.abs(counts - expected) <= 1.0 + 1e-9)


def test_shard_reads_only_its_own_chunks():
    plan = SamplingPlan(chunks_of(640, 64), shards=4, batch_size=32, seed=5)
    ep = plan.epoch(2)
    for s in range(4):
        own = {c.index for w in ep.windows[s] for c in w.chunks}
        used = np.concatenate([ep.samples_of(k, s) for k in range(ep.steps)])
        assert {int(i) // 64 for i in used} == own
    owners = [c.index for s in range(4) for w in ep.windows[s] for c in w.chunks]
    assert sorted(owners) == list(range(10))  # every chunk dealt to exactly one shard


def test_same_seed_reproduces_and_epochs_and_seeds_differ():
    layout = chunks_of(1000, 50)
    a = SamplingPlan(layout, 4, 100, seed=7)
    b = SamplingPlan(layout, 4, 100, seed=7)
    c = SamplingPlan(layout, 4, 100, seed=8)
    for k in range(a.steps_per_epoch):
        assert np.array_equal(a.epoch(0).global_batch(k), b.epoch(0).global_batch(k))
    assert not np.array_equal(a.epoch(0).global_batch(0), a.epoch(1).global_batch(0))
    assert not np.array_equal(a.epoch(0).global_batch(0), c.epoch(0).global_batch(0))


def test_shuffle_window_mixes_chunks():
    plan = SamplingPlan(chunks_of(400, 10), shards=1, batch_size=20, seed=0, shuffle_window=4)
    first = plan.epoch(0).global_batch(0)
    assert len({int(i) // 10 for i in first}) > 1  # samples of one step come from several chunks


def test_fewer_chunks_than_shards_is_an_error():
    with pytest.raises(PlanError, match="3 chunks, needs at least one per shard \\(shards=4\\)"):
        SamplingPlan(chunks_of(30, 10), shards=4, batch_size=8, seed=0)


def test_validation_split_is_disjoint_and_fixed():
    layout = chunks_of(1000, 50)
    train, val = split_validation(layout, 0.2, seed=1)
    assert len(val) == 4 and len(train) == 16
    assert not {c.index for c in train} & {c.index for c in val}
    assert split_validation(layout, 0.2, seed=1) == (train, val)


def test_default_plan_is_unchanged_by_deal_once():
    # Pinned from the plan before deal_once existed: a run without the cache plans as it did.
    plan = SamplingPlan(chunks_of(1000, 50), 4, 100, seed=7)
    deals = {
        0: [[3, 14, 1, 4, 17], [8, 16, 6, 18, 2], [12, 10, 0, 5, 9], [13, 15, 7, 19, 11]],
        1: [[17, 15, 2, 11, 4], [14, 1, 8, 16, 19], [18, 5, 7, 9, 12], [10, 6, 0, 3, 13]],
    }
    for epoch, expected in deals.items():
        ep = plan.epoch(epoch)
        assert [[c.index for w in ws for c in w.chunks] for ws in ep.windows] == expected
    assert plan.epoch(0).global_batch(0)[:6].tolist() == [188, 176, 169, 706, 167, 747]
    assert plan.epoch(1).global_batch(0)[:6].tolist() == [772, 776, 885, 777, 894, 779]


def shard_chunks(plan: SamplingPlan, epoch: int) -> list[list[int]]:
    """Per shard, the chunk indices it streams in ``epoch``, in stream order."""
    return [[c.index for w in ws for c in w.chunks] for ws in plan.epoch(epoch).windows]


def test_deal_once_keeps_each_shards_chunks_and_reorders_them():
    layout = chunks_of(1000, 50)
    plan = SamplingPlan(layout, 4, 100, seed=7, deal_once=True)
    first = shard_chunks(plan, 0)
    # Epoch 0 is the default plan's epoch 0: a cached run's first epoch is the uncached one's.
    assert first == shard_chunks(SamplingPlan(layout, 4, 100, seed=7), 0)
    for epoch in (1, 2, 3):
        now = shard_chunks(plan, epoch)
        assert [sorted(s) for s in now] == [sorted(s) for s in first]  # same chunk set per shard
        assert all(a != b for a, b in zip(now, first))  # in a new order on every shard
        assert not np.array_equal(plan.epoch(epoch).shard_stream(0), plan.epoch(0).shard_stream(0))
    # The default plan deals anew every epoch.
    default = SamplingPlan(layout, 4, 100, seed=7)
    assert [sorted(s) for s in shard_chunks(default, 1)] != [sorted(s) for s in first]


@pytest.mark.parametrize("samples,chunk,shards,batch,window", [
    (1000, 64, 4, 64, 2), (777, 10, 7, 33, 3), (130, 13, 10, 128, 4),
])
def test_deal_once_uses_every_sample_exactly_once_per_epoch(samples, chunk, shards, batch, window):
    plan = SamplingPlan(chunks_of(samples, chunk), shards, batch, seed=1, shuffle_window=window, deal_once=True)
    for epoch in range(3):
        ep = plan.epoch(epoch)
        used = np.concatenate([ep.global_batch(k) for k in range(ep.steps)])
        assert np.array_equal(np.sort(used), np.arange(samples))
        assert ep.steps == plan.steps_per_epoch


def test_an_epoch_asked_for_by_two_threads_at_once_is_built_once():
    # A worker's training thread and its feed's read-ahead thread both ask for the next epoch.
    built = []
    started = threading.Event()

    class Counting(SamplingPlan):
        def _build_epoch(self, epoch):
            built.append(epoch)
            started.set()
            time.sleep(0.2)  # a long build: the second caller arrives while it runs
            return super()._build_epoch(epoch)

    plan = Counting(chunks_of(640, 64), shards=2, batch_size=32, seed=0)
    plans = []
    first = threading.Thread(target=lambda: plans.append(plan.epoch(1)))
    first.start()
    assert started.wait(10)
    plans.append(plan.epoch(1))
    first.join(10)
    assert built == [1] and len(plans) == 2 and plans[0] is plans[1]
