"""The worker-resident model replica and the Dask tasks that drive it.

Each worker holds one :class:`Replica` per run in ``_REPLICAS`` (worker-resident state, see
:mod:`dasktrain.registry`): model, optimizer, and the feed of the worker's shards. The driver
talks to it only through the module-level task functions below, each pinned to the replica's
worker. What a step does with the model (binding gradients, seeding, loss, the non-finite policy,
the optimizer step) is the worker step core's (:mod:`dasktrain.step_core`), shared with the
pipeline stages.

One step task (global step ``t``) does, in this order:

1. apply the reduced gradient of step ``t-1``: sum the root of the tree from its children
   (every replica sums the same inputs in the same order), divide by the global sample count,
   optimizer step: every replica makes the same update, so all replicas stay identical;
2. optionally validate and (on the writer) checkpoint: the weights now are those after ``t``
   updates, exactly what a resume from step ``t`` starts with;
3. compute step ``t``: forward/backward over the worker's shards' micro-batches, and return one
   flat gradient buffer per node of the worker's cover, plus loss and sample sums.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from dasktrain import rows
from dasktrain.allocator import keep_freed_memory
from dasktrain.cache import ChunkCache
from dasktrain.checkpoint import load_checkpoint, save_checkpoint
from dasktrain.config import RunConfig
from dasktrain.device import Placement
from dasktrain.errors import DasktrainError, NonFiniteLossError
from dasktrain.feed import Batch, ShardFeed, join_batches, open_reader
from dasktrain.ledger import append_entries
from dasktrain.models import build_model
from dasktrain.objective import build_optimizer, call_model, load_optimizer_state, prepare_batch
from dasktrain.plan import plan_for
from dasktrain.reduce import NodeId, Partial, ReductionTree, RootRecipe, StepStats
from dasktrain.registry import Resident, release
from dasktrain.rows import Rows
from dasktrain.running_stats import RunningStats
from dasktrain.step_core import DeviceTally, StepCore
from dasktrain.step_events import publish
from dasktrain.storage import locate
from dasktrain.store import Chunk, DatasetInfo
from dasktrain.streams import needs_per_shard_forward

log = logging.getLogger(__name__)

_REPLICAS: Resident[Replica] = Resident("replica", lambda replica: replica.close())
"""Replicas living in this worker process, by run id."""

VAL_CACHE_BYTES = 256 * 2**20
HISTORY_STEPS = 256
"""Root stats of this many applied steps stay on the replica (a few hundred bytes each)."""


class GradSink(Protocol):
    """Whatever reduces a replica's gradients while backward still runs."""

    def last_backward(self, flat: torch.Tensor) -> None:
        """The step's last backward pass is about to start, accumulating into ``flat``: each
        parameter's gradient is whole once that pass has added to it."""


@dataclass(frozen=True)
class ReplicaSpec:
    """What a worker needs to build its replica; sent once per run."""

    run_id: str
    config: RunConfig
    dataset: DatasetInfo
    train_chunks: tuple[Chunk, ...]
    shards: tuple[int, ...]
    """The contiguous block of logical shards this worker streams."""
    cover: tuple[NodeId, ...]
    """Reduction-tree nodes this worker's partial holds."""
    tree_leaves: int
    fan_in: int
    val_dataset: DatasetInfo | None
    val_chunks: tuple[Chunk, ...]
    """This worker's share of the validation chunks."""
    run_dir: str
    resume_from: str | None
    """Checkpoint directory to load, or None to start from the seeded initial weights."""
    generation: int = 0
    """The driver's worker-set generation this replica belongs to (tags ledger entries)."""
    applied: int = 0
    """Updates already applied to the starting weights (the checkpoint's step)."""


@dataclass(frozen=True)
class StepActions:
    """What one step task does besides applying the previous update."""

    compute: bool = True
    validate: bool = False
    checkpoint: dict[str, Any] | None = None
    """Metadata for the checkpoint to write after the update (writer only), or None."""


