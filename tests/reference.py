"""A plain single-process PyTorch loop: the yardstick every parallel mode is tested against.

It shares no code with what it checks: nothing here is imported from ``dasktrain`` (the ``pipeline/`` folder). The built-in
models are rebuilt layer by layer (same layer order, so ``torch.manual_seed(seed)`` gives the same
initial weights), the optimizer comes from ``torch.optim`` directly, the learning rate from the
documented schedule, the loss from plain torch calls. A run config is read by attribute only
(``config.optimizer.lr``, ...). The global batches (sample indices per global step) are the
caller's: a test takes them from the public plan API, or passes the whole training set for an
order-free check.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def mlp(in_features: int, out_features: int, hidden: Sequence[int] = (128,), activation: str = "relu",
        dropout: float = 0.0, batch_norm: bool = False) -> nn.Sequential:
    """``dasktrain.models:mlp`` rebuilt: Flatten, then per hidden width Linear, (BatchNorm1d),
    activation, then Linear."""
    if dropout:
        # Dropout masks in a run are drawn per (seed, step, shard); this loop cannot replay them.
        raise NotImplementedError("the reference loop does not reproduce dropout; use dropout: 0")
    widths = [in_features, *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for width_in, width_out in zip(widths, widths[1:]):
        layers.append(nn.Linear(width_in, width_out))
        if batch_norm:
            layers.append(nn.BatchNorm1d(width_out))
        layers.append(_ACTIVATIONS[activation]())
    layers.append(nn.Linear(widths[-1], out_features))
    return nn.Sequential(*layers)


def cnn(in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
        channels: Sequence[int] = (64, 64, 128, 128), hidden: int = 256, batch_norm: bool = False) -> nn.Sequential:
    """``dasktrain.models:cnn`` rebuilt: 3x3 convolutions (bias-free, then BatchNorm2d, with
    ``batch_norm``) with ReLU, a 2x2 max-pool after every second one, then Flatten, Linear, ReLU, Linear."""
    widths = [in_channels, *channels]
    layers: list[nn.Module] = []
    size = image_size
    for i, (width_in, width_out) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Conv2d(width_in, width_out, kernel_size=3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width_out))
        layers.append(nn.ReLU())
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(2))
            size //= 2
    layers += [nn.Flatten(), nn.Linear(widths[-1] * size * size, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


BUILT_INS = {"dasktrain.models:mlp": mlp, "dasktrain.models:cnn": cnn}


def build_model(factory: str, kwargs: Mapping[str, Any], seed: int) -> nn.Module:
    """The model a config names, its initial weights drawn right after ``torch.manual_seed(seed)``.

    Built-ins are the rebuilds above; any other ``module:callable`` (a test helper) is imported
    directly, which must not be a ``dasktrain`` module.
    """
    make: Any
    if factory in BUILT_INS:
        make = BUILT_INS[factory]
    else:
        module_name, _, attr = factory.partition(":")
        if module_name.split(".")[0] == "dasktrain":
            raise NotImplementedError(f"no independent rebuild of {factory}")
        make = importlib.import_module(module_name)
        for part in attr.split("."):
            make = getattr(make, part)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make(**kwargs)


def build_optimizer(config: Any, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    """``config.name`` sgd (``momentum``, ``nesterov``), adam or adamw, straight from torch.optim."""
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                               weight_decay=config.weight_decay, foreach=False)
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                                weight_decay=config.weight_decay, foreach=False)
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                                 weight_decay=config.weight_decay, foreach=False)
    raise ValueError(f"unknown optimizer {config.name!r}")


def learning_rate(schedule: str, peak: float, step: int, total_steps: int, warmup_steps: int = 0,
                  min_lr: float = 0.0) -> float:
    """The documented schedule: the learning rate of the update made with the gradient of ``step``.

    ``constant``: ``peak``. ``warmup_cosine``: ``peak * (step + 1) / warmup_steps`` while
    ``step < warmup_steps``; after that a half cosine from ``peak`` (at ``step == warmup_steps``) down
    to ``min_lr`` at the last step, ``total_steps - 1``.
    """
    if schedule == "constant":
        return peak
    if schedule != "warmup_cosine":
        raise ValueError(f"unknown schedule {schedule!r}")
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps  # steps from the peak to the last step
    fraction = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (peak - min_lr) * (1.0 + math.cos(math.pi * fraction)) / 2.0


def loss(kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch: cross-entropy, or MSE averaged over each sample's elements first."""
    if kind == "cross_entropy":
        return F.cross_entropy(output, target.long())
    if kind == "mse":
        squared = (output - target.to(output.dtype)) ** 2
        return squared.reshape(len(squared), -1).mean(dim=1).mean()
    raise ValueError(f"unknown loss {kind!r}")


