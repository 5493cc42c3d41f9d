"""The worker-side chunk cache (``data.cache``): the store is read once per run, batches unchanged.

In-process tests run a real :class:`ShardFeed` over a real Zarr store on disk and count store
reads two ways: the cache's own stats, and a reader that counts what it is asked for. The last
test trains on a real 2-worker LocalCluster and checks the weights against the single-process
reference loop.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from dasktrain.cache import ChunkCache
from dasktrain.device import Placement
from dasktrain.feed import Batch, ShardFeed, join_batches
from dasktrain.metrics import read_metrics
from dasktrain.plan import SamplingPlan
from dasktrain.preflight import build_plan, resolve_splits
from dasktrain.run_loop import train
from dasktrain.store import Chunk, ChunkReader, DatasetInfo, open_dataset
from tests.helpers import local_client, plan_batches, run_config, saved_weights, synthetic_store
from tests.reference import max_relative_error, reference_weights

has_cuda = torch.cuda.is_available()

EPOCHS = 3
OWNED = (1, 2)  # the shards of the feed under test, out of 4
PER_CHUNK = 50 * (16 * 4 + 8)  # bytes of a chunk: 50 samples of 16 float32 inputs and an int64 target


class CountingReader(ChunkReader):
    """A real reader that counts, per chunk index, how often the store was read."""

    def __init__(self, info: DatasetInfo) -> None:
        super().__init__(info)
        self.reads: Counter[int] = Counter()

    def read(self, chunk: Chunk) -> tuple[np.ndarray, np.ndarray]:
        self.reads[chunk.index] += 1
        return super().read(chunk)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> DatasetInfo:
    # 1000 samples in 20 chunks of 50; the last step of each epoch is short (1000 = 15*64 + 40).
    path = synthetic_store(tmp_path_factory.mktemp("data") / "blobs.zarr", 1000, 16, 4, chunk=50, seed=1)
    return open_dataset(path, "inputs", "targets")


@pytest.fixture(scope="module")
def plan(dataset: DatasetInfo) -> SamplingPlan:
    return SamplingPlan(dataset.chunks(), shards=4, batch_size=64, seed=5, shuffle_window=2, deal_once=True)


def owned_chunks(plan: SamplingPlan) -> set[int]:
    return {c.index for s in OWNED for w in plan.epoch(0).windows[s] for c in w.chunks}


def all_batches(feed: ShardFeed) -> list[list[Batch]]:
    """Every step's batches of the run, in order (the caller closes the feed)."""
    return [feed.step_batches(e, k) for e in range(EPOCHS) for k in range(feed.plan.steps_per_epoch)]