class Replica:
    """Model, optimizer and data feed of one run on one worker."""

    def __init__(self, spec: ReplicaSpec, threads: int, state: dict[str, Any] | None = None) -> None:
        self.spec = spec
        cfg = spec.config
        self.run_dir = locate(spec.run_dir, cfg.storage_options, "output_dir")
        """The run directory (a path, or a place on object storage): checkpoints and the ledger."""
        torch.set_num_threads(threads)
        keep_freed_memory()  # see pipeline/allocator.py: the step's big tensors are reused
        # The worker's own GPU when it has one (dask-cuda gives each worker one), else the CPU.
        self.place = Placement(cfg.train.precision)
        self.model = self.place.model(build_model(cfg.model, cfg.train.seed))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in self.params)
        self.running = RunningStats(self.model)
        self.width = self.numel + self.running.numel
        """Length of the flat buffer a step sums: gradients, then running-statistics updates."""
        self.shard_wise = needs_per_shard_forward(self.model)
        """Fast mode runs one forward unit per shard (not one fused pass): see pipeline/streams.py."""
        self.reads_per_segment = cfg.train.reduce == "collective" and (
            cfg.train.host_reads == "segment" or (cfg.train.host_reads == "auto" and self.place.device.type == "cuda"))
        """``train.host_reads`` for this replica's device: whether its updates are decided on the
        device and its numbers read once per collective segment (see :mod:`dasktrain.collective`)."""
        self.optimizer = build_optimizer(cfg.optimizer, self.params, fused=self.reads_per_segment)
        self.applied = spec.applied
        """Updates applied so far: the global step the next computed gradient belongs to."""
        if state is not None:  # a copy of a surviving replica, sent worker to worker
            self.model.load_state_dict(state["model"])  # load_state_dict copies onto the device
            load_optimizer_state(self.optimizer, state["optimizer"])
            self.applied = state["applied"]
        elif spec.resume_from:
            ckpt = load_checkpoint(locate(spec.resume_from, cfg.storage_options, "checkpoint"))
            self.model.load_state_dict(ckpt.model)
            load_optimizer_state(self.optimizer, ckpt.optimizer)
        self.history: dict[int, dict[str, Any]] = {}
        """Root stats of the last updates applied, for a driver that regroups before reading them."""
        self.lock = threading.Lock()
        """Held for every step and state query: a cancelled step still running finishes first."""
        self.plan = plan_for(cfg, spec.train_chunks)
        self.core = StepCore(cfg, self.params, self.optimizer, self.plan)
        self.tree = ReductionTree(spec.tree_leaves, spec.fan_in)
        cache = ChunkCache(int(cfg.data.cache_limit_gib * 2**30), self.place.device) if cfg.data.cache else None
        self.feed = ShardFeed(self.plan, open_reader(spec.dataset, cfg.data), spec.shards, cfg.train.epochs, cache)
        self._val_reader = open_reader(spec.val_dataset, cfg.data) if spec.val_dataset and spec.val_chunks else None
        self._val_cache: list[Batch] | None = None
        self._train_mode = False
        """Whether the whole model was put in training mode since the last validation: once per
        stretch of steps, not once per step (a walk over every module of a large model)."""
        self.grad_sink: GradSink | None = None
        """Told when a step's last backward pass starts (``reduce: collective`` then sums each
        bucket of gradients as soon as backward has made it: see :mod:`dasktrain.collective`)."""
        self.step_buffer: torch.Tensor | None = None
        """The one flat buffer every step accumulates into, zeroed rather than allocated again
        and bound to the parameters once: set by ``reduce: collective``, whose steps sum and use
        their buffer before the next step begins. A tree step hands its buffer to Dask as its
        result, which the next step's tasks still read, so each tree step takes a fresh one."""
        self.tally: DeviceTally | None = None
        """Set by ``reduce: collective``, which reads a step's numbers once (per step, or per
        segment): each micro-batch's loss and correct count stay on the device in it, and the
        non-finite policy is applied by the caller from its sums (:mod:`dasktrain.collective`),
        not micro-batch by micro-batch."""

    # -- the step -------------------------------------------------------------------------

    def step(self, t: int, root: RootRecipe | None, sources: list[Partial], actions: StepActions) -> Partial:
        with self.lock:
            return self._step(t, root, sources, actions)

    def _step(self, t: int, root: RootRecipe | None, sources: list[Partial], actions: StepActions) -> Partial:
        # Guard before touching state: Dask may re-run an old step to rebuild a lost result,
        # and applying an update twice would silently corrupt the replica.
        if self.applied != (t - 1 if root is not None else t):
            raise DasktrainError(f"replica out of step: asked for step {t} after {self.applied} updates")
        if root is not None:
            self._apply(t - 1, root.combine(sources))
        stats = StepStats()
        if actions.validate:
            self.validate(stats)
        if actions.checkpoint is not None:
            self.write_checkpoint(t, actions.checkpoint)
        grads: dict[NodeId, torch.Tensor] = {}
        if actions.compute:
            grads = self._compute(t, stats)
        return Partial(grads, stats)

    def _apply(self, t: int, reduced: Partial) -> None:
        """Optimizer step with the global mean gradient of step ``t``, from the tree's root."""
        assert reduced.stats is not None
        self.apply_sum(t, self.place.from_host(reduced.grads[self.tree.root]).float(), reduced.stats)

    def apply_sum(self, t: int, grad_sum: torch.Tensor, stats: StepStats, total: float | None = None) -> None:
        """Optimizer step with ``grad_sum`` (the sum over all of step ``t``'s samples, on the
        device) divided, in place, by the global sample count; refuses a non-finite one per
        ``on_nan``. ``grad_sum`` is the caller's to give up: it holds the mean afterwards.
        ``total``: the sum of ``grad_sum``'s elements, when the caller has read it already."""
        self.note_applied(t, stats)
        flat = grad_sum.div_(max(stats.count, 1))  # the caller's own buffer: no copy of the size of the model
        try:
            # Every replica sees the same root (sum and stats), so every replica decides alike.
            apply = self.core.admit_update(t, flat, void=stats.nonfinite > 0, whole_model=True, total=total)
        except NonFiniteLossError:
            self.applied = t
            raise
        if apply:
            self.core.update(t, flat)
            self.running.apply(flat[self.numel:])

    def apply_sum_unless(self, t: int, grad_sum: torch.Tensor, count: torch.Tensor, skip: torch.Tensor) -> None:
        """:meth:`apply_sum` decided on the device (``train.host_reads: segment``): ``count`` is
        the global sample count and ``skip`` whether the update is not made, both device tensors
        nobody read. The caller records the step (:meth:`note_applied`) once it has read them."""
        flat = grad_sum.div_(count.clamp(min=1))
        self.core.update(t, flat, unless=skip.float())
        self.running.apply(flat[self.numel:], unless=skip)

    def note_applied(self, t: int, stats: StepStats) -> None:
        """Step ``t`` is done (applied, or skipped under ``on_nan: skip_step``), with ``stats``."""
        self.applied = t + 1
        self.history[t] = stats.as_dict()
        # Kept for the steps a driver may not have recorded yet when it regroups: up to two
        # collective segments of LINEAGE_STEPS (64) each, with room to spare.
        self.history.pop(t - HISTORY_STEPS, None)

    def _compute(self, t: int, stats: StepStats) -> dict[NodeId, torch.Tensor]:
        """The worker's partial sums of step ``t``, as host tensors in the transfer dtype."""
        grads = self.local_grads(t, stats)
        dtype = torch.bfloat16 if self.spec.config.train.grad_transfer == "bf16" else torch.float32
        t1 = time.perf_counter()
        # Dask sends host tensors; the reduction tasks sum in fp32 whatever they receive.
        out = {node: self.place.to_host(g.to(dtype)) for node, g in grads.items()}
        stats.compute_s += time.perf_counter() - t1
        return out

    def local_grads(self, t: int, stats: StepStats) -> dict[NodeId, torch.Tensor]:
        """Forward/backward of step ``t`` over the worker's shards: fp32 sums on the device, by
        the tree node each one is (one node in fast mode, the worker's cover in deterministic mode).

        Each buffer holds the gradient sum, then the running-statistics update
        (:mod:`dasktrain.running_stats`)."""
        cfg = self.spec.config
        epoch, k = self.plan.locate(t)
        batches = self.feed.step_batches(epoch, k)
        stats.data_wait_s = self.feed.take_wait()
        stats.chunks_read = self.feed.take_reads()
        t1 = time.perf_counter()
        if not self._train_mode:
            self.model.train()
            self._train_mode = True
        if self.tally is not None:
            self.tally.clear()
        if cfg.train.ledger:
            self._record_ledger(t)
        shards = self.spec.shards
        self.running.begin_step()
        try:
            if cfg.train.deterministic:
                # One forward unit per shard, each its own leaf, summed locally with the tree's own additions.
                leaves = {s: self._grad_of([(s, b)], t, stats) for s, b in zip(shards, batches)}
                grads = {node: self.tree.sum_subtree(node, leaves) for node in self.spec.cover}
            else:
                (node,) = self.spec.cover
                units = list(zip(shards, batches)) if self.shard_wise else [(shards[0], join_batches(batches))]
                grads = {node: self._grad_of(units, t, stats)}
        finally:
            self.running.end_step()
        stats.compute_s = time.perf_counter() - t1
        return grads

    def _grad_of(self, units: list[tuple[int, Batch]], t: int, stats: StepStats) -> torch.Tensor:
        """Flat sum-of-sample gradients (and running-statistics updates) of ``units``, each a
        shard's batch taken in ``train.accumulate`` pieces; zeros when they are empty.

        Before each piece the random stream is reseeded from (seed, step, shard, piece), so a
        piece draws the same dropout masks whichever worker runs it."""
        cfg = self.spec.config
        kept = None if cfg.train.deterministic else self.step_buffer  # one buffer per step, not per leaf
        flat = kept.zero_() if kept is not None else self.place.zeros(self.width)
        self.core.bind(flat)  # backward accumulates straight into the flat buffer
        stats_segment = flat[self.numel:self.width]
        pieces_of = [min(cfg.train.accumulate, rows.count(x)) for _, (x, _) in units]
        last_unit = max((u for u, n in enumerate(pieces_of) if n), default=-1)  # the one whose last piece ends the step
        for u, (shard, (x_all, y_all)) in enumerate(units):
            size = rows.count(x_all)
            pieces = pieces_of[u]
            # One piece (no accumulation) spans the batch; more split it as evenly as rounding allows.
            bounds = (0, size) if pieces == 1 else np.linspace(0, size, pieces + 1).round().astype(int)
            for piece, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                self.core.seed(t, shard, piece)
                self.running.begin_unit()
                if self.grad_sink is not None and u == last_unit and piece == pieces - 1:
                    self.grad_sink.last_backward(flat)
                if not self._accumulate(rows.take(x_all, lo, hi), rows.take(y_all, lo, hi), t, stats):
                    # The step is void: the rest of its samples are counted all the same.
                    stats.count += size - int(hi) + sum(rows.count(x) for _, (x, _) in units[u + 1:])
                    return self.place.zeros(self.width)
                self.running.end_unit(stats_segment, int(hi - lo))
        return flat

    def _accumulate(self, x_host: Any, y_host: Any, t: int, stats: StepStats) -> bool:
        """Add one micro-batch's gradients into the bound buffer; False if its loss was not
        finite and ``on_nan`` skips the step (the samples are counted, the step is void)."""
        x, y = self._on_device(x_host, y_host, "")
        samples = rows.count(x)
        try:
            with self.place.autocast():
                out = call_model(self.model, self.spec.config.data.fields, x)
            if self.tally is not None:  # nothing read to the host: the caller judges the step's sums
                loss, pair = self.core.score_pair(out, y, x, samples)
            else:
                scored = self.core.score(out, y, x, samples)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            raise DasktrainError(
                f"forward pass failed at {self.core.where(t)} on inputs of "
                f"shape {rows.shapes(x)} and targets of shape {rows.shapes(y)}: {exc}"
            ) from None
        if self.tally is not None:
            self.tally.add(pair)
            stats.count += samples
            loss.backward()  # a non-finite loss voids or stops the step after the reduction
            return True
        if not self.core.admit_loss(scored, samples, stats, t, f" on shards {list(self.spec.shards)}"):
            return False
        scored.loss.backward()
        return True

    def _on_device(self, x_host: Rows, y_host: Rows, prefix: str) -> tuple[Any, Any]:
        """A batch on the replica's device, cast as the model and the loss take it."""
        cfg = self.spec.config
        return prepare_batch(cfg.loss, rows.apply(self.place.to_device, x_host, f"{prefix}inputs"),
                             rows.apply(self.place.to_device, y_host, f"{prefix}targets"), cfg.data.inputs_dtype)

    def _record_ledger(self, t: int) -> None:
        epoch, k = self.plan.locate(t)
        plan = self.plan.epoch(epoch)
        append_entries(self.run_dir, self.spec.run_id, [
            {"generation": self.spec.generation, "step": t, "epoch": epoch, "shard": shard,
             "samples": plan.samples_of(k, shard).tolist()} for shard in self.spec.shards])

    def export_state(self) -> dict[str, Any]:
        """A copy of weights, optimizer state and update count, for a new or lagging replica."""
        with self.lock:
            return {
                "model": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()},
                "optimizer": _to_host(copy.deepcopy(self.optimizer.state_dict())),
                "applied": self.applied,
            }

    # -- validation and checkpoints ---------------------------------------------------------

    def validate(self, stats: StepStats) -> None:
        if self._val_reader is None:
            return
        self.model.eval()
        self._train_mode = False
        with torch.no_grad():
            for x_np, y_np in self._val_batches():
                x, y = self._on_device(x_np, y_np, "val_")
                samples = rows.count(x)
                with self.place.autocast():
                    out = call_model(self.model, self.spec.config.data.fields, x)
                scored = self.core.score(out, y, x, samples)
                stats.val_loss_sum += scored.value
                stats.val_count += samples
                stats.val_correct += scored.correct
                self.core.measure(out, y, x, stats)

    def _val_batches(self) -> list[Batch]:
        if self._val_cache is not None:
            return self._val_cache
        assert self._val_reader is not None
        batches = [self._val_reader.read(c) for c in self.spec.val_chunks]
        if sum(rows.nbytes(x) + rows.nbytes(y) for x, y in batches) <= VAL_CACHE_BYTES:
            self._val_cache = batches
        return batches

    def write_checkpoint(self, t: int, meta: dict[str, Any]) -> None:
        cfg = self.spec.config
        save_checkpoint(self.run_dir, t, self.model.state_dict(), self.optimizer.state_dict(),
                        meta, keep=cfg.checkpoint.keep)

    def close(self) -> None:
        if self.feed.cache is not None:
            log.info("chunk cache of run %s: %s", self.spec.run_id, self.feed.cache.stats())
        self.feed.close()


