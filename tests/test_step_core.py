"""The worker step core (dasktrain.step_core) and what pipeline stages gained from it.

The core's units are checked against plain torch (autograd, a hand-made SGD step, the documented
schedule of tests/reference.py). Pipeline stages run here in one process, each in its own thread,
wired through stand-ins for Dask actor handles that deliver a ``put_*`` at once (a copy of the
tensor, as a transfer would): validation after the update, the ``skip_step`` decision reaching
every stage of every replica, a non-finite gradient behind finite losses, and a deleted chunk.
Expected numbers come from tests/reference.py and from the store read with zarr directly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from dasktrain.config import OptimizerConfig
from dasktrain.errors import DataError, NonFiniteLossError
from dasktrain.objective import build_optimizer, load_optimizer_state
from dasktrain.preflight import build_plan, resolve_splits
from dasktrain.reduce import StepStats
from dasktrain.stage_actor import PipelineStage, StageSpec
from dasktrain.step_core import DeviceTally, Scored, StepCore, all_finite
from dasktrain.store import open_dataset
from tests.helpers import run_config, synthetic_store
from tests.reference import build_model, learning_rate, loss

MLP = {"factory": "dasktrain.models:mlp", "kwargs": {"in_features": 16, "out_features": 4, "hidden": [32]}}
"""Four layers: Flatten, Linear | ReLU, Linear: two stages of one Linear each."""
BOUNDS = ((0, 2), (2, 4))


@pytest.fixture(autouse=True)
def _process_state():
    """Stages built in this process set torch's thread count and reseed its generator: put both
    back for the tests that share the process."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_num_threads(threads)


# -- the core's units -----------------------------------------------------------------------------

def _core(tmp_path: Path, on_nan: str = "stop", **schedule: Any) -> tuple[StepCore, nn.Module, Any]:
    store = synthetic_store(tmp_path / "s.zarr", samples=80, features=16, classes=4, chunk=20)
    config = run_config(store, tmp_path / "run", model=MLP, optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.0},
                        train={"epochs": 2, "batch_size": 20, "shards": 2, "on_nan": on_nan},
                        schedule=schedule or {"name": "constant"})
    plan = build_plan(config, resolve_splits(config))  # 4 steps an epoch
    model = nn.Linear(3, 2)
    params = list(model.parameters())
    return StepCore(config, params, torch.optim.SGD(params, lr=123.0), plan), model, config


def test_bound_buffer_collects_every_backward(tmp_path):
    core, model, _ = _core(tmp_path)
    flat = torch.zeros(core.numel + 5)  # a replica's buffer carries more than gradients behind them
    core.bind(flat)
    xs = [torch.randn(4, 3), torch.randn(6, 3)]
    for x in xs:
        model(x).square().sum().backward()
    twin = nn.Linear(3, 2)
    twin.load_state_dict(model.state_dict())
    expected = [torch.zeros_like(p) for p in twin.parameters()]
    for x in xs:
        for acc, g in zip(expected, torch.autograd.grad(twin(x).square().sum(), list(twin.parameters()))):
            acc += g
    assert torch.allclose(flat[: core.numel], torch.cat([g.reshape(-1) for g in expected]))
    assert not flat[core.numel:].any()


def test_a_buffer_is_bound_once_whatever_tensor_object_names_it(tmp_path):
    core, model, _ = _core(tmp_path)
    flat = torch.zeros(core.numel + 5)
    core.bind(flat)
    views = [p.grad for p in model.parameters()]
    core.bind(flat[: core.numel])  # the same memory, as a collective step names it for the update
    assert all(p.grad is v for p, v in zip(model.parameters(), views))
    model.zero_grad()  # gradients set to None: bound again, into the same buffer
    core.bind(flat[: core.numel])
    model(torch.ones(2, 3)).sum().backward()
    assert flat[: core.numel].any() and not flat[core.numel:].any()
    other = torch.zeros(core.numel)  # another buffer: the gradients follow it
    core.bind(other)
    start, end = other.data_ptr(), other.data_ptr() + other.numel() * other.element_size()
    assert all(start <= p.grad.data_ptr() < end for p in model.parameters())
    model(torch.ones(2, 3)).sum().backward()
    assert other.any()


