"""The worker step core: what a data-parallel replica and a pipeline stage do alike in a step.

A replica holds the whole model, a pipeline stage a contiguous part of its layers; either way one
training step on a worker is made of the same pieces, kept here so the two cannot drift apart:

- the parameters' ``.grad`` are views into one flat fp32 buffer, so backward accumulates every
  micro-batch straight into the buffer that is then summed across workers (no copy per step);
- before each forward unit the random stream is reseeded from what the unit *is* (step, shard
  or micro-batch, piece, stage), never from where it runs (see :mod:`dasktrain.streams`);
- the loss is a sum over samples, with its correct count (see :mod:`dasktrain.objective`), so
  dividing the summed gradient by the global sample count gives the global batch's mean;
- the non-finite policy (``train.on_nan``): ``stop`` raises :class:`NonFiniteLossError` naming
  the step; ``skip_step`` counts the micro-batch and voids the step, whose update is then skipped
  by every worker alike;
- gradient clipping by global norm (``train.clip_grad_norm``), of the reduced mean gradient;
- the optimizer step with the scheduled learning rate of the step's gradient.

What stays with the caller: where the data comes from, how micro-batches are scheduled, and how
gradients are summed across workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dasktrain.config import RunConfig, metric_name
from dasktrain.errors import NonFiniteLossError
from dasktrain.models import resolve_callable
from dasktrain.objective import batch_loss, batch_view, lr_at, metric_sums
from dasktrain.plan import SamplingPlan
from dasktrain.reduce import StepStats
from dasktrain.streams import seed_unit


@dataclass(frozen=True)
class Scored:
    """One micro-batch's loss: the tensor backward starts from, its value, and the correct count
    (per sample: 1 or 0 for a class label, the share of positions right for a sequence)."""

    loss: torch.Tensor
    value: float
    correct: float


class StepCore:
    """The trainable parameters of one worker's model (or model part), their optimizer, and the
    run's sampling plan (for the learning-rate schedule and for naming steps in errors)."""

    def __init__(self, config: RunConfig, params: list[nn.Parameter], optimizer: torch.optim.Optimizer | None,
                 plan: SamplingPlan) -> None:
        self.config = config
        self.params = params
        self.sizes = [p.numel() for p in params]
        self.numel = sum(self.sizes)
        """Gradient entries at the head of a flat buffer (a replica appends running statistics)."""
        self.bound: torch.Tensor | None = None
        """The buffer the parameters' gradients were last made views of (:meth:`bind`)."""
        self.optimizer = optimizer
        """None for a part without trainable parameters (a pipeline stage of activations only)."""
        self.plan = plan
        self.loss_fn = resolve_callable(config.loss, "loss") if ":" in config.loss else None
        """A ``loss: module:callable``, imported once; None for the named losses."""
        self.metric_fns = [(metric_name(path), path, resolve_callable(path, "metrics")) for path in config.metrics]
        """The run's own metrics (``metrics``): reported name, path, callable."""

    def where(self, t: int) -> str:
        """Global step ``t`` as errors name it, with its epoch and step within the epoch."""
        epoch, k = self.plan.locate(t)
        return f"global step {t} (epoch {epoch}, step {k})"

    def bind(self, flat: torch.Tensor) -> None:
        """Make every parameter's ``.grad`` a view into the head of ``flat``: backward then adds
        into the buffer the workers sum, and the optimizer reads the reduced one in place.

        A buffer bound already (one that serves every step) is not bound again: a view per
        parameter per step is Python work a plain loop does not do, and grows with the number
        of parameters. "Already" is by memory, not by tensor object: a collective step binds its
        buffer for backward, then a slice of it (a new object, the same memory) for the update.
        The gradients' views keep that memory alive, so no other buffer can take its address.
        Should anything have replaced the gradients since (``zero_grad()`` sets them to None),
        they are bound again."""
        bound = self.bound
        if bound is not None and flat.data_ptr() == bound.data_ptr() and flat.device == bound.device:
            first = self.params[0].grad if self.params else bound
            if first is not None and first.data_ptr() == bound.data_ptr():
                return
        for p, view in zip(self.params, flat[: self.numel].split(self.sizes)):
            p.grad = view.view_as(p)
        self.bound = flat

    def seed(self, t: int, unit: int, piece: int = 0, stage: int = 0) -> None:
        """Reseed the random stream for one forward unit of step ``t``: a shard (data parallel) or
        a micro-batch of the global batch (pipeline), a piece of it, the stage that runs it."""
        seed_unit(self.config.train.seed, t, unit, piece, stage)

    def score(self, out: Any, y: Any, inputs: Any = None, samples: int = 0) -> Scored:
        """Loss sum and correct count of model outputs ``out`` for a batch of ``samples`` samples
        (``inputs``, targets ``y``) under the configured ``loss``: a built-in one on the output (or
        its logits) against ``y``; ``model``, the output's own loss, a mean over the batch, times
        ``samples``; ``module:callable``, the sum of its per-sample losses. Only cross-entropy
        counts correct predictions."""
        loss, correct = batch_loss(self.config.loss, self.loss_fn, self.config.data.fields, out, inputs, y, samples)
        return Scored(loss, float(loss.detach()), float(correct))

    def score_pair(self, out: Any, y: Any, inputs: Any, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`score` without reading anything to the host: the loss backward starts from, and
        the detached ``(loss, correct)`` pair for a :class:`DeviceTally`."""
        loss, correct = batch_loss(self.config.loss, self.loss_fn, self.config.data.fields, out, inputs, y, samples)
        return loss, torch.stack((loss.detach().float(), correct.float()))

    def measure(self, out: Any, y: Any, inputs: Any, stats: StepStats) -> None:
        """Add one validation batch's ``(sum, count)`` of every metric of the run to ``stats``."""
        if not self.metric_fns:
            return
        batch = batch_view(self.config.data.fields, inputs, y)
        for name, path, fn in self.metric_fns:
            stats.add_metric(name, *metric_sums(path, fn, out, batch))

    def admit_loss(self, scored: Scored, samples: int, stats: StepStats, t: int, detail: str = "") -> bool:
        """Count one micro-batch of step ``t`` into ``stats`` under ``train.on_nan``.

        True: its loss is finite and counted; backward may start from it. False (``skip_step``):
        it is not, the samples and ``nonfinite`` are counted but not the loss; the caller voids
        the step (no backward from it, no update). ``stop`` raises :class:`NonFiniteLossError`
        naming the step (``detail`` adds where in it, e.g. the shards or the micro-batch).
        """
        if math.isfinite(scored.value):
            stats.loss_sum += scored.value
            stats.count += samples
            stats.correct += scored.correct
            return True
        if self.config.train.on_nan == "skip_step":
            stats.nonfinite += 1
            stats.count += samples
            return False
        raise NonFiniteLossError(f"loss is {scored.value} at {self.where(t)}{detail}; the update was not applied")

    def admit_update(self, t: int, mean: torch.Tensor, *, void: bool, whole_model: bool,
                     what: str = "the gradient", total: float | None = None) -> bool:
        """Whether the update of step ``t`` with the reduced gradient ``mean`` is made.

        ``void``: a loss of the step was not finite somewhere (counted under ``skip_step``): every
        worker learns it with the reduced step and skips alike. Otherwise a non-finite ``mean``
        is skipped under ``skip_step`` only when it is the ``whole_model``'s gradient, which every
        replica sees alike; a pipeline stage holds one part of the model, and skipping one part
        while the others update would diverge silently, so it raises, as ``stop`` always does.
        ``total``: the sum of ``mean``'s elements (or of the buffer it was divided from), when the
        caller read it already, with other numbers of the step.
        """
        if void:
            return False
        if all_finite(mean, total):
            return True
        if whole_model and self.config.train.on_nan == "skip_step":
            return False
        raise NonFiniteLossError(f"{what} of {self.where(t)} is not finite; the update was not applied")

    def update(self, t: int, mean: torch.Tensor, unless: torch.Tensor | None = None) -> None:
        """Optimizer step with ``mean``, the global mean gradient of step ``t`` (on the
        parameters' device), at the learning rate the schedule gives step ``t``.

        ``unless``: a float flag on the device, for a fused optimizer (its ``found_inf``): where
        it is not zero, parameters and optimizer state stay as they are, decided without a host read.

        With ``train.clip_grad_norm``, ``mean``'s gradient entries are first scaled in place to at
        most that global L2 norm. Clipping the reduced gradient, not each worker's part, makes the
        update the same for any worker count; the norm spans only this core's parameters, which is
        why the config refuses clipping with pipeline stages."""
        assert self.optimizer is not None, "a part without parameters has nothing to update"
        self.bind(mean)
        clip = self.config.train.clip_grad_norm
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, clip, norm_type=2.0)
        lr = lr_at(self.config, t, self.plan.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if unless is not None:
            self.optimizer.found_inf = unless  # type: ignore[attr-defined]  # read by torch's fused step
        self.optimizer.step()


def all_finite(values: torch.Tensor, total: float | None = None) -> bool:
    """Whether every element of ``values`` is finite: one reduction and one number read.

    A sum is finite only if every term is (NaN and infinity survive any addition), so a finite
    sum settles it with one pass over memory and no temporary. Only a sum that is not finite, a
    non-finite element or an overflow of large finite ones, is looked at element by element (in
    pieces: a whole-buffer ``isfinite`` takes a temporary as large as the buffer). The
    element-wise check alone cost about 3 ms per step for a 1.9M-parameter MLP on one CPU core,
    35 times the sum. ``total``, when given, is that sum, read already."""
    if math.isfinite(float(values.sum()) if total is None else total):
        return True
    return all(bool(torch.isfinite(piece).all()) for piece in values.split(1 << 22))


class DeviceTally:
    """A step's loss numbers, kept on the device until the step's numbers are read.

    :meth:`StepCore.score` reads each micro-batch's loss and correct count to the host, which on
    a GPU waits for the device: twice per micro-batch, every step. A replica that reads its
    step's numbers once anyway (``reduce: collective``: with the reduced gradient's, per step or
    per segment) adds the pairs on the device instead, into ``sums`` (a view into the buffer it
    reduces): one addition per micro-batch. A non-finite loss makes the loss sum non-finite,
    which is all the common path needs to know; only then does :meth:`exact` read the pairs, to
    count as :meth:`StepCore.admit_loss` would (the finite micro-batches' numbers, and how many
    were not). Read once per segment, :meth:`settle` counts so on the device, every step."""

    def __init__(self, sums: torch.Tensor | None) -> None:
        self.sums = sums
        """``(loss sum, correct)`` of the step's micro-batches so far, on the device; None when
        only :meth:`settle` sums them (once per step, masked), so no addition is made twice."""
        self.pairs: list[torch.Tensor] = []
        """Each micro-batch's ``(loss, correct)`` this step, in order."""

    def clear(self) -> None:
        if self.sums is not None:
            self.sums.zero_()
        self.pairs = []

    def add(self, pair: torch.Tensor) -> None:
        self.pairs.append(pair)
        if self.sums is not None:
            self.sums.add_(pair)

    def exact(self) -> tuple[float, float, int]:
        """The step's ``(loss sum, correct, non-finite count)``, read to the host pair by pair:
        a non-finite micro-batch adds to the count only, as under :meth:`StepCore.admit_loss`."""
        loss_sum, correct, nonfinite = 0.0, 0.0, 0
        for loss, right in self._read():
            if math.isfinite(loss):
                loss_sum, correct = loss_sum + loss, correct + right
            else:
                nonfinite += 1
        return loss_sum, correct, nonfinite

    def settle(self, into: torch.Tensor, first: torch.Tensor) -> None:
        """Write the step's ``(finite loss sum, correct, non-finite count)`` into ``into``, and the
        first non-finite loss (or 0) into ``first``: what :meth:`exact` and
        :meth:`first_nonfinite` say, kept on the device (``train.host_reads: segment``)."""
        if not self.pairs:
            into.zero_()
            first.zero_()
            return
        pairs = torch.stack(self.pairs)
        bad = ~torch.isfinite(pairs[:, 0])
        into[:2] = torch.where(bad.unsqueeze(1), 0.0, pairs).sum(0)
        into[2] = bad.sum()
        # The first non-finite one by argmax and gather: indexing by a tensor could read it to the host.
        at = bad.int().argmax().reshape(1)
        first.copy_(torch.where(bad.any(), pairs[:, 0].gather(0, at).squeeze(0), 0.0))

    def first_nonfinite(self) -> tuple[float, float] | None:
        """The first non-finite micro-batch's ``(loss, correct)``; None when every loss was finite."""
        return next(((loss, right) for loss, right in self._read() if not math.isfinite(loss)), None)

    def _read(self) -> list[list[float]]:
        return torch.stack(self.pairs).tolist() if self.pairs else []