# -- Dask tasks (module-level so workers import them by reference) ---------------------------

def create_replica(spec: ReplicaSpec, threads: int, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build this worker's replica of a run (from ``state`` when given); returns facts for the log."""
    old = _REPLICAS.pop(spec.run_id)
    if old is not None:
        with old.lock:  # let a step still running on the old replica end first
            old.close()
        release(spec.run_id)  # and what the worker kept beside it (its process group)
    replica = Replica(spec, threads, state)
    _REPLICAS.put(spec.run_id, replica)
    return {"parameters": replica.numel, "shards": list(spec.shards), "threads": torch.get_num_threads()}


def replica_applied(run_id: str) -> dict[str, Any]:
    """Updates the replica has applied (once a step it is running has ended), and their root stats."""
    replica = get_replica(run_id)
    with replica.lock:
        return {"applied": replica.applied, "history": dict(replica.history)}


def export_replica_state(run_id: str) -> dict[str, Any]:
    """The replica's full training state (a Dask task; its result goes worker to worker)."""
    return get_replica(run_id).export_state()


def save_replica_checkpoint(run_id: str, meta: dict[str, Any]) -> str:
    """Checkpoint the replica as it is now (used before stopping on too few workers)."""
    replica = get_replica(run_id)
    with replica.lock:
        replica.write_checkpoint(replica.applied, meta)
    return replica.spec.run_dir


def _to_host(value: Any) -> Any:
    """Optimizer state with every tensor on the CPU (load_state_dict moves it back to the params' device)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_host(v) for v in value]
    return value


def get_replica(run_id: str) -> Replica:
    """This worker's replica of ``run_id``; a clear error when it holds none."""
    return _REPLICAS.get(run_id)


def run_step(run_id: str, t: int, root: RootRecipe | None, sources: list[Partial], actions: StepActions) -> Partial:
    """One step of the replica of ``run_id`` on this worker (see the module docstring); ``root``
    says how to sum the previous step's gradient from ``sources`` (none: nothing to apply)."""
    replica = get_replica(run_id)
    partial = replica.step(t, root, sources, actions)
    assert partial.stats is not None
    publish(run_id, replica.spec.generation, t, actions.compute, partial.stats)  # the driver's numbers
    return partial


def replica_state(run_id: str) -> dict[str, torch.Tensor]:
    """The replica's model weights, fetched once at the end of a run."""
    return {k: v.detach().to("cpu", copy=True) for k, v in get_replica(run_id).model.state_dict().items()}


def drop_replica(run_id: str) -> bool:
    """Free a run's replica (``Client.run`` on every worker, in the driver's ``finally``)."""
    replica = _REPLICAS.pop(run_id)
    if replica is not None:
        replica.close()
    release(run_id)  # what the worker kept beside it (its process group)
    return replica is not None
