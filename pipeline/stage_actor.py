"""One pipeline stage: a Dask actor pinned to a worker, holding its layers and their optimizer.

How a step flows, and why it cannot deadlock
--------------------------------------------
The driver makes one call per stage per step, ``run_step(t)``, on every stage at once. Each
stage then runs its own list of operations (its *schedule*: ``F j`` forward of micro-batch
``j``, ``B j`` its backward) on the worker's single actor thread. Data moves by **push**, never
by a blocking call into a neighbour:

- after ``F j`` a stage sends its output to the next stage's ``put_activation``;
- after ``B j`` it sends the gradient of its input to the previous stage's ``put_grad``;
- with R replicas, after the last ``B`` it sends its gradient buffer to the same stage of every
  other replica's ``put_peer_grad``.

The ``put_*`` methods are ``async``: Dask runs them on the receiving worker's event loop, not on
its actor thread, so they complete (store the tensor in a mailbox, wake the waiter) while that
stage is busy computing or waiting. The sender does not wait for them until the end of its
step. The only blocking wait is a stage waiting on its *own* mailbox for an input that an
earlier operation of a neighbour produces; GPipe and 1F1B order each stage's operations so that
every such input is produced by an operation that does not itself wait on the waiter (forward
inputs come from lower stages, backward inputs from higher ones, and both schedules run each
stage's operations in micro-batch order), so there is no cycle of waits. Tensors travel worker
to worker; the driver gets a dict of a dozen numbers per stage.

Every wait has a deadline and ``abort`` (also ``async``) wakes any waiter, so a lost neighbour
turns into an error, never a hang.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from safetensors.torch import load as load_tensors
from safetensors.torch import save as dump_tensors

from dasktrain.allocator import keep_freed_memory
from dasktrain.checkpoint import join_optimizer_state, split_optimizer_state, write_file_atomic
from dasktrain.config import RunConfig
from dasktrain.errors import CheckpointError, ClusterError, DasktrainError, DataError, NonFiniteLossError
from dasktrain.normalize import Normalization, read_normalization
from dasktrain.objective import build_optimizer, correct_count, loss_sum, lr_at, prepare_batch
from dasktrain.plan import SamplingPlan
from dasktrain.preflight import plan_for
from dasktrain.reduce import sum_in_order
from dasktrain.stages import build_layers, full_key, local_key, stage_module
from dasktrain.store import Chunk, DatasetInfo
from dasktrain.streams import seed_unit

log = logging.getLogger(__name__)

MAILBOX_TIMEOUT_S = 300.0
"""Longest a stage waits for a neighbour's tensor before it gives up on the step."""

Op = tuple[str, int]  # ("F" | "B", micro-batch)


def schedule(kind: str, stage: int, stages: int, micro_batches: int) -> list[Op]:
    """The operations of ``stage`` in one step, in order.

    GPipe: every forward, then every backward (a stage holds all ``m`` activations at once).
    1F1B: ``P - 1 - stage`` warm-up forwards, then one forward and one backward in turn, then
    the remaining backwards: at most ``P - stage`` activations alive.
    """
    m = micro_batches
    if kind == "gpipe":
        return [("F", j) for j in range(m)] + [("B", j) for j in range(m)]
    warm = min(stages - 1 - stage, m)
    ops: list[Op] = [("F", j) for j in range(warm)]
    for j in range(m - warm):
        ops += [("F", warm + j), ("B", j)]
    ops += [("B", j) for j in range(m - warm, m)]
    return ops


def step_slices(plan: SamplingPlan, t: int, replicas: int, replica: int, micro_batches: int) -> tuple[np.ndarray, list[slice], int]:
    """Store indices of ``replica``'s part of global step ``t``, its micro-batch slices, and the global count.

    The global batch is the data-parallel plan's, split into ``replicas`` contiguous parts, each
    into at most ``micro_batches`` contiguous micro-batches (fewer on a short last batch).
    """
    epoch, k = plan.locate(t)
    batch = plan.epoch(epoch).global_batch(k)
    part = np.array_split(batch, replicas)[replica]
    m = min(micro_batches, len(part))
    edges = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(len(part)), m)]) if m else [0]
    return part, [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])], len(batch)


