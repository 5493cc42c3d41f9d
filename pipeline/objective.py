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
    """Sum over samples of the per-sample loss.

    Cross-entropy of ``(batch, classes)`` logits against ``(batch,)`` labels is one term per
    sample; of sequence logits ``(batch, T, classes)`` against ``(batch, T)`` labels (a language
    model's next tokens), a sample's loss is the mean over its T positions, so the epoch losses
    are nats per token. MSE: mean over each sample's elements.
    """
    if kind == "cross_entropy":
        if output.ndim == 2:
            return F.cross_entropy(output, target, reduction="sum")
        per_position = F.cross_entropy(output.flatten(0, -2), target.flatten(), reduction="none")
        return per_position.reshape(len(target), -1).mean(dim=1).sum()
    per_element = F.mse_loss(output, target, reduction="none")
    return per_element.reshape(per_element.shape[0], -1).mean(dim=1).sum()


def correct_count(kind: str, output: torch.Tensor, target: torch.Tensor) -> float:
    """Sum over samples of the share of a sample's labels predicted right (0 for regression):
    the count of correctly classified samples for one label per sample (whole numbers, exact in
    a float), the sum of each sequence's token accuracy for sequences. Divided by the sample
    count, it is the accuracy (per token, for sequences)."""
    if kind != "cross_entropy":
        return 0.0
    if output.ndim == 2:
        return float((output.argmax(dim=1) == target).sum())
    right = (output.argmax(dim=-1) == target).reshape(len(target), -1)
    return float(right.double().mean(dim=1).sum())


INPUT_DTYPES: dict[str, torch.dtype | None] = {"float": None, "int64": torch.int64}
"""``data.inputs_dtype`` to the torch dtype inputs reach the model in (None: the default float dtype)."""


def inputs_torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of ``data.inputs_dtype`` ``name``: the default float dtype, or int64."""
    return INPUT_DTYPES[name] or torch.get_default_dtype()


def cast_inputs(name: str, inputs: torch.Tensor) -> torch.Tensor:
    """Store inputs as the model takes them, under ``data.inputs_dtype`` ``name``: features in the
    default float dtype, or token ids as int64 (what ``nn.Embedding`` takes). The one place
    where inputs are cast: training, validation, pipeline stage 0, evaluation and prediction."""
    return inputs.to(inputs_torch_dtype(name))


def prepare_batch(kind: str, inputs: torch.Tensor, targets: torch.Tensor,
                  inputs_dtype: str = "float") -> tuple[torch.Tensor, torch.Tensor]:
    """Cast store arrays to what the model and loss take: inputs by :func:`cast_inputs` (a last
    pipeline stage passes its activations, which stay float), long or float targets."""
    inputs = cast_inputs(inputs_dtype, inputs)
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