def test_update_steps_with_the_scheduled_learning_rate(tmp_path):
    core, model, config = _core(tmp_path, name="warmup_cosine", warmup_steps=2)
    before = [p.detach().clone() for p in model.parameters()]
    mean = torch.randn(core.numel)
    core.update(5, mean)
    lr = learning_rate("warmup_cosine", 0.5, 5, total_steps=8, warmup_steps=2)
    for b, p, g in zip(before, model.parameters(), mean.split([p.numel() for p in before])):
        assert torch.allclose(p.detach(), b - lr * g.view_as(b))


def test_a_finite_loss_counts_and_a_non_finite_one_voids_the_step_under_skip_step(tmp_path):
    core, _, _ = _core(tmp_path, on_nan="skip_step")
    stats = StepStats()
    assert core.admit_loss(Scored(torch.tensor(3.0), 3.0, 2), 5, stats, t=6)
    assert not core.admit_loss(Scored(torch.tensor(float("nan")), float("nan"), 1), 4, stats, t=6)
    assert (stats.loss_sum, stats.count, stats.correct, stats.nonfinite) == (3.0, 9, 2, 1)


def test_a_device_tally_counts_what_admit_loss_counts(tmp_path):
    # The same micro-batches through admit_loss (read one by one) and a DeviceTally (added on the device).
    pairs = [(3.0, 2.0), (float("nan"), 1.0), (1.5, 4.0), (float("inf"), 0.0), (0.25, 1.0)]
    core, _, _ = _core(tmp_path, on_nan="skip_step")
    stats = StepStats()
    for value, correct in pairs:
        core.admit_loss(Scored(torch.tensor(value), value, correct), 1, stats, t=6)
    buffer = torch.full((4,), 7.0)
    tally = DeviceTally(buffer[1:3])
    tally.clear()
    assert buffer.tolist() == [7.0, 0.0, 0.0, 7.0] and tally.first_nonfinite() is None
    assert tally.exact() == (0.0, 0.0, 0)
    for value, correct in pairs[2:3] + pairs[4:]:  # finite only: the sums on the device are the counts
        tally.add(torch.tensor([value, correct]))
    assert buffer.tolist() == [7.0, 1.75, 5.0, 7.0] and tally.first_nonfinite() is None
    tally.clear()
    for value, correct in pairs:
        tally.add(torch.tensor([value, correct]))
    assert math.isnan(buffer[1])  # what tells the caller to count exactly
    assert tally.exact() == (stats.loss_sum, stats.correct, stats.nonfinite) == (4.75, 7.0, 2)
    value, correct = tally.first_nonfinite() or (0.0, 0.0)
    assert math.isnan(value) and correct == 1.0
    # Settled on the device (host_reads: segment): the same numbers, and the same first loss.
    settled, first = torch.zeros(3), torch.zeros(())
    tally.settle(settled, first)
    assert settled.tolist() == [4.75, 7.0, 2.0] and math.isnan(first)
    alone = DeviceTally(None)  # read once per segment: no running sums, settle() alone sums
    alone.clear()
    for value, correct in pairs:
        alone.add(torch.tensor([value, correct]))
    again = torch.zeros(3)
    alone.settle(again, torch.zeros(()))
    assert again.tolist() == settled.tolist()
    tally.clear()
    tally.add(torch.tensor([float("-inf"), 3.0]))
    tally.settle(settled, first)
    assert settled.tolist() == [0.0, 0.0, 1.0] and first.item() == float("-inf")
    for value, correct in pairs[2:3]:
        tally.clear()
        tally.add(torch.tensor([value, correct]))
        tally.settle(settled, first)
        assert settled.tolist() == [1.5, 4.0, 0.0] and first.item() == 0.0


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_an_update_flagged_on_the_device_leaves_weights_and_state_alone_and_state_moves_between_kinds(name, monkeypatch):
    # host_reads: segment decides an update on the device (the fused optimizer's found_inf). A
    # flagged update must change nothing, momentum and step counts included; and an optimizer's
    # state must load into the other implementation (a checkpoint of a run that read per step,
    # resumed reading per segment, and back) and go on as if nothing had changed.
    config = OptimizerConfig(name=name, lr=0.1, momentum=0.9, weight_decay=0.01)
    # Memory torch allocates without filling holds whatever was there: here, always junk.
    monkeypatch.setattr(torch, "empty_like", lambda t, **kwargs: torch.full_like(t, 1e30, **kwargs))
    torch.manual_seed(0)
    grads = [torch.randn(6) for _ in range(6)]

    def plain_torch(params: list[nn.Parameter]) -> torch.optim.Optimizer:  # the reference: torch as users build it
        if name == "sgd":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
        return torch.optim.AdamW(params, lr=0.1, weight_decay=0.01)

    def run(kinds: list[bool | None], flagged: int | None = None) -> torch.Tensor:
        param = nn.Parameter(torch.linspace(-1.0, 1.0, 6))
        state = None
        for t, (fused, grad) in enumerate(zip(kinds, grads)):
            optimizer = plain_torch([param]) if fused is None else build_optimizer(config, [param], fused=fused)
            if state is not None:
                load_optimizer_state(optimizer, state)
            if t == flagged:  # a void step first: its gradient is garbage, its flag set
                param.grad = torch.full((6,), float("nan"))
                optimizer.found_inf = torch.tensor(1.0)  # type: ignore[attr-defined]
                optimizer.step()
            if fused:
                optimizer.found_inf = torch.tensor(0.0)  # type: ignore[attr-defined]
            param.grad = grad.clone()
            optimizer.step()
            state = optimizer.state_dict()
        return param.detach()

    plain = run([None] * 6)
    torch.testing.assert_close(run([False] * 6), plain, rtol=0, atol=0)
    # The fused kernels round within an ulp or so of the loop (weight decay included).
    close = {"rtol": 1e-6, "atol": 1e-7}
    torch.testing.assert_close(run([True] * 6), plain, **close)
    torch.testing.assert_close(run([False, False, True, True, False, True]), plain, **close)
    for flagged in (0, 3):  # 0: before torch's fused SGD has made its momentum buffers
        torch.testing.assert_close(run([True] * 6, flagged), run([True] * 6), rtol=0, atol=0)