def as_numpy(batches: list[list[Batch]]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    def host(a: np.ndarray | torch.Tensor) -> np.ndarray:
        return a.cpu().numpy() if isinstance(a, torch.Tensor) else a
    return [[(host(x), host(y)) for x, y in step] for step in batches]


def assert_same_batches(got: list[list[Batch]], expected: list[list[Batch]]) -> None:
    assert len(got) == len(expected)
    for g_step, e_step in zip(as_numpy(got), as_numpy(expected)):
        for (gx, gy), (ex, ey) in zip(g_step, e_step, strict=True):
            assert gx.dtype == ex.dtype and gy.dtype == ey.dtype
            assert np.array_equal(gx, ex) and np.array_equal(gy, ey)


@pytest.fixture(scope="module")
def uncached(dataset: DatasetInfo, plan: SamplingPlan) -> list[list[Batch]]:
    """The batches of the feed without a cache: what a cached feed must give, step for step."""
    reader = CountingReader(dataset)
    with closing(ShardFeed(plan, reader, OWNED, EPOCHS)) as feed:
        batches = all_batches(feed)
    assert set(reader.reads.values()) == {EPOCHS}  # without a cache: every chunk, every epoch
    return batches


@pytest.mark.timeout(60)
def test_uncached_feed_serves_the_plan(dataset: DatasetInfo, plan: SamplingPlan, uncached: list[list[Batch]]) -> None:
    # The yardstick itself against the plan and the store, read whole.
    inputs = np.asarray(zarr.open_array(f"{dataset.path}/inputs", mode="r")[:])
    targets = np.asarray(zarr.open_array(f"{dataset.path}/targets", mode="r")[:])
    for t, step in enumerate(as_numpy(uncached)):
        epoch, k = plan.locate(t)
        for s, (x, y) in zip(OWNED, step):
            idx = plan.epoch(epoch).samples_of(k, s)
            assert np.array_equal(x, inputs[idx]) and np.array_equal(y, targets[idx])


@pytest.mark.timeout(60)
def test_a_step_spanning_several_windows_has_the_next_steps_windows_read_ahead(dataset: DatasetInfo) -> None:
    # Windows of one chunk (50 samples) and 120 samples per shard and step: a step spans three
    # windows or more. While step 0 trains, every chunk of step 1 is read, not one window's only.
    plan = SamplingPlan(dataset.chunks(), shards=4, batch_size=480, seed=5, shuffle_window=1, deal_once=True)
    epoch, shard = plan.epoch(0), 1

    def chunks_of(step: int) -> set[int]:
        start, stop = epoch.shard_span(step, shard)
        return {c.index for first, window in zip(epoch.window_starts[shard], epoch.windows[shard])
                if first < stop and first + len(window.order) > start for c in window.chunks}

    reader = CountingReader(dataset)
    with closing(ShardFeed(plan, reader, (shard,), 1)) as feed:
        feed.step_batches(0, 0)
        wanted = chunks_of(1)
        assert len(wanted - chunks_of(0)) >= 2  # more than the one window after step 0's last
        deadline = time.monotonic() + 10
        while not wanted <= set(reader.reads) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert wanted <= set(reader.reads), (sorted(wanted), sorted(reader.reads))


@pytest.mark.timeout(60)
def test_cache_reads_each_chunk_once_per_run(dataset: DatasetInfo, plan: SamplingPlan,
                                             uncached: list[list[Batch]]) -> None:
    reader = CountingReader(dataset)
    cache = ChunkCache(2**30, "cpu")
    with closing(ShardFeed(plan, reader, OWNED, EPOCHS, cache=cache)) as feed:
        batches = all_batches(feed)
    mine = owned_chunks(plan)
    assert reader.reads == Counter({i: 1 for i in mine})  # the store: once per chunk per run
    stats = cache.stats()
    assert stats["misses"] == len(mine)
    assert stats["hits"] == (EPOCHS - 1) * len(mine)
    assert all(isinstance(a, np.ndarray) for step in batches for b in step for a in b)  # host cache
    assert_same_batches(batches, uncached)


@pytest.mark.timeout(60)
def test_cache_holds_bytes_and_frees_them_on_close(dataset: DatasetInfo, plan: SamplingPlan) -> None:
    cache = ChunkCache(2**30, "cpu")
    feed = ShardFeed(plan, ChunkReader(dataset), OWNED, EPOCHS, cache=cache)
    feed.step_batches(0, plan.steps_per_epoch - 1)  # the last step touches every window
    stats = cache.stats()
    assert stats["host_bytes"] >= PER_CHUNK and stats["device_bytes"] == 0
    assert stats["host_bytes"] == stats["chunks"] * PER_CHUNK
    feed.close()
    assert cache.stats()["chunks"] == 0 and cache.stats()["host_bytes"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kept", [0, 3])
def test_a_cache_too_small_reads_the_rest_again(dataset: DatasetInfo, plan: SamplingPlan,
                                                uncached: list[list[Batch]], kept: int) -> None:
    reader = CountingReader(dataset)
    cache = ChunkCache(kept * PER_CHUNK + PER_CHUNK // 2, "cpu")  # room for `kept` chunks, not one more
    with closing(ShardFeed(plan, reader, OWNED, EPOCHS, cache=cache)) as feed:
        batches = all_batches(feed)
    mine = owned_chunks(plan)
    assert sorted(reader.reads.values()) == [1] * kept + [EPOCHS] * (len(mine) - kept)
    stats = cache.stats()
    assert stats["misses"] == sum(reader.reads.values())
    assert stats["hits"] == (EPOCHS - 1) * kept
    assert_same_batches(batches, uncached)


@pytest.mark.timeout(30)
def test_join_batches_takes_arrays_tensors_and_empty_parts() -> None:
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    y = np.arange(6)
    empty = (np.empty((0, 2), np.float32), np.empty((0,), np.int64))
    host = join_batches([(x[:2], y[:2]), empty, (x[2:], y[2:])])
    assert isinstance(host[0], np.ndarray) and np.array_equal(host[0], x) and np.array_equal(host[1], y)
    mixed = join_batches([(torch.from_numpy(x[:2]), torch.from_numpy(y[:2])), empty, (x[2:], y[2:])])
    assert isinstance(mixed[0], torch.Tensor) and isinstance(mixed[1], torch.Tensor)
    assert torch.equal(mixed[0], torch.from_numpy(x)) and torch.equal(mixed[1], torch.from_numpy(y))


@pytest.mark.timeout(30)
def test_a_tensor_already_on_the_device_is_not_copied() -> None:
    tensor = torch.ones(4)
    assert Placement("fp32", "cpu").to_device(tensor, "inputs") is tensor


# Tensors held on the CPU take the same torch path (cat, index on the device) as on a GPU.
DEVICES = [pytest.param("cpu", id="cpu-tensors"),
           pytest.param("cuda:0", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not has_cuda, reason="needs a CUDA GPU")])]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("device", DEVICES)
def test_device_cache_serves_device_batches(dataset: DatasetInfo, plan: SamplingPlan,
                                            uncached: list[list[Batch]], device: str) -> None:
    reader = CountingReader(dataset)
    # On CUDA the default device budget (half the free GPU memory); on the CPU one must be given.
    cache = ChunkCache(2**30, device, device_limit_bytes=2**30 if device == "cpu" else None)
    with closing(ShardFeed(plan, reader, OWNED, EPOCHS, cache=cache)) as feed:
        batches = all_batches(feed)
        stats = cache.stats()
    assert set(reader.reads.values()) == {1}
    assert stats["host_bytes"] == 0 and stats["device_bytes"] == len(reader.reads) * PER_CHUNK
    on = torch.device(device)
    assert all(isinstance(a, torch.Tensor) and a.device == on for step in batches for b in step for a in b)
    assert_same_batches(batches, uncached)
    x = batches[-1][0][0]
    assert isinstance(x, torch.Tensor) and Placement("fp32", device).to_device(x, "inputs") is x


@pytest.mark.timeout(60)
@pytest.mark.parametrize("device", DEVICES)
def test_device_cache_spills_to_the_host_when_its_budget_is_spent(
        dataset: DatasetInfo, plan: SamplingPlan, uncached: list[list[Batch]], device: str) -> None:
    reader = CountingReader(dataset)
    cache = ChunkCache(2**30, device, device_limit_bytes=5 * PER_CHUNK // 2)  # 2 chunks on the device
    with closing(ShardFeed(plan, reader, OWNED, EPOCHS, cache=cache)) as feed:
        batches = all_batches(feed)
        stats = cache.stats()
    assert set(reader.reads.values()) == {1}
    assert stats["device_bytes"] == 2 * PER_CHUNK and stats["host_bytes"] == (len(reader.reads) - 2) * PER_CHUNK
    # Windows holding a device chunk come out on the device, the others on the host.
    kinds = {type(a) for step in batches for b in step for a in b}
    assert kinds == {np.ndarray, torch.Tensor}
    assert_same_batches(batches, uncached)
    # A step's shards joined, whatever mix of kinds, are the uncached step's samples.
    assert_same_batches([[join_batches(step)] for step in batches], [[join_batches(step)] for step in uncached])


@pytest.mark.timeout(240)
def test_cached_run_on_a_cluster_equals_single_process(digits_store: Path, tmp_path: Path) -> None:
    # 3 epochs of 18 steps on 2 workers, each streaming the same chunks all run long.
    config = run_config(digits_store, tmp_path / "run",
                        data={"store": str(digits_store), "cache": True},
                        train={"epochs": 3, "batch_size": 100, "shards": 6, "seed": 3})
    with local_client(2) as client:
        result = train(config, client=client)
    assert result.completed and result.steps == 3 * 18
    assert max_relative_error(saved_weights(tmp_path / "run"), reference_weights(config, plan_batches(config))) < 1e-5
    # The store is read once per run: every training chunk in epoch 0 (prefetch may take the
    # first ones before step 0 asks), none after.
    steps = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "step"]
    reads = [sum(r["chunks_read"] for r in steps if r["epoch"] == e) for e in range(3)]
    assert reads == [len(build_plan(config, resolve_splits(config)).chunks), 0, 0], reads
