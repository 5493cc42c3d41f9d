"""The data-parallel policy for running statistics (BatchNorm's ``running_mean``/``running_var``).

A single process updates a BatchNorm layer's running statistics once per forward pass. Replicas
each see only their shards, so left alone every replica would hold different statistics, and
which ones a checkpoint saves would depend on the worker count. The policy here:

- every forward unit (one shard's micro-batch, see :mod:`dasktrain.streams`) starts from the
  statistics the step started with, and contributes ``n * (after - before)``, its update
  weighted by its sample count ``n``;
- those contributions ride at the end of the flat gradient buffer, so the reduction tree (or the
  all-reduce) sums them with the gradients, in the same order;
- the apply step divides by the global sample count like the gradient and adds the result to
  the statistics: every replica makes the same change, for any worker count (bitwise in
  deterministic mode, where the tree's order is fixed over the shards).

The step's change is thus the sample-weighted mean of the shards' updates: with momentum ``m``,
``running = (1 - m) * running + m * mean over shards of the shard's batch statistic``, weighted by
shard size. ``num_batches_tracked`` grows by one per step. Only buffers of normalisation layers
that track running statistics are handled; other buffers are left as the model keeps them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase


def tracked_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Running-statistics buffers of ``model``, in module order."""
    found: list[torch.Tensor] = []
    for module in model.modules():
        if isinstance(module, _NormBase) and module.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buffer = getattr(module, name, None)
                if isinstance(buffer, torch.Tensor):
                    found.append(buffer)
    return found


class RunningStats:
    """The tracked buffers of one replica's model, as a segment of the flat gradient buffer."""

    def __init__(self, model: nn.Module) -> None:
        self.buffers = tracked_buffers(model)
        self.sizes = [b.numel() for b in self.buffers]
        self.numel = sum(self.sizes)
        self._start: torch.Tensor | None = None

    def begin_step(self) -> None:
        """Remember the statistics the step starts with: every forward unit starts from them."""
        if self.numel:
            self._start = self._flat()

    def begin_unit(self) -> None:
        """Put the step's starting statistics back before a forward unit."""
        if self._start is not None:
            self._load(self._start)

    def end_unit(self, segment: torch.Tensor, samples: int) -> None:
        """Add the unit's update, weighted by its ``samples``, into ``segment`` (its part of the
        flat gradient buffer)."""
        if self._start is not None:
            segment.add_(self._flat() - self._start, alpha=samples)

    def end_step(self) -> None:
        """Leave the statistics as the step found them: the update arrives with the reduced sum."""
        if self._start is not None:
            self._load(self._start)
            self._start = None

    def apply(self, mean_update: torch.Tensor, unless: torch.Tensor | None = None) -> None:
        """Add the reduced, sample-weighted mean update (the flat buffer's segment / count);
        not where ``unless`` (a boolean on the device) is set: the update decided there."""
        if self.numel:
            current = self._flat()
            self._load(current + mean_update if unless is None else torch.where(unless, current, current + mean_update))

    def _flat(self) -> torch.Tensor:
        return torch.cat([b.detach().reshape(-1).to(torch.float32) for b in self.buffers])

    def _load(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            for buffer, part in zip(self.buffers, flat.split(self.sizes)):
                value = part.view_as(buffer)
                buffer.copy_(value.round() if not buffer.is_floating_point() else value)