def test_a_non_finite_loss_stops_naming_the_step_under_stop(tmp_path):
    core, _, _ = _core(tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"loss is inf at global step 6 \(epoch 1, step 2\), micro-batch 3;"):
        core.admit_loss(Scored(torch.tensor(float("inf")), float("inf"), 0), 4, StepStats(), 6, ", micro-batch 3")


def test_update_policy(tmp_path):
    core, _, _ = _core(tmp_path, on_nan="skip_step")
    bad, good = torch.tensor([1.0, float("nan")]), torch.ones(2)
    assert core.admit_update(1, good, void=False, whole_model=False)
    assert not core.admit_update(1, good, void=True, whole_model=False)  # a loss was not finite somewhere
    assert not core.admit_update(1, bad, void=False, whole_model=True)  # the whole model's: skipped alike
    with pytest.raises(NonFiniteLossError, match=r"the gradient of stage 1 of global step 1 \(epoch 0, step 1\) is not"):
        core.admit_update(1, bad, void=False, whole_model=False, what="the gradient of stage 1")
    stop, _, _ = _core(tmp_path / "stop")
    with pytest.raises(NonFiniteLossError):
        stop.admit_update(1, bad, void=False, whole_model=True)


@pytest.mark.parametrize("case", ["finite", "nan", "inf", "-inf", "inf and -inf", "overflowing sum", "large piece"])
def test_all_finite_agrees_with_an_element_by_element_look(case):
    values = torch.linspace(-1.0, 1.0, 10_000)
    if case == "large piece":  # over one 4M-element piece of the exact look
        values = torch.ones(5_000_000)
        values[4_500_000] = float("nan")
    elif case == "overflowing sum":  # every element finite, their sum is not
        values = torch.full((1000,), 3.0e38)
    elif case != "finite":
        for position, text in zip((17, 9_000), case.split(" and ")):
            values[position] = float(text)
    expected = all(math.isfinite(v) for v in values.tolist())
    assert all_finite(values) is expected


# -- pipeline stages in one process ---------------------------------------------------------------

class _Handle:
    """A Dask actor handle's stand-in: a ``put_*`` call is delivered at once, with a copy of each
    tensor (as a transfer makes one), and returns a finished future."""

    def __init__(self, stage: PipelineStage) -> None:
        self.stage = stage

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.stage, name)

        def call(*args: Any) -> concurrent.futures.Future[None]:
            asyncio.run(method(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args]))
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            done.set_result(None)
            return done
        return call


