"""Every way of summing gradients learns what one process learns, on real worker processes.

``reduce: collective`` (a gloo process group inside many-step tasks; gradients summed in one
bucket, and in one bucket per parameter, launched from backward), ``accumulate`` (several
micro-batches per update) and ``grad_transfer: bf16`` (gradients sent in bf16, summed in fp32)
are checked against the single-process reference loop, as the tree mode is in
test_equivalence.py; the collective mode also against a killed worker and a NaN on one rank,
with its numbers read per step and per segment (``train.host_reads``).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from dasktrain.checkpoint import checkpoint_step, latest_checkpoint, load_checkpoint
from dasktrain.collective import BucketedSum
from dasktrain.errors import ConfigError, DataError, NonFiniteLossError
from dasktrain.ingest import example_arrays, write_store
from dasktrain.metrics import read_metrics
from dasktrain.run_loop import train
from tests.helpers import local_client, plan_batches, run_config, saved_weights
from tests.ledger_check import check_exactly_once
from tests.reference import max_relative_error, reference_weights
from tests.test_faults import kill_worker_at, regroups, training_samples

pytestmark = pytest.mark.timeout(240)

MODES = {  # name: (train settings, data settings, relative tolerance against the reference)
    "collective": ({"reduce": "collective"}, {}, 1e-5),
    # Buckets of one parameter each (bucket_mb, a tenth of a KiB): several all-reduces per step,
    # each launched from the last of the three backward passes.
    "collective-accumulate-cache-buckets": ({"reduce": "collective", "accumulate": 3, "bucket_mb": 1e-4},
                                            {"cache": True}, 1e-5),
    # Updates decided on the device, the numbers read once per segment: the fused AdamW rounds
    # within an ulp or so of the reference loop's.
    "collective-segment-accumulate-cache-buckets": ({"reduce": "collective", "host_reads": "segment",
                                                     "accumulate": 3, "bucket_mb": 1e-4}, {"cache": True}, 1e-5),
    "tree-accumulate": ({"accumulate": 4}, {}, 1e-5),
    "tree-deterministic-accumulate-cache": ({"deterministic": True, "accumulate": 3}, {"cache": True}, 1e-5),
    # bf16 keeps 8 bits of mantissa: each transfer rounds by up to 2**-9 of a gradient.
    "tree-bf16-cache": ({"grad_transfer": "bf16"}, {"cache": True}, 2e-2),
}


@pytest.fixture
def store(digits_store):
    return digits_store  # the session's digits store (conftest.py): read only here


@pytest.fixture(scope="module")
def client():
    with local_client(2) as c:
        yield c


def mode_config(store, out, data=None, **train):
    return run_config(store, out, optimizer={"name": "adamw", "lr": 0.003, "weight_decay": 0.01},
                      schedule={"name": "warmup_cosine", "warmup_steps": 5, "min_lr": 1e-4},
                      data={"store": str(store), "validation": {"fraction": 0.2}, **(data or {})}, train=train)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_mode_equals_single_process(store, client, tmp_path, mode):
    options, data, tolerance = MODES[mode]
    config = mode_config(store, tmp_path / "run", data, **options)
    result = train(config, client=client)
    assert result.completed and result.steps == 2 * 29
    assert [e["val_samples"] for e in result.epochs] == [384, 384]
    steps = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "step"]
    assert [r["global_step"] for r in steps] == list(range(58))
    batches = plan_batches(config)
    assert [r["samples"] for r in steps] == [len(b) for b in batches]
    numbers: list[tuple[float, int]] = []
    error = max_relative_error(saved_weights(tmp_path / "run"), reference_weights(config, batches, step_numbers=numbers))
    assert error < tolerance
    # What each step reports: its mean loss, and the epoch's accuracy from the steps' correct counts.
    assert [r["loss"] for r in steps] == pytest.approx([loss for loss, _ in numbers], rel=max(tolerance, 1e-5))
    for e, epoch in enumerate(result.epochs):
        right = sum(correct for t, (_, correct) in enumerate(numbers) if t // 29 == e)
        slack = 0.5 if tolerance <= 1e-5 else 10  # bf16's rounded weights may flip a few close calls
        assert epoch["train_accuracy"] == pytest.approx(right / 1413, abs=slack / 1413)
    if data.get("cache"):  # the store was read once: each training chunk in epoch 0, none after
        assert [sum(r["chunks_read"] for r in steps if r["epoch"] == e) for e in (0, 1)] == [23, 0]
    if "bf16" in mode:
        assert error > 1e-6  # the rounding is real: the gradients did travel in bf16


def test_collective_on_three_workers_equals_single_process(store, tmp_path):
    # An odd rank count: uneven shard blocks, and a group beyond a pair.
    config = mode_config(store, tmp_path / "run", reduce="collective", accumulate=2, bucket_mb=1e-4)
    with local_client(3) as client:
        train(config, client=client)
    assert max_relative_error(saved_weights(tmp_path / "run"), reference_weights(config, plan_batches(config))) < 1e-5


def test_gradient_buckets_close_where_ddp_s_do():
    # Launch order runs from the last parameter back; as in DDP, a bucket closes with the
    # parameter that brings it to its limit: 1 MiB for the first, bucket_mb for the others.
    # The buffer starts with H entries of the step's numbers, which ride in the last bucket.
    H = 5
    mlp = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    params = list(mlp.parameters())  # 802816, 1024, 1048576, 1024, 10240, 10 entries
    total = 802816 + 1024 + 1048576 + 1024 + 10240 + 10
    buckets = BucketedSum(None, params, torch.zeros(H + total + 7), H, 25 * 2**20)
    # 10 + 10240 + 1024 entries stay under 1 MiB; the 4 MiB weight of the second layer closes it.
    assert buckets.spans == [(H + 802816 + 1024, H + total), (0, H + 802816 + 1024)]
    assert buckets.hooked == 1  # the last bucket, with the head, waits for the step's end
    assert buckets.tail == (H + total, H + total + 7)  # what follows the gradients: its own all-reduce
    buckets.close()
    # The first two layers' weights and the first bias: 1048576 entries close the first bucket
    # alone; then the bias (1024) and the weight (802816) stay together under 4 MiB...
    two = BucketedSum(None, params[:3], torch.zeros(H + 1852416), H, 4 * 2**20)
    assert two.spans == [(H + 803840, H + 1852416), (0, H + 803840)] and two.tail is None  # nothing follows
    two.close()
    # ... and under a 1 KiB limit the bias closes a bucket of its own.
    apart = BucketedSum(None, params[:3], torch.zeros(H + 1852416), H, 2**10)
    assert apart.spans == [(H + 803840, H + 1852416), (H + 802816, H + 803840), (0, H + 802816)]
    assert apart.hooked == 2
    apart.close()
    tiny = BucketedSum(None, params[4:], torch.zeros(H + 10250 + 7), H, 25 * 2**20)  # one bucket: all of it
    assert tiny.spans == [(0, H + 10250 + 7)] and tiny.tail is None and tiny.hooked == 0
    tiny.close()


def test_collective_rejects_what_it_cannot_honour(store, tmp_path):
    with pytest.raises(ConfigError, match="deterministic: true needs reduce: tree"):
        mode_config(store, tmp_path / "run", reduce="collective", deterministic=True)
    with pytest.raises(ConfigError, match="grad_transfer: bf16 applies to reduce: tree only"):
        mode_config(store, tmp_path / "run", reduce="collective", grad_transfer="bf16")
    with pytest.raises(ConfigError, match="host_reads: segment needs reduce: collective"):
        mode_config(store, tmp_path / "run", host_reads="segment")


def test_collective_killed_worker_regroups_with_exact_accounting(store, tmp_path):
    config = run_config(store, tmp_path / "run", optimizer={"name": "adamw", "lr": 0.003},
                        train={"epochs": 2, "batch_size": 50, "shards": 4, "seed": 3, "ledger": True,
                               "reduce": "collective", "bucket_mb": 1e-4, "step_timeout": 20.0},
                        checkpoint={"every_steps": 10, "keep": 2})
    with local_client(2) as client:
        hook, killed = kill_worker_at(client, {12})
        result = train(config, client=client, on_event=hook)
    assert killed == [12] and result.completed
    events = regroups(tmp_path / "run")
    assert events and events[0]["lost"], events
    check_exactly_once(tmp_path / "run", training_samples(config), epochs=2)
    assert max_relative_error(saved_weights(tmp_path / "run"), reference_weights(config, plan_batches(config))) < 1e-5


@pytest.mark.parametrize("reads", ["step", "segment"])
def test_collective_rank_killed_mid_segment_regroups_from_the_survivors_updates(store, tmp_path, reads):
    # A worker dies at its 25th step (global step 24), inside the segment of steps 20-39. The
    # survivor applied steps 20-23 first: read once per segment, it must count them as applied
    # when its all-reduce fails, or the regrouped run would apply them twice.
    flag = tmp_path / "armed"
    flag.touch()
    config = run_config(store, tmp_path / "run", optimizer={"name": "adamw", "lr": 0.003},
                        model={"factory": "tests.faulty:dying_mlp",
                               "kwargs": {"flag": str(flag), "after": 25, "in_features": 64,
                                          "out_features": 10, "hidden": [32]}},
                        train={"epochs": 2, "batch_size": 50, "shards": 4, "seed": 3, "ledger": True,
                               "reduce": "collective", "host_reads": reads, "step_timeout": 20.0},
                        checkpoint={"every_steps": 20, "keep": 2})
    with local_client(2) as client:
        result = train(config, client=client)
    assert result.completed and not flag.exists()
    # The regroup at the kill; the nanny's new worker may join later, in a regroup of its own.
    events = regroups(tmp_path / "run")
    assert (events[0]["global_step"], len(events[0]["lost"])) == (24, 1), events
    assert all(not e["lost"] for e in events[1:]), events
    check_exactly_once(tmp_path / "run", training_samples(config), epochs=2)
    # The flag is gone: the reference loop builds the same model, which no longer kills anyone.
    assert max_relative_error(saved_weights(tmp_path / "run"), reference_weights(config, plan_batches(config))) < 1e-5


@pytest.mark.parametrize("reads", ["step", "segment"])
def test_collective_nan_on_one_rank_stops_every_rank_naming_the_step(tmp_path, reads):
    arrays = example_arrays("digits")
    arrays["inputs"][5 * 64 + 3, 10] = np.nan  # one sample of chunk 5: one worker's shard
    store = write_store(tmp_path / "nan.zarr", arrays, chunk_size=64)
    config = run_config(store, tmp_path / "run", train={"epochs": 2, "batch_size": 50, "shards": 4, "seed": 3,
                                                          "reduce": "collective", "bucket_mb": 1e-4,
                                                          "host_reads": reads, "step_timeout": 30.0},
                        checkpoint={"every_steps": 5, "keep": 10})
    batches = plan_batches(config)
    bad = next(t for t, batch in enumerate(batches) if 5 * 64 + 3 in batch)
    assert bad % 5 not in (0, 4)  # the NaN step is inside a segment (they end at checkpoints), steps after it
    with local_client(2) as client, pytest.raises(NonFiniteLossError, match=f"loss is nan at global step {bad} "):
        train(config, client=client)
    # Every rank stopped in that step's segment: the segments before it are recorded, and their
    # last checkpoint is the newest, with the weights of the steps before it; none after it.
    steps = [r["global_step"] for r in read_metrics(tmp_path / "run") if r["kind"] == "step"]
    assert steps == list(range(bad - bad % 5))
    newest = latest_checkpoint(tmp_path / "run")
    assert newest is not None and checkpoint_step(newest) == bad - bad % 5
    weights = {k: v.float() for k, v in load_checkpoint(newest).model.items()}
    assert max_relative_error(weights, reference_weights(config, batches[: bad - bad % 5],
                                                         total_steps=len(batches))) < 1e-5


@pytest.mark.parametrize("reads", ["step", "segment"])
def test_collective_data_error_on_one_rank_stops_every_rank_at_once(client, tmp_path, reads):
    # One rank's shard has a chunk missing: its step fails, and the failure flag it sends with the
    # step's sums stops the other rank at the same step. Without it the other rank would update,
    # then wait in the next step's all-reduce for a rank that is gone, until step_timeout (60 s).
    # Read once per segment, the failed rank goes on joining the segment's all-reduces instead.
    store = write_store(tmp_path / "holed.zarr", example_arrays("digits"), chunk_size=64)
    (store / "targets" / "c" / "7").unlink()
    config = run_config(store, tmp_path / "run", train={"epochs": 1, "batch_size": 50, "shards": 4, "seed": 3,
                                                          "reduce": "collective", "host_reads": reads,
                                                          "step_timeout": 60.0})
    began = time.monotonic()
    with pytest.raises(DataError, match=r"chunk 7 .* array 'targets' in store .*holed.zarr is missing"):
        train(config, client=client)
    assert time.monotonic() - began < 30


@pytest.mark.parametrize("reads", ["step", "segment"])
def test_collective_skip_step_on_one_rank_skips_it_on_every_rank(tmp_path, reads):
    # One rank voids the step before its backward pass (its buckets are launched without it);
    # the other's backward launched them all: the all-reduces still pair up, nobody updates.
    arrays = example_arrays("digits")
    arrays["inputs"][5 * 64 + 3, 10] = np.nan
    store = write_store(tmp_path / "nan.zarr", arrays, chunk_size=64)
    config = run_config(store, tmp_path / "run", train={"epochs": 2, "batch_size": 50, "shards": 4, "seed": 3,
                                                          "reduce": "collective", "bucket_mb": 1e-4,
                                                          "on_nan": "skip_step", "host_reads": reads,
                                                          "step_timeout": 30.0})
    batches = plan_batches(config)
    bad = [t for t, batch in enumerate(batches) if 5 * 64 + 3 in batch]
    assert len(bad) == 2  # once per epoch
    with local_client(2) as client:
        assert train(config, client=client).completed
    records = read_metrics(tmp_path / "run")
    assert not [r for r in records if r["kind"] == "regroup"]  # no rank failed or hung on the way
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["global_step"] for r in steps if r.get("skipped")] == bad
    # The NaN micro-batch is counted in its step's samples, not in its loss: the loss stays a number.
    assert all(np.isfinite(r["loss"]) for r in steps)
    expected = reference_weights(config, [None if t in bad else batch for t, batch in enumerate(batches)])
    assert max_relative_error(saved_weights(tmp_path / "run"), expected) < 1e-5