def reference_weights(config: Any, batches: Sequence[np.ndarray | Sequence[np.ndarray] | None],
                      total_steps: int | None = None, clip: float | None = None,
                      grad_norms: list[float] | None = None,
                      step_numbers: list[tuple[float, int]] | None = None) -> dict[str, torch.Tensor]:
    """Weights after one optimizer step per entry of ``batches``, with the learning rate of a run of
    ``total_steps`` steps (default: ``len(batches)``).

    ``clip``: before each step, scale the global batch's mean gradient to at most this L2 norm over
    all parameters (``torch.nn.utils.clip_grad_norm_``); each step's norm before clipping is
    appended to ``grad_norms`` when given. ``step_numbers``, when given, gets each applied step's
    mean loss over its global batch and, for cross-entropy, how many of its samples the model
    (before the step's update) classified right.

    An entry is the store sample indices of that global batch, run as one forward pass; or a list of
    index arrays, one forward pass each (the shards' micro-batches), for models with batch
    normalisation, under the documented policy for running statistics: every micro-batch starts
    from the step's statistics, the step adds the sample-weighted mean of their updates, and
    ``num_batches_tracked`` grows by one per step. An entry of None is a step whose update was
    skipped (``on_nan: skip_step``): no update, but it still counts in the learning-rate schedule.
    """
    if getattr(config.data, "normalize", False):
        raise NotImplementedError("the reference loop does not standardise inputs (data.normalize)")
    total = len(batches) if total_steps is None else total_steps
    group = zarr.open_group(str(config.data.store), mode="r")
    inputs = np.asarray(group[config.data.inputs][...])
    targets = np.asarray(group[config.data.targets][...])
    model = build_model(config.model.factory, dict(config.model.kwargs), config.train.seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    optimizer = build_optimizer(config.optimizer, list(model.parameters()))
    schedule = config.schedule
    model.train()
    for step, entry in enumerate(batches):
        if entry is None:
            continue
        parts = [entry] if isinstance(entry, np.ndarray) else [p for p in entry if len(p)]
        count = sum(len(p) for p in parts)
        start = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in norms]
        moved = [(torch.zeros_like(mean), torch.zeros_like(var)) for mean, var, _ in start]
        optimizer.zero_grad()
        step_loss, step_correct = 0.0, 0
        for indices in parts:
            for m, (mean, var, _) in zip(norms, start):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
            y = torch.from_numpy(targets[indices])
            out = model(torch.from_numpy(inputs[indices]).float())
            # A sum over the part's samples: the parts add up to the mean over the global batch.
            part_loss = loss(config.loss, out, y) * (len(indices) / count)
            part_loss.backward()
            step_loss += float(part_loss.detach())
            if config.loss == "cross_entropy":
                step_correct += int((out.argmax(dim=1) == y.long()).sum())
            for m, (mean, var, _), (d_mean, d_var) in zip(norms, start, moved):
                d_mean += len(indices) * (m.running_mean - mean)
                d_var += len(indices) * (m.running_var - var)
        for m, (mean, var, tracked), (d_mean, d_var) in zip(norms, start, moved):
            m.running_mean.copy_(mean + d_mean / count)
            m.running_var.copy_(var + d_var / count)
            m.num_batches_tracked.fill_(tracked + 1)
        if step_numbers is not None:
            step_numbers.append((step_loss, step_correct))
        lr = learning_rate(schedule.name, config.optimizer.lr, step, total, schedule.warmup_steps, schedule.min_lr)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        if clip is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip, norm_type=2.0))
            if grad_norms is not None:
                grad_norms.append(norm)
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest ``max|a-b| / max|b|`` over the tensors of two state dicts with the same keys."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-12))
               for k in a)
