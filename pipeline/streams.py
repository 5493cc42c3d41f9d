"""Random streams of a training step, keyed by the data they serve, never by the worker.

Dropout (and any other randomness in a forward pass) draws from torch's global generator. If a
replica seeded it once per step and then ran its shards one after the other, the mask a sample
gets would depend on which other shards share its worker, so 1 and 4 workers would train
different models. Instead, every *forward unit* (one shard's micro-batch, or one piece of it
under ``train.accumulate``; one micro-batch of one stage in pipeline mode) reseeds the generator
from ``(seed, step, shard, piece, stage)``: the same unit draws the same numbers wherever it runs.

A worker in fast mode fuses its shards into one forward pass, which is only worker-independent
when the forward pass neither draws random numbers nor looks across samples. Models with such
layers (:func:`needs_per_shard_forward`) run one forward unit per shard in fast mode too.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd

SHARD_WISE_LAYERS: tuple[type[nn.Module], ...] = (_DropoutNd, _NormBase)
"""Layers whose training-mode output depends on the random stream or on the other samples of
the micro-batch: dropout of every kind, batch and instance norm."""


def unit_seed(seed: int, step: int, shard: int, piece: int = 0, stage: int = 0) -> int:
    """The seed of one forward unit: a hash of its key (NumPy's SeedSequence), 63 bits."""
    state = np.random.SeedSequence([seed, step, shard, piece, stage]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seed_unit(seed: int, step: int, shard: int, piece: int = 0, stage: int = 0) -> None:
    """Reseed torch's generators (CPU and, once CUDA is in use, CUDA's) for one forward unit.

    Not ``torch.manual_seed``: in a process that has not initialised CUDA (every CPU worker) it
    also queues a lazy reseed of each accelerator backend, and each of those records the
    caller's formatted stack: about a millisecond per call, once per forward unit, which was most
    of a small model's step. A process that uses CUDA has initialised it before its first forward
    unit, so its generators are reseeded here directly."""
    value = unit_seed(seed, step, shard, piece, stage)
    torch.default_generator.manual_seed(value)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(value)


def needs_per_shard_forward(model: nn.Module) -> bool:
    """Whether ``model`` has a layer whose training output depends on how samples are grouped
    or on the random stream (see :data:`SHARD_WISE_LAYERS`)."""
    return any(isinstance(m, SHARD_WISE_LAYERS) for m in model.modules())
