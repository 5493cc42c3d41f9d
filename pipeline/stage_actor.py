"""One pipeline stage: a Dask actor pinned to a worker, holding its layers and their optimizer.

How a step flows, and why it cannot deadlock
--------------------------------------------
The driver makes one call per stage per step, ``run_step(t)``, on every stage at once. Each
stage then runs its own list of operations (its *schedule*: ``F j`` forward of micro-batch
``j``, ``B j`` its backward) on the worker's single actor thread. Data moves by **push**, never
by a blocking call into a neighbour:

- after ``F j`` a stage sends its output to the next stage's ``put_activation``;
- after ``B j`` it sends the gradient of its input to the previous stage's ``put_grad``;
- with R replicas, after the last ``B`` (or ``W``) it sends its gradient buffer up the
  replicas' reduction tree (``put_peer_grad``), and the sum comes back down it (``put_root``).

The ``put_*`` methods are ``async``: Dask runs them on the receiving worker's event loop, not on
its actor thread, so they complete (store the tensor in a mailbox, wake the waiter) while that
stage is busy computing or waiting. The sender does not wait for them until the end of its
step. The only blocking wait is a stage waiting on its *own* mailbox for an input that an
earlier operation of a neighbour produces. Each schedule (:mod:`dasktrain.schedules`: GPipe,
1F1B, interleaved 1F1B, ZB-H1) is a pure function listing every rank's actions; its tests run
the lists against these cross-stage dependencies and find no cycle of waits, and one executor
(:meth:`PipelineStage._run_schedule`) runs whichever the config names. With ``v`` virtual stages
(interleaved 1F1B) a rank holds ``v`` chunks of layers and activations go round the ranks ``v``
times, so rank ``P - 1`` sends to rank 0 too. Tensors travel worker to worker; the driver gets a
dict of a dozen numbers per stage.

ZB-H1 splits the backward: ``B`` takes the gradient of the chunk's input only
(``torch.autograd.grad`` with ``inputs`` the input, keeping the graph), which the previous stage
is waiting for, and ``W`` later the gradient of the chunk's weights (``backward`` with ``inputs``
the parameters), in the time the rank would otherwise wait. The two give the same gradients as
one backward; ``W`` recomputes the chain of activation gradients inside the chunk.

With R replicas, a stage's gradient buffers are summed across the replicas by a tree of fan-in
``train.fan_in`` (the shape of :class:`dasktrain.reduce.ReductionTree`): each node is summed by
the replica of its first leaf, in child order, and the root, made at replica 0, goes back down
the same tree, so every replica applies the same bits, and each sends and receives at most
``fan_in`` buffers per level instead of ``R - 1``.

Every wait has a deadline (``StageSpec.step_timeout_s``) and ``abort`` (also ``async``) wakes
any waiter, so a lost neighbour turns into an error, never a hang.

What a stage does with its layers (binding gradients, seeding, loss, the non-finite policy, the
optimizer step) is the worker step core's (:mod:`dasktrain.step_core`), shared with the
data-parallel replicas. A stage computes on its worker's device (its GPU, else the CPU); tensors
travel between stages as host tensors, copied off the device before a ``put_*`` and onto it after
a take.

A non-finite loss under ``train.on_nan: skip_step`` is seen at the last stage of one replica, but
the update must be skipped by every stage of every replica, or the stages' parts would drift
apart. So the decision travels with the messages a step sends anyway: each gradient sent back
carries a *void* flag (set from the micro-batch whose loss was not finite on), so every stage of
that replica has it once its last backward is done; and each stage's gradient buffer sent to its
peers carries it too, so the same stage of every replica ends with the same flag, as it ends with
the same sum. A reduced gradient that is not finite while no loss was raises, under both policies.

With ``validate``, after the update the stages run a forward-only pass over their replica's
validation chunks, one micro-batch per chunk, through the same push mailboxes under their own key.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors

from dasktrain.allocator import TRIM_THRESHOLD, keep_freed_memory
from dasktrain.checkpoint import fsync_dir, join_optimizer_state, split_optimizer_state, write_file_atomic
from dasktrain.config import RunConfig
from dasktrain.device import Placement
from dasktrain.errors import CheckpointError, ClusterError, DasktrainError
from dasktrain.feed import StepRows, open_reader
from dasktrain.objective import build_optimizer, cast_inputs, load_optimizer_state, prepare_batch
from dasktrain.plan import SamplingPlan, plan_for
from dasktrain.reduce import ReductionTree, StepStats, default_fan_in, sum_in_order
from dasktrain.schedules import Action, actions, splits_backward
from dasktrain.stages import build_stage, full_key, local_key
from dasktrain.step_core import StepCore
from dasktrain.store import Chunk, DatasetInfo

log = logging.getLogger(__name__)

MAILBOX_TIMEOUT_S = 300.0
"""Longest a stage waits for a neighbour's tensor before it gives up on the step, unless the
spec sets ``step_timeout_s``."""
SWITCH_INTERVAL_S = 0.0005
"""The stage worker's GIL switch interval (Python's default: 5 ms)."""
VAL_CACHE_BYTES = 256 * 2**20
"""Validation rows a stage keeps between validations (read again beyond this)."""

@functools.cache
def rank_actions(kind: str, stages: int, micro_batches: int, virtual: int, rank: int) -> tuple[Action, ...]:
    """Rank ``rank``'s actions of a step (schedules are pure: computed once per shape)."""
    return tuple(actions(kind, stages, micro_batches, virtual)[rank])