def _pipeline(config: Any, val: Any = None, bounds: tuple[tuple[int, int], ...] = BOUNDS) -> list[PipelineStage]:
    """R x P stages, index ``r * P + s``, wired like the driver wires its actors."""
    splits = resolve_splits(config)
    P, R = len(bounds), config.parallel.data
    stages = [PipelineStage(StageSpec(
        run_id="t", config=config, stage=i % P, replica=i // P, bounds=bounds, dataset=splits.train,
        train_chunks=splits.train_chunks, resume_from=None, val_dataset=val,
        val_chunks=val.chunks()[i // P::R] if val is not None else (), step_timeout_s=20.0)) for i in range(R * P)]
    handles = [_Handle(s) for s in stages]
    for i, stage in enumerate(stages):
        r, s = divmod(i, P)
        stage.connect(handles[i - 1] if s > 0 else None, handles[i + 1] if s < P - 1 else None,
                      [handles[q * P + s] for q in range(R)])
    return stages


def _step(stages: list[PipelineStage], t: int, **kwargs: Any) -> list[Any]:
    """Every stage's step ``t`` (:meth:`PipelineStage.step`, the body of the actor's ``run_step``)
    at once, one thread each; a stage's error is its result."""
    with concurrent.futures.ThreadPoolExecutor(len(stages)) as pool:
        futures = [pool.submit(s.step, t, **kwargs) for s in stages]
        concurrent.futures.wait(futures, timeout=60)
        return [f.result() if f.exception() is None else f.exception() for f in futures]


def _weights(stages: list[PipelineStage]) -> dict[str, torch.Tensor]:
    return {f"{s.replica}/{k}": v for s in stages for k, v in s.state().items()}


def _pp_config(store: Path, out: Path, **train: Any) -> Any:
    return run_config(store, out, model=MLP, optimizer={"name": "adamw", "lr": 0.01},
                      train={"epochs": 1, "batch_size": 40, "shards": 2, "seed": 1, **train},
                      parallel={"pipeline": 2, "micro_batches": 2, "data": 2}, cluster={"workers": 4})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("data") / "blobs.zarr", samples=160, features=16, classes=4, chunk=20)


@pytest.mark.timeout(120)
def test_validation_after_the_update_equals_a_plain_evaluation(store, tmp_path):
    val_store = synthetic_store(tmp_path / "val.zarr", samples=70, features=16, classes=4, chunk=20, seed=5)
    stages = _pipeline(_pp_config(store, tmp_path / "run"), val=open_dataset(val_store, "inputs", "targets"))
    stats = _step(stages, 0, validate=True)
    model = build_model(MLP["factory"], MLP["kwargs"], seed=0)
    model.load_state_dict({k: v for s in stages[:2] for k, v in s.state().items()})  # replica 0's weights
    group = zarr.open_group(str(val_store), mode="r")
    x, y = torch.from_numpy(np.asarray(group["inputs"][...])), torch.from_numpy(np.asarray(group["targets"][...]))
    model.eval()
    with torch.no_grad():
        out = model(x)
    lasts = [s for s in stats if s["stage"] == 1]
    firsts = [s for s in stats if s["stage"] == 0]
    assert sum(s["val_count"] for s in lasts) == 70 and all(s["val_count"] for s in lasts)  # both replicas took part
    assert sum(s["val_loss_sum"] for s in lasts) == pytest.approx(float(loss("cross_entropy", out, y)) * 70, rel=1e-5)
    assert sum(s["val_correct"] for s in lasts) == int((out.argmax(dim=1) == y).sum())
    assert all((s["val_loss_sum"], s["val_count"], s["val_correct"]) == (0.0, 0, 0) for s in firsts)
    # The next step trains as usual: in training mode on every stage (its forward passes say so),
    # and the validation tensors did not linger in the mailboxes.
    modes: list[bool] = []
    for s in stages:
        for chunk in s.chunks:
            chunk.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    assert not any(isinstance(s, Exception) for s in _step(stages, 1))
    assert modes and all(modes), modes


@pytest.mark.timeout(120)
def test_a_non_finite_loss_under_skip_step_skips_the_update_on_every_stage_of_every_replica(store, tmp_path):
    config = _pp_config(store, tmp_path / "run", on_nan="skip_step")
    bad = int(build_plan(config, resolve_splits(config)).epoch(0).global_batch(2)[-1])  # replica 1's part of step 2
    nan_store = tmp_path / "nan.zarr"
    shutil.copytree(store, nan_store)
    inputs = zarr.open_group(str(nan_store), mode="r+")["inputs"]
    row = np.asarray(inputs[bad])
    row[3] = np.nan
    inputs[bad] = row
    stages = _pipeline(config.model_copy(update={"data": config.data.model_copy(update={"store": str(nan_store)})}))
    for t in (0, 1):
        assert not any(s["skipped"] or s["nonfinite"] for s in _step(stages, t))
    before = _weights(stages)
    stats = _step(stages, 2)
    assert all(s["skipped"] for s in stats), stats
    assert [s["nonfinite"] for s in stats] == [0, 0, 0, 1]  # seen at replica 1's last stage only
    assert sum(s["count"] for s in stats if s["stage"] == 1) == 40  # its samples are counted all the same
    after = _weights(stages)
    assert all(torch.equal(before[k], after[k]) for k in before)
    stats = _step(stages, 3)
    assert not any(s["skipped"] for s in stats)
    after = _weights(stages)
    for k in [k for k in after if k.startswith("0/")]:
        assert torch.equal(after[k], after["1/" + k[2:]])  # the replicas stay identical


class _InfiniteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


class InfiniteGradient(nn.Module):
    """The identity forward, an infinite gradient backward: finite losses, a non-finite gradient before it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _InfiniteGradient.apply(x)


def inf_grad_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), InfiniteGradient(), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.timeout(120)
def test_a_non_finite_gradient_behind_finite_losses_stops_even_under_skip_step(store, tmp_path):
    config = _pp_config(store, tmp_path / "run", on_nan="skip_step")
    config = config.model_copy(update={"model": config.model.model_copy(
        update={"factory": "tests.test_step_core:inf_grad_mlp", "kwargs": {}})})
    stats = _step(_pipeline(config, bounds=((0, 2), (2, 5))), 0)
    assert [type(s) for s in stats[1::2]] == [dict, dict]  # the last stages' own gradients are finite
    for s in stats[0::2]:
        assert isinstance(s, NonFiniteLossError)
        assert "the gradient of stage 0 (layers 0..1) of global step 0 (epoch 0, step 0) is not finite" in str(s)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("array,stage", [("inputs", 0), ("targets", 1)])
def test_a_deleted_chunk_is_named_by_the_stage_that_reads_it(store, tmp_path, array, stage):
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(store, damaged)
    chunk = damaged / array / "c" / "3"  # a file, or a folder of the chunks along the other axes
    shutil.rmtree(chunk) if chunk.is_dir() else chunk.unlink()
    config = _pp_config(damaged, tmp_path / "run")
    plan = build_plan(config, resolve_splits(config))
    # A step whose part for replica 0 (the first half of the global batch) has a sample of chunk 3.
    t = next(t for t in range(plan.steps_per_epoch)
             if (np.array_split(plan.epoch(0).global_batch(t), 2)[0] // 20 == 3).any())
    stages = _pipeline(config)
    with pytest.raises(DataError, match=rf"chunk 3 \(samples 60-80\) of array '{array}' in store .*damaged.zarr is missing"):
        stages[stage].step(t)


@pytest.mark.timeout(120)
def test_steps_submitted_ahead_run_in_step_order_whatever_order_they_arrive_in(store, tmp_path):
    """The run loop submits steps ahead and each actor call travels on its own connection: a
    stage given step 1 before step 0 must still run 0 first (the same weights as in order)."""
    config = _pp_config(store, tmp_path / "run")
    in_order = _pipeline(config)
    for t in range(3):
        assert not [r for r in _step(in_order, t) if isinstance(r, BaseException)]

    async def reversed_arrival(stage: PipelineStage) -> list[Any]:
        return await asyncio.gather(*(stage.run_step(t) for t in (2, 1, 0)))

    shuffled = _pipeline(config)
    with concurrent.futures.ThreadPoolExecutor(len(shuffled)) as pool:
        done = [pool.submit(asyncio.run, reversed_arrival(s)) for s in shuffled]
        concurrent.futures.wait(done, timeout=90)
        assert all(f.done() and f.exception() is None for f in done), [f.exception() for f in done if f.done()]
    want, got = _weights(in_order), _weights(shuffled)
    assert all(torch.equal(want[k], got[k]) for k in want)
