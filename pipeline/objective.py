"""Loss, optimizer and learning-rate schedule: the parts of a step that every process shares.

The loss is returned as a *sum* over samples of per-sample losses: workers sum their parts, the
reduction tree sums the workers, and the apply step divides by the global sample count, which
gives exactly the mean over the global batch that a single process would take, also for a short
last batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dasktrain.config import OptimizerConfig, RunConfig, ScheduleConfig


def loss_sum(kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over samples of the per-sample loss (MSE: mean over each sample's elements)."""
    if kind == "cross_entropy":
        return F.cross_entropy(output, target, reduction="sum")
    per_element = F.mse_loss(output, target, reduction="none")
    return per_element.reshape(per_element.shape[0], -1).mean(dim=1).sum()


def correct_count(kind: str, output: torch.Tensor, target: torch.Tensor) -> int:
    """Correctly classified samples (0 for regression)."""
    if kind != "cross_entropy":
        return 0
    return int((output.argmax(dim=1) == target).sum())


def prepare_batch(kind: str, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast store arrays to what the model and loss take: float inputs, long or float targets."""
    inputs = inputs.to(torch.get_default_dtype())
    targets = targets.long() if kind == "cross_entropy" else targets.to(torch.get_default_dtype())
    return inputs, targets


def build_optimizer(config: OptimizerConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The configured torch optimizer (foreach kernels off: identical updates everywhere)."""
    if config.name == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
            weight_decay=config.weight_decay, foreach=False,
        )
    cls = torch.optim.Adam if config.name == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, betas=config.betas, eps=config.eps,
               weight_decay=config.weight_decay, foreach=False)


def learning_rate(optimizer: OptimizerConfig, schedule: ScheduleConfig, step: int, total_steps: int) -> float:
    """Learning rate of the update made with the gradient of global ``step``."""
    peak = optimizer.lr
    if schedule.name == "constant":
        return peak
    if step < schedule.warmup_steps:
        return peak * (step + 1) / schedule.warmup_steps
    span = max(1, total_steps - schedule.warmup_steps - 1)
    progress = min(1.0, (step - schedule.warmup_steps) / span)
    return schedule.min_lr + 0.5 * (peak - schedule.min_lr) * (1.0 + math.cos(math.pi * progress))


def lr_at(config: RunConfig, step: int, steps_per_epoch: int) -> float:
    return learning_rate(config.optimizer, config.schedule, step, config.train.epochs * steps_per_epoch)