@dataclass(frozen=True)
class StageSpec:
    """What a worker needs to build one stage; sent once, with the actor's creation."""

    run_id: str
    config: RunConfig
    stage: int
    replica: int
    bounds: tuple[tuple[int, int], ...]
    """Layers of every stage (this one is ``bounds[stage]``)."""
    dataset: DatasetInfo
    train_chunks: tuple[Chunk, ...]
    resume_from: str | None
    """Checkpoint directory holding this stage's part, or None for the seeded initial weights."""
    threads: int = 1


class StageAborted(ClusterError):
    """The driver aborted this stage (a neighbour was lost); its step was not applied."""


class PipelineStage:
    """The actor: layers ``bounds[stage]`` of the model, their optimizer, and the mailboxes."""

    def __init__(self, spec: StageSpec) -> None:
        self.spec = spec
        cfg = spec.config
        torch.set_num_threads(spec.threads)
        keep_freed_memory()  # see pipeline/allocator.py
        self.stage, self.replica = spec.stage, spec.replica
        self.stages = len(spec.bounds)
        self.first, self.last = self.stage == 0, self.stage == self.stages - 1
        self.lo, self.hi = spec.bounds[self.stage]
        layers, _ = build_layers(cfg)
        self.module = stage_module(layers, self.lo, self.hi)
        del layers  # the other stages' layers are not ours to keep
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.sizes = [p.numel() for p in self.params]
        self.flat = torch.zeros(sum(self.sizes))
        self.optimizer = build_optimizer(cfg.optimizer, self.params) if self.params else None
        if spec.resume_from:
            self._load(Path(spec.resume_from))
        self.plan = plan_for(cfg, spec.train_chunks)
        # Only the ends of the pipeline touch the store: inputs at the first, targets at the last.
        norm = read_normalization(cfg.data.store, cfg.data.inputs) if self.first and cfg.data.normalize else None
        self.inputs = _Samples(spec.dataset, spec.dataset.inputs.name, norm) if self.first else None
        self.targets = _Samples(spec.dataset, spec.dataset.targets.name) if self.last else None
        self.prev: Any = None
        self.next: Any = None
        self.peers: list[Any] = []
        self._box: dict[tuple[str, int, int], torch.Tensor] = {}
        self._cond = threading.Condition()
        self._aborted: str | None = None
        self.max_alive = 0
        """Most micro-batch activations this stage held at once, over the run (1F1B <= P, GPipe m)."""

    # -- wiring and mailboxes (async: they run on the worker's event loop, never blocked) ----

    def connect(self, prev: Any, next_: Any, peers: list[Any]) -> int:
        """Handles of the neighbouring stages and of this stage in the other replicas."""
        self.prev, self.next, self.peers = prev, next_, peers
        return self.stage

    async def put_activation(self, t: int, j: int, x: torch.Tensor) -> None:
        self._put(("act", t, j), x)

    async def put_grad(self, t: int, j: int, g: torch.Tensor) -> None:
        self._put(("grad", t, j), g)

    async def put_peer_grad(self, t: int, replica: int, flat: torch.Tensor) -> None:
        self._put(("peer", t, replica), flat)

    async def abort(self, reason: str) -> None:
        with self._cond:
            self._aborted = reason
            self._cond.notify_all()

    def _put(self, key: tuple[str, int, int], value: torch.Tensor) -> None:
        with self._cond:
            self._box[key] = value
            self._cond.notify_all()

    def _take(self, key: tuple[str, int, int]) -> torch.Tensor:
        deadline = time.monotonic() + MAILBOX_TIMEOUT_S
        with self._cond:
            while key not in self._box:
                if self._aborted is not None:
                    raise StageAborted(f"stage {self.stage} (replica {self.replica}) aborted: {self._aborted}")
                left = deadline - time.monotonic()
                if left <= 0:
                    what, t, j = key
                    source = {"act": "activation from stage", "grad": "gradient from stage",
                              "peer": "gradient buffer from replica"}[what]
                    other = {"act": self.stage - 1, "grad": self.stage + 1, "peer": j}[what]
                    raise ClusterError(
                        f"stage {self.stage} (replica {self.replica}) waited {MAILBOX_TIMEOUT_S:.0f} s at "
                        f"global step {t} for the {source} {other} (micro-batch {j}); is that worker alive?"
                    )
                self._cond.wait(min(left, 1.0))
            return self._box.pop(key)

    # -- the step ----------------------------------------------------------------------------

    def run_step(self, t: int, save_to: str | None = None) -> dict[str, Any]:
        """Run this stage's schedule of global step ``t``, then its optimizer step; small stats back."""
        if self._aborted is not None:
            raise StageAborted(f"stage {self.stage} (replica {self.replica}) was aborted: {self._aborted}")
        cfg = self.spec.config
        par = cfg.parallel
        with self._cond:  # leftovers of a failed earlier step
            for key in [k for k in self._box if k[1] < t]:
                del self._box[key]
        part, slices, count = step_slices(self.plan, t, par.data, self.replica, par.micro_batches)
        wait0 = time.perf_counter()
        x_all = self.inputs.take(part) if self.inputs is not None else None
        y_all = self.targets.take(part) if self.targets is not None else None
        stats: dict[str, Any] = {"stage": self.stage, "replica": self.replica, "loss_sum": 0.0, "count": 0,
                                 "correct": 0, "data_wait_s": time.perf_counter() - wait0, "busy_s": 0.0,
                                 "micro_batches": len(slices)}
        self.flat.zero_()
        self._bind_grads(self.flat)  # backward accumulates every micro-batch straight into it
        self.module.train()
        sent: list[Any] = []
        alive: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        peak = 0
        start = end = time.time()
        first_op = True
        for op, j in schedule(par.schedule, self.stage, self.stages, len(slices)):
            # Wait for this op's input first: busy time counts compute only, never waiting.
            if op == "F":
                x = self._input_of(t, j, x_all, slices)
            grad = None if op == "F" or self.last else self._take(("grad", t, j))
            t0 = time.perf_counter()
            if first_op:
                start, first_op = time.time(), False
            if op == "F":
                # Dropout masks keyed by (step, micro-batch of the whole batch, stage): see pipeline/streams.py.
                seed_unit(cfg.train.seed, t, self.replica * par.micro_batches + j, stage=self.stage)
                out = self._forward(t, j, x, y_all, slices, stats)
                alive[j] = (x, out)
                peak = max(peak, len(alive))
                if not self.last:
                    sent.append(self.next.put_activation(t, j, out.detach()))
            else:
                x, out = alive.pop(j)
                if out.requires_grad:
                    torch.autograd.backward(out, grad)
                if not self.first:
                    g = x.grad if x.grad is not None else torch.zeros_like(x)
                    sent.append(self.prev.put_grad(t, j, g))
            stats["busy_s"] += time.perf_counter() - t0
            end = time.time()
        stats.update(start=start, end=end, max_alive=peak)
        self.max_alive = max(self.max_alive, peak)
        total = self._reduce_across_replicas(t, sent)
        self._apply(t, total, count)
        if save_to is not None:
            self._save(Path(save_to))
        return stats

    def _input_of(self, t: int, j: int, x_all: np.ndarray | None, slices: list[slice]) -> torch.Tensor:
        if self.first:
            assert x_all is not None
            return torch.from_numpy(x_all[slices[j]]).to(torch.get_default_dtype())
        # The activation pushed by the previous stage; a leaf here, so backward fills its .grad.
        return self._take(("act", t, j)).requires_grad_(True)

    def _forward(self, t: int, j: int, x: torch.Tensor, y_all: np.ndarray | None,
                 slices: list[slice], stats: dict[str, Any]) -> torch.Tensor:
        try:
            out = self.module(x)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise DasktrainError(
                f"stage {self.stage} (layers {self.lo}..{self.hi - 1}) failed at global step {t}, "
                f"micro-batch {j}, on inputs of shape {tuple(x.shape)}: {exc}"
            ) from None
        if not self.last:
            return out
        assert y_all is not None
        kind = self.spec.config.loss
        out, y = prepare_batch(kind, out, torch.from_numpy(y_all[slices[j]]))
        loss = loss_sum(kind, out, y)
        value = float(loss.detach())
        if not np.isfinite(value):
            epoch, k = self.plan.locate(t)
            raise NonFiniteLossError(
                f"loss is {value} at global step {t} (epoch {epoch}, step {k}), micro-batch {j}; "
                "the update was not applied"
            )
        stats["loss_sum"] += value
        stats["count"] += len(y)
        stats["correct"] += correct_count(kind, out.detach(), y)
        return loss

    def _reduce_across_replicas(self, t: int, sent: list[Any]) -> torch.Tensor:
        """Sum of this stage's gradient buffers over all replicas, in replica order (same bits everywhere)."""
        if len(self.peers) > 1:
            for r, peer in enumerate(self.peers):
                if r != self.replica:
                    sent.append(peer.put_peer_grad(t, self.replica, self.flat))
        # Our pushes must have landed before the buffers they read are reused.
        for future in sent:
            future.result(timeout=MAILBOX_TIMEOUT_S)
        if len(self.peers) <= 1:
            return self.flat
        parts = [self.flat if r == self.replica else self._take(("peer", t, r)) for r in range(len(self.peers))]
        return sum_in_order(parts)

    def _apply(self, t: int, total: torch.Tensor, count: int) -> None:
        """Optimizer step with the global mean gradient of step ``t`` (loss sums / global count)."""
        if self.optimizer is None or count == 0:
            return
        grad = total / count
        if not bool(torch.isfinite(grad).all()):
            raise NonFiniteLossError(
                f"the gradient of stage {self.stage} at global step {t} is not finite; the update was not applied"
            )
        self._bind_grads(grad)
        lr = lr_at(self.spec.config, t, self.plan.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()

    def _bind_grads(self, flat: torch.Tensor) -> None:
        for p, view in zip(self.params, flat.split(self.sizes)):
            p.grad = view.view_as(p)

    # -- state and checkpoints ---------------------------------------------------------------

    def state(self) -> dict[str, torch.Tensor]:
        """This stage's weights under the full model's key names (fetched once, at the end)."""
        return {full_key(self.lo, k): v.detach().clone() for k, v in self.module.state_dict().items()}

    def info(self) -> dict[str, Any]:
        return {"stage": self.stage, "replica": self.replica, "layers": [self.lo, self.hi],
                "parameters": int(self.flat.numel()), "max_alive": self.max_alive}

    def _save(self, directory: Path) -> None:
        name = f"stage-{self.stage}"
        opt_tensors, opt_rest = split_optimizer_state(self.optimizer.state_dict()) if self.optimizer else ({}, {})
        write_file_atomic(directory / f"{name}.model.safetensors", dump_tensors(
            {k: v.contiguous() for k, v in self.state().items()}))
        write_file_atomic(directory / f"{name}.optimizer.safetensors", dump_tensors(opt_tensors))
        write_file_atomic(directory / f"{name}.json", json.dumps({"optimizer": opt_rest}).encode())

    def _load(self, directory: Path) -> None:
        name = f"stage-{self.stage}"
        try:
            model = load_tensors((directory / f"{name}.model.safetensors").read_bytes())
            opt_tensors = load_tensors((directory / f"{name}.optimizer.safetensors").read_bytes())
            opt_rest = json.loads((directory / f"{name}.json").read_text())["optimizer"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {directory}: part of stage {self.stage} is unreadable: {exc}") from None
        self.module.load_state_dict({local_key(self.lo, k): v for k, v in model.items()})
        if self.optimizer is not None:
            self.optimizer.load_state_dict(join_optimizer_state(opt_tensors, opt_rest))


class _Samples:
    """Rows of one store array by sample index, read chunk-aligned; keeps the last step's chunks."""

    def __init__(self, info: DatasetInfo, name: str, normalization: Normalization | None = None) -> None:
        self.info = info
        self.normalization = normalization
        """``data.normalize``: applied to every chunk as read, exactly as the data-parallel readers do."""
        array = zarr.open_group(info.path, mode="r")[name]
        assert isinstance(array, zarr.Array)  # open_dataset checked it
        self.array = array
        self.size = info.chunk_size
        self._cache: dict[int, np.ndarray] = {}

    def take(self, indices: np.ndarray) -> np.ndarray:
        which = indices // self.size
        needed = [int(c) for c in np.unique(which)]
        # A shard's window spans consecutive steps: keep what this step needs, drop the rest.
        self._cache = {c: self._cache[c] if c in self._cache else self._read(c) for c in needed}
        dtype = np.float32 if self.normalization is not None else self.array.dtype
        out = np.empty((len(indices), *self.array.shape[1:]), dtype=dtype)
        for c in needed:
            mask = which == c
            out[mask] = self._cache[c][indices[mask] - c * self.size]
        return out

    def _read(self, c: int) -> np.ndarray:
        start, stop = c * self.size, min((c + 1) * self.size, self.info.samples)
        try:
            data = np.asarray(self.array[start:stop])
        except Exception as exc:
            raise DataError(
                f"cannot read chunk {c} (samples {start}-{stop}) of array '{self.array.basename}' in store "
                f"{self.info.path}: {type(exc).__name__}: {exc}"
            ) from None
        return self.normalization.apply(data) if self.normalization is not None else data