def tree_routes(replicas: int, fan_in: int, replica: int) -> tuple[list[int], int | None]:
    """Where ``replica`` stands in the reduction tree over ``replicas`` leaves: the replicas whose
    partial sums it adds to its own (in child order, itself first), and the replica it sends its
    sum to (None at the root, replica 0). The root goes back down the same edges."""
    tree = ReductionTree(replicas, fan_in)
    children: list[int] = []
    level = 0
    while level + 1 < len(tree.widths):
        parent = (level + 1, replica // fan_in ** (level + 1))
        owner = tree.span(parent)[0]
        if owner != replica:
            return children, owner
        children += [tree.span(c)[0] for c in tree.children(parent)[1:]]
        level += 1
    return children, None


def step_slices(plan: SamplingPlan, t: int, replicas: int, replica: int, micro_batches: int,
                multiple_of: int = 1) -> tuple[np.ndarray, list[slice], int]:
    """Store indices of ``replica``'s part of global step ``t``, its micro-batch slices, and the global count.

    The global batch is the data-parallel plan's, split into ``replicas`` contiguous parts, each
    into at most ``micro_batches`` contiguous micro-batches (fewer on a short last batch, then a
    multiple of ``multiple_of``: interleaved 1F1B sends them round the workers in groups of P).
    """
    epoch, k = plan.locate(t)
    batch = plan.epoch(epoch).global_batch(k)
    part = np.array_split(batch, replicas)[replica]
    m = min(micro_batches, len(part))
    if m % multiple_of:
        if m < multiple_of:
            raise DasktrainError(f"global step {t} gives pipeline replica {replica} {len(part)} samples, fewer "
                                 f"than the {multiple_of} micro-batches parallel.schedule: interleaved-1f1b needs")
        m -= m % multiple_of
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
    val_dataset: DatasetInfo | None = None
    """The store the validation chunks are in (None: no validation)."""
    val_chunks: tuple[Chunk, ...] = ()
    """The validation chunks this pipeline replica evaluates (every stage of it gets the same)."""
    step_timeout_s: float | None = None
    """Longest a mailbox wait for a neighbour's tensor may take; None: :data:`MAILBOX_TIMEOUT_S`."""
    start_step: int = 0
    """The first global step this stage runs (the step of ``resume_from``): steps run in order from it."""


class StageAborted(ClusterError):
    """The driver aborted this stage (a neighbour was lost); its step was not applied."""


Key = tuple[str, int, int, int]
"""A mailbox slot: (kind, global step, micro-batch or replica, receiving virtual stage); kinds
are ``act``, ``grad``, ``peer`` and ``root`` of training, ``val`` of validation, so the two never mix."""
Message = tuple[torch.Tensor, bool]
"""A tensor and its void flag: a loss of the step was not finite (``skip_step``), see the module docstring."""
NOTHING = torch.zeros(0)
"""What a stage sends back for a micro-batch of a void step: no gradient is needed."""


@dataclass
class _Pass:
    """What a step's schedule left behind: the pushes still in flight, whether the step is void
    (a loss was not finite under ``skip_step``), and its timings."""

    sent: list[Any] = field(default_factory=list)
    void: bool = False
    busy_s: float = 0.0
    """Seconds of compute, never of waiting."""
    start: float = 0.0
    """Wall-clock time of the first operation's start, and of the last one's end."""
    end: float = 0.0
    max_alive: int = 0
    """Most micro-batch activations held at once (1F1B: at most P - stage; GPipe: m)."""
    op_s: dict[str, float] = field(default_factory=lambda: {"F": 0.0, "B": 0.0, "W": 0.0})
    """Seconds spent in each kind of action (for the schedule's bound with measured costs)."""


class PipelineStage:
    """The actor: layers ``bounds[stage]`` of the model, their optimizer, and the mailboxes."""

    def __init__(self, spec: StageSpec) -> None:
        self.spec = spec
        cfg = spec.config
        torch.set_num_threads(spec.threads)
        # A neighbour's tensor is taken in by the worker's event loop while this stage's thread
        # computes: hand the GIL over sooner than Python's 5 ms, or each hop may wait for it.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.stage, self.replica = spec.stage, spec.replica
        self.stages = cfg.parallel.pipeline
        """Ranks P; the model is cut into ``len(spec.bounds) = P * v`` virtual stages."""
        self.virtual = len(spec.bounds) // self.stages
        # Rank r holds chunks c = 0..v-1, virtual stage c * P + r: the first rank reads the
        # inputs (virtual stage 0), the last the targets (virtual stage P v - 1).
        self.first, self.last = self.stage == 0, self.stage == self.stages - 1
        self.bounds = [spec.bounds[c * self.stages + self.stage] for c in range(self.virtual)]
        # The worker's own GPU when it has one, else the CPU; fp32 (the config refuses the rest).
        self.place = Placement("fp32")
        # Only this stage's layers are ever allocated, with the whole model's initial values.
        self.chunks = [self.place.model(build_stage(cfg, lo, hi)) for lo, hi in self.bounds]
        self.module = torch.nn.ModuleList(self.chunks)
        """This worker's layers: its chunks, in order (``train()``/``eval()`` reach them all)."""
        self.chunk_params = [[p for p in chunk.parameters() if p.requires_grad] for chunk in self.chunks]
        params = [p for ps in self.chunk_params for p in ps]
        if 4 * 4 * sum(p.numel() for p in params) <= TRIM_THRESHOLD:
            # A small stage keeps freed memory for the next step (see pipeline/allocator.py). A large
            # one (weights, gradients, two optimizer moments beyond that) hands it back at once:
            # its memory, not a few percent of speed, is why the model is cut into stages.
            keep_freed_memory()
        self.plan = plan_for(cfg, spec.train_chunks)
        self.core = StepCore(cfg, params, build_optimizer(cfg.optimizer, params) if params else None, self.plan)
        self.flat = self.place.zeros(self.core.numel)
        """This stage's gradient sum of a step: backward of every micro-batch adds into it."""
        if spec.resume_from:
            self._load(Path(spec.resume_from))
        self.timeout_s = spec.step_timeout_s or MAILBOX_TIMEOUT_S
        # Only the ends of the pipeline touch the store: inputs at the first, targets at the last.
        # They read as every consumer does (missing chunks named, data.normalize applied).
        reader = open_reader(spec.dataset, cfg.data) if self.first or self.last else None
        self.inputs = StepRows(reader, "inputs") if reader is not None and self.first else None
        self.targets = StepRows(reader, "targets") if reader is not None and self.last else None
        self._val_reader = (open_reader(spec.val_dataset, cfg.data)
                            if spec.val_dataset is not None and spec.val_chunks and (self.first or self.last) else None)
        self._val_cache: dict[int, np.ndarray] = {}
        self._val_cached = 0
        self._train_mode = False
        """Whether the layers were put in training mode since the last validation: once per
        stretch of steps, not every step (a walk over every module of the stage)."""
        self.prev: Any = None
        self.next: Any = None
        self.peers: list[Any] = []
        self._box: dict[Key, Message] = {}
        self._cond = threading.Condition()
        self._aborted: str | None = None
        self._next_step = spec.start_step
        """The step whose ``run_step`` runs next: calls run one at a time, in step order."""
        self._turn = asyncio.Condition()
        self._compute = ThreadPoolExecutor(1, thread_name_prefix=f"stage-{self.stage}-r{self.replica}")
        """The thread steps run on; the worker's event loop stays free for the mailboxes."""

    # -- wiring and mailboxes (async: they run on the worker's event loop, never blocked) ----

    def connect(self, prev: Any, next_: Any, peers: list[Any]) -> int:
        """Handles of the neighbouring stages and of this stage in the other replicas."""
        self.prev, self.next, self.peers = prev, next_, peers
        return self.stage

    async def put_activation(self, t: int, j: int, x: torch.Tensor, vs: int) -> None:
        self._put(("act", t, j, vs), (x, False))

    async def put_grad(self, t: int, j: int, g: torch.Tensor, void: bool, vs: int) -> None:
        self._put(("grad", t, j, vs), (g, void))

    async def put_peer_grad(self, t: int, replica: int, flat: torch.Tensor, void: bool = False) -> None:
        self._put(("peer", t, replica, 0), (flat, void))

    async def put_root(self, t: int, flat: torch.Tensor, void: bool = False) -> None:
        self._put(("root", t, 0, 0), (flat, void))

    async def put_val_activation(self, t: int, j: int, x: torch.Tensor, vs: int) -> None:
        self._put(("val", t, j, vs), (x, False))

    async def abort(self, reason: str) -> None:
        with self._cond:
            self._aborted = reason
            self._cond.notify_all()
        async with self._turn:  # steps waiting for their turn give up too
            self._turn.notify_all()

    def _put(self, key: Key, value: Message) -> None:
        with self._cond:
            self._box[key] = value
            self._cond.notify_all()

    def _take(self, key: Key) -> Message:
        """The message for ``key`` as sent (a host tensor); waits for it up to the step timeout."""
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while key not in self._box:
                if self._aborted is not None:
                    raise StageAborted(f"stage {self.stage} (replica {self.replica}) aborted: {self._aborted}")
                left = deadline - time.monotonic()
                if left <= 0:
                    what, t, j, vs = key
                    source = {"act": "activation from virtual stage", "grad": "gradient from virtual stage",
                              "peer": "gradient buffer from replica", "root": "reduced gradient from replica",
                              "val": "validation activation from virtual stage"}[what]
                    other = {"act": vs - 1, "grad": vs + 1, "peer": j, "root": "above", "val": vs - 1}[what]
                    raise ClusterError(
                        f"stage {self.stage} (replica {self.replica}) waited {self.timeout_s:.0f} s at "
                        f"global step {t} for the {source} {other} (micro-batch {j}); is that worker alive?"
                    )
                self._cond.wait(min(left, 1.0))
            return self._box.pop(key)

    # -- the step ----------------------------------------------------------------------------

    async def run_step(self, t: int, save_to: str | None = None, validate: bool = False) -> dict[str, Any]:
        """Global step ``t`` (see :meth:`step`), once step ``t - 1`` has run here.

        The run loop submits steps ahead, and each call travels on a connection of its own, so
        step ``t + 1`` may arrive before step ``t``: calls wait on the event loop for their turn
        and run on this stage's compute thread, one at a time, in step order. A failed step
        stops the ones behind it (their stage is not where they expect it)."""
        async with self._turn:
            await self._turn.wait_for(lambda: self._next_step >= t or self._aborted is not None)
        if self._aborted is not None:
            raise StageAborted(f"stage {self.stage} (replica {self.replica}) was aborted: {self._aborted}")
        if self._next_step != t:
            raise DasktrainError(f"stage {self.stage} (replica {self.replica}) asked for global step {t} "
                                 f"after it ran step {self._next_step - 1}")
        try:
            # With this call's context: the worker it runs on, which the neighbours' actor handles need.
            context = contextvars.copy_context()
            result: dict[str, Any] = await asyncio.get_running_loop().run_in_executor(
                self._compute, functools.partial(context.run, self.step, t, save_to, validate))
            return result
        except BaseException:
            with self._cond:
                self._aborted = self._aborted or f"its global step {t} failed"
            raise
        finally:
            async with self._turn:
                self._next_step = t + 1
                self._turn.notify_all()

    def step(self, t: int, save_to: str | None = None, validate: bool = False) -> dict[str, Any]:
        """Run this stage's schedule of global step ``t``, then its optimizer step; then, with
        ``validate``, the forward-only pass over this replica's validation chunks, and with
        ``save_to``, write this stage's part of the checkpoint there.

        Returns small stats: ``stage``, ``replica``, ``loss_sum``, ``count``, ``correct`` and
        ``nonfinite`` (micro-batches whose loss was not finite; the last stage's, 0 elsewhere),
        ``val_loss_sum``, ``val_count``, ``val_correct`` (the last stage's, 0 elsewhere),
        ``skipped`` (this stage skipped its update), ``data_wait_s``, ``chunks_read``,
        ``busy_s`` (= ``compute_s``), ``micro_batches``, ``start``, ``end``, ``max_alive``.
        """
        if self._aborted is not None:
            raise StageAborted(f"stage {self.stage} (replica {self.replica}) was aborted: {self._aborted}")
        par = self.spec.config.parallel
        with self._cond:  # leftovers of a failed earlier step
            for key in [k for k in self._box if k[1] < t]:
                del self._box[key]
        part, slices, count = step_slices(self.plan, t, par.data, self.replica, par.micro_batches,
                                          self.stages if par.schedule == "interleaved-1f1b" else 1)
        stats = StepStats()
        wait0 = time.perf_counter()
        x_all = self.inputs.take(part) if self.inputs is not None else None
        y_all = self.targets.take(part) if self.targets is not None else None
        stats.data_wait_s = time.perf_counter() - wait0
        stats.chunks_read = sum(rows.take_reads() for rows in (self.inputs, self.targets) if rows is not None)
        run = self._run_schedule(t, x_all, y_all, slices, stats)
        total, void = self._reduce_across_replicas(t, run.sent, run.void)
        # In place: the sum is this step's alone (pushes landed, ``flat`` is zeroed next step), and a
        # copy would cost another buffer of the stage's size, a model too big for one worker's share.
        mean = total.div_(max(count, 1))
        # Every replica's stage sees the same sum and the same void flag: all of them decide alike.
        apply = self.core.admit_update(t, mean, void=void, whole_model=False,
                                       what=f"the gradient of stage {self.stage} ({self._layers()})")
        if apply and self.core.optimizer is not None:
            self.core.update(t, mean)
        if validate:
            self._validate(t, stats)
        if save_to is not None:
            self._save(Path(save_to))
        stats.compute_s = run.busy_s
        return {"stage": self.stage, "replica": self.replica, **stats.as_dict(), "busy_s": run.busy_s,
                "start": run.start, "end": run.end, "max_alive": run.max_alive, "micro_batches": len(slices),
                "op_s": run.op_s, "skipped": not apply}

    def _layers(self, chunk: int | None = None) -> str:
        """The layers of one chunk (or all of this rank's), as errors name them."""
        picked = self.bounds if chunk is None else [self.bounds[chunk]]
        return "layers " + ", ".join(f"{lo}..{hi - 1}" for lo, hi in picked)

    def _run_schedule(self, t: int, x_all: np.ndarray | None, y_all: np.ndarray | None, slices: list[slice],
                      stats: StepStats) -> _Pass:
        """This rank's actions of step ``t`` in schedule order, gradients summed into
        ``self.flat``; the step is void when a loss was not finite under ``skip_step``, here or
        (learnt from the gradients sent back) at a later stage."""
        par = self.spec.config.parallel
        P, last_vs = self.stages, self.stages * self.virtual - 1
        split = splits_backward(par.schedule)
        self.flat.zero_()
        self.core.bind(self.flat)  # backward accumulates every micro-batch straight into it
        if not self._train_mode:
            self.module.train()
            self._train_mode = True
        run = _Pass(start=time.time(), end=time.time())
        alive: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}
        """(micro-batch, chunk) -> its input, output and (split backward) the output's gradient."""
        first_op = True
        for kind, j, c in rank_actions(par.schedule, P, len(slices), self.virtual, self.stage):
            vs = c * P + self.stage
            # Wait for this action's input first: busy time counts compute only, never waiting.
            if kind == "F":
                x = self._input_of(t, j, vs, x_all, slices)
            elif kind == "B" and vs != last_vs:
                g_host, flagged = self._take(("grad", t, j, vs))
                run.void = run.void or flagged
            t0 = time.perf_counter()
            if first_op:
                run.start, first_op = time.time(), False
            if kind == "F":
                # Dropout masks keyed by (step, micro-batch of the whole batch, stage): see pipeline/streams.py.
                self.core.seed(t, self.replica * par.micro_batches + j, stage=vs)
                out = self._forward(t, j, c, vs == last_vs, x, y_all, slices, stats)
                run.void = run.void or out is None
                alive[(j, c)] = (x, out, None)
                run.max_alive = max(run.max_alive, len(alive))
                if vs != last_vs:
                    assert out is not None
                    run.sent.append(self.next.put_activation(t, j, self.place.to_host(out.detach()), vs + 1))
            elif kind == "B":
                x, out, _ = alive[(j, c)] if split else alive.pop((j, c))
                g = None if vs == last_vs or run.void else self.place.from_host(g_host)
                gx = None
                # A void step is not updated anywhere: its backward is not worth running.
                if not run.void and out is not None and out.requires_grad:
                    if not split:
                        torch.autograd.backward(out, g)
                        gx = x.grad
                    elif x.requires_grad:
                        (gx,) = torch.autograd.grad(out, [x], g, retain_graph=True, allow_unused=True)
                    if split:
                        alive[(j, c)] = (x, out, g)
                if vs > 0:
                    # The void flag travels down with the gradients: every stage of this replica learns it.
                    sent = NOTHING if run.void else self.place.to_host(gx if gx is not None else torch.zeros_like(x))
                    run.sent.append(self.prev.put_grad(t, j, sent, run.void, vs - 1))
            else:
                _, out, g = alive.pop((j, c))
                if not run.void and out is not None and out.requires_grad and self.chunk_params[c]:
                    torch.autograd.backward(out, g, inputs=self.chunk_params[c])
            spent = time.perf_counter() - t0
            run.op_s[kind] += spent
            run.busy_s += spent
            run.end = time.time()
        return run

    def _input_of(self, t: int, j: int, vs: int, x_all: np.ndarray | None, slices: list[slice]) -> torch.Tensor:
        if vs == 0:
            assert x_all is not None
            return cast_inputs(self.spec.config.data.inputs_dtype, self.place.to_device(x_all[slices[j]], "inputs"))
        # The activation pushed by the previous stage; a leaf here, so backward fills its .grad.
        x, _ = self._take(("act", t, j, vs))
        return self.place.from_host(x).requires_grad_(True)

    def _forward(self, t: int, j: int, c: int, last: bool, x: torch.Tensor, y_all: np.ndarray | None,
                 slices: list[slice], stats: StepStats) -> torch.Tensor | None:
        """Chunk ``c``'s layers on micro-batch ``j``; at the last virtual stage, the loss sum, or
        None when it is not finite under ``skip_step`` (``stop`` raises, naming the step)."""
        try:
            out = self.chunks[c](x)
            if not last:
                return out
            assert y_all is not None
            out, y = prepare_batch(self.spec.config.loss, out, self.place.to_device(y_all[slices[j]], "targets"))
            scored = self.core.score(out, y)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise DasktrainError(
                f"stage {self.stage} ({self._layers(c)}) failed at global step {t}, "
                f"micro-batch {j}, on inputs of shape {tuple(x.shape)}: {exc}"
            ) from None
        if not self.core.admit_loss(scored, len(y), stats, t, f", micro-batch {j}"):
            return None
        return scored.loss

    def _reduce_across_replicas(self, t: int, sent: list[Any], void: bool) -> tuple[torch.Tensor, bool]:
        """Sum of this stage's gradient buffers over all replicas by the reduction tree (see the
        module docstring): the same bits at every replica, and whether any replica's step was
        void (then all of them skip the update)."""
        replicas = len(self.peers)
        if replicas <= 1:
            for future in sent:
                future.result(timeout=self.timeout_s)
            return self.flat, void
        fan_in = self.spec.config.train.fan_in or default_fan_in(replicas)
        children, parent = tree_routes(replicas, fan_in, self.replica)
        parts = [self.flat]
        for child in children:
            theirs, flagged = self._take(("peer", t, child, 0))
            void = void or flagged
            parts.append(self.place.from_host(theirs))
        total = sum_in_order(parts) if children else self.flat
        if parent is not None:
            sent.append(self.peers[parent].put_peer_grad(t, self.replica, self.place.to_host(total), void))
            root, void = self._take(("root", t, 0, 0))
            total = self.place.from_host(root)
        host = self.place.to_host(total)
        for child in children:
            sent.append(self.peers[child].put_root(t, host, void))
        # Our pushes must have landed before the buffers they read are reused.
        for future in sent:
            future.result(timeout=self.timeout_s)
        return total, void

    # -- validation --------------------------------------------------------------------------

    def _validate(self, t: int, stats: StepStats) -> None:
        """Forward-only pass of the weights after step ``t`` over this replica's validation
        chunks, one micro-batch per chunk flowing stage to stage as in training (mailbox kind
        ``val``); the last stage adds the loss sums into ``stats``."""
        chunks = self.spec.val_chunks if self.spec.val_dataset is not None else ()
        sent: list[Any] = []
        self.module.eval()
        self._train_mode = False  # the next step puts the layers back in training mode
        with torch.no_grad():
            # Each rank in (validation chunk, virtual stage) order: every input comes from an
            # earlier pair, so the ranks cannot wait on each other in a cycle.
            for j, chunk in enumerate(chunks):
                for c in range(self.virtual):
                    sent += self._validate_one(t, j, c, chunk, stats)
        for future in sent:
            future.result(timeout=self.timeout_s)

    def _validate_one(self, t: int, j: int, c: int, chunk: Chunk, stats: StepStats) -> list[Any]:
        """Validation chunk ``j`` through this rank's chunk ``c``: sent on, or scored at the end."""
        vs = c * self.stages + self.stage
        last = vs == self.stages * self.virtual - 1
        if vs == 0:
            x = cast_inputs(self.spec.config.data.inputs_dtype, self.place.to_device(self._val_rows(chunk), "val_inputs"))
        else:
            x = self.place.from_host(self._take(("val", t, j, vs))[0])
        try:
            out = self.chunks[c](x)
            if not last:
                return [self.next.put_val_activation(t, j, self.place.to_host(out), vs + 1)]
            out, y = prepare_batch(self.spec.config.loss, out, self.place.to_device(self._val_rows(chunk), "val_targets"))
            scored = self.core.score(out, y)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise DasktrainError(
                f"stage {self.stage} ({self._layers(c)}) failed validating after global "
                f"step {t}, on validation chunk {chunk.index} (inputs of shape {tuple(x.shape)}): {exc}"
            ) from None
        stats.val_loss_sum += scored.value
        stats.val_count += len(y)
        stats.val_correct += scored.correct
        return []

    def _val_rows(self, chunk: Chunk) -> np.ndarray:
        """This stage's array of a validation chunk (inputs at the first, targets at the last);
        kept between validations while they fit in :data:`VAL_CACHE_BYTES`."""
        if chunk.index in self._val_cache:
            return self._val_cache[chunk.index]
        assert self._val_reader is not None
        rows = self._val_reader.read_inputs(chunk) if self.first else self._val_reader.read_targets(chunk)
        if self._val_cached + rows.nbytes <= VAL_CACHE_BYTES:
            self._val_cache[chunk.index] = rows
            self._val_cached += rows.nbytes
        return rows

    # -- state and checkpoints ---------------------------------------------------------------

    def state(self) -> dict[str, torch.Tensor]:
        """This stage's weights under the full model's key names, on the host (fetched once, at the
        end). Not copied on a CPU worker: Dask sends them from the tensors' own memory."""
        return {full_key(lo, k): v.detach().cpu()
                for (lo, _), chunk in zip(self.bounds, self.chunks) for k, v in chunk.state_dict().items()}

    def _save(self, directory: Path) -> None:
        name = f"stage-{self.stage}"
        optimizer = self.core.optimizer
        opt_tensors, opt_rest = split_optimizer_state(optimizer.state_dict()) if optimizer else ({}, {})
        # Streamed from the tensors themselves: a stage of a model too big for one worker has no
        # room for a second copy of its weights or optimizer state as a file's bytes.
        weights = {full_key(lo, k): v.detach().cpu().contiguous()
                   for (lo, _), chunk in zip(self.bounds, self.chunks) for k, v in chunk.state_dict().items()}
        write_tensors_atomic(directory / f"{name}.model.safetensors", weights)
        write_tensors_atomic(directory / f"{name}.optimizer.safetensors", opt_tensors)
        write_file_atomic(directory / f"{name}.json", json.dumps({"optimizer": opt_rest}).encode())

    def _load(self, directory: Path) -> None:
        name = f"stage-{self.stage}"
        try:
            model = load_tensors((directory / f"{name}.model.safetensors").read_bytes())
            opt_tensors = load_tensors((directory / f"{name}.optimizer.safetensors").read_bytes())
            opt_rest = json.loads((directory / f"{name}.json").read_text())["optimizer"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {directory}: part of stage {self.stage} is unreadable: {exc}") from None
        # load_state_dict copies onto the parameters' device (the optimizer's state too).
        for (lo, hi), chunk in zip(self.bounds, self.chunks):
            chunk.load_state_dict({local_key(lo, k): v for k, v in model.items() if lo <= int(k.partition(".")[0]) < hi})
        if self.core.optimizer is not None:
            load_optimizer_state(self.core.optimizer, join_optimizer_state(opt_tensors, opt_rest))


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def write_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` (on the host) as a safetensors file, atomically (temporary name, fsync,
    rename), streaming each tensor's own memory to the file: no copy of them is made, where
    ``safetensors.torch.save`` builds the whole file in memory first (twice the state at peak)."""
    header: dict[str, Any] = {}
    offset = 0
    for key in sorted(tensors):
        t = tensors[key]
        size = t.numel() * t.element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(len(head).to_bytes(8, "little"))
        fh.write(head)
        for key in sorted(tensors):
            t = tensors[key].contiguous()
            if t.numel():
                fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
