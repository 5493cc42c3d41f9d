"""Loss, optimizer and learning-rate schedule: the parts of a step that every process shares.

The loss is returned as a *sum* over samples of per-sample losses: workers sum their parts, the
reduction tree sums the workers, and the apply step divides by the global sample count, which
gives exactly the mean over the global batch that a single process would take, also for a short
last batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dasktrain.config import DataConfig, OptimizerConfig, RunConfig, ScheduleConfig
from dasktrain.errors import DasktrainError
from dasktrain.store import ArraySpec


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


def correct_count(kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over samples of the share of a sample's labels predicted right (0 for regression), as
    an fp32 scalar on the output's device (reading it is the caller's choice: on a GPU each read
    waits for the device): the count of correctly classified samples for one label per sample
    (whole numbers, exact in a float), the sum of each sequence's token accuracy for sequences.
    Divided by the sample count, it is the accuracy (per token, for sequences)."""
    if kind != "cross_entropy":
        return output.new_zeros((), dtype=torch.float32)
    if output.ndim == 2:
        return (output.argmax(dim=1) == target).sum().float()
    right = (output.argmax(dim=-1) == target).reshape(len(target), -1)
    return right.double().mean(dim=1).sum().float()


INPUT_DTYPES: dict[str, torch.dtype | None] = {"float": None, "int64": torch.int64}
"""``data.inputs_dtype`` to the torch dtype inputs reach the model in (None: the default float dtype)."""


def inputs_torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of ``data.inputs_dtype`` ``name``: the default float dtype, or int64."""
    return INPUT_DTYPES[name] or torch.get_default_dtype()


def probe_inputs(data: DataConfig, fields: Sequence[ArraySpec], inputs_shape: Sequence[int]) -> Any:
    """Two samples of zeros as the model takes them (run on the ``meta`` device to find output
    shapes): a dict of ``fields``' arrays in their own kinds with ``data.fields``, else the inputs
    of ``inputs_shape`` under ``data.inputs_dtype``."""
    if data.fields is not None:
        return {spec.name: cast_field(torch.zeros((2, *spec.sample_shape),
                                                  dtype=torch.from_numpy(np.empty(0, spec.dtype)).dtype))
                for spec in fields}
    return torch.zeros((2, *inputs_shape), dtype=inputs_torch_dtype(data.inputs_dtype))


def cast_inputs(name: str, inputs: torch.Tensor) -> torch.Tensor:
    """Store inputs as the model takes them, under ``data.inputs_dtype`` ``name``: features in the
    default float dtype, or token ids as int64 (what ``nn.Embedding`` takes). The one place
    where inputs are cast: training, validation, pipeline stage 0, evaluation and prediction."""
    return inputs.to(inputs_torch_dtype(name))


def prepare_batch(kind: str, inputs: Any, targets: Any, inputs_dtype: str = "float") -> tuple[Any, Any]:
    """Cast store arrays to what the model and loss take: inputs by :func:`cast_inputs` (a last
    pipeline stage passes its activations, which stay float), each of a dict of fields
    (``data.fields``) in its own kind (:func:`cast_field`); long targets for cross-entropy, float
    for MSE, their own kind for the other losses, None where the loss reads none."""
    inputs = ({name: cast_field(t) for name, t in inputs.items()} if isinstance(inputs, dict)
              else cast_inputs(inputs_dtype, inputs))
    if targets is not None:
        if kind == "cross_entropy":
            targets = targets.long()
        elif kind == "mse":
            targets = targets.to(torch.get_default_dtype())
        else:
            targets = cast_field(targets)
    return inputs, targets


def cast_field(tensor: torch.Tensor) -> torch.Tensor:
    """A store array as a model takes it, by its kind: integers as int64 (ids, labels, masks),
    floating point in the default float dtype, booleans as they are."""
    if tensor.dtype == torch.bool:
        return tensor
    return tensor.to(torch.get_default_dtype()) if tensor.is_floating_point() else tensor.long()


def call_model(model: nn.Module, fields: dict[str, str] | tuple[str, ...] | None, inputs: Any) -> Any:
    """The model's output for a batch's inputs: ``model(inputs)``, or with ``data.fields`` (the
    inputs a dict of arrays by store array name) ``model(**{argument: array})`` for a mapping and
    ``model(*arrays)`` for a list."""
    if fields is None:
        return model(inputs)
    if isinstance(fields, dict):
        return model(**{argument: inputs[array] for argument, array in fields.items()})
    return model(*(inputs[array] for array in fields))


def batch_view(fields: dict[str, str] | tuple[str, ...] | None, inputs: Any, targets: Any) -> dict[str, Any]:
    """The batch a ``loss: module:callable`` is given: the fields by argument name (by array name
    for a list of fields), or ``inputs``; and ``targets`` where they are read."""
    if fields is None:
        view = {"inputs": inputs}
    elif isinstance(fields, dict):
        view = {argument: inputs[array] for argument, array in fields.items()}
    else:
        view = {array: inputs[array] for array in fields}
    if targets is not None:
        view["targets"] = targets
    return view


def output_logits(kind: str, out: Any) -> torch.Tensor:
    """The tensor a built-in loss scores: the output itself, or its ``logits`` (a Hugging Face
    ``ModelOutput``, or a dict with that key), in fp32."""
    if isinstance(out, torch.Tensor):
        return out.float()
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"loss {kind} needs the model to return a tensor (or an output with logits); "
                         f"it returned {type(out).__name__}")
    return logits.float()


def model_loss(out: Any) -> torch.Tensor:
    """The loss a model's output carries (``loss: model``): its ``loss`` attribute, its ``"loss"``
    key, or the output itself when it is a scalar tensor; fp32."""
    loss: Any
    if isinstance(out, torch.Tensor):
        loss = out
    elif isinstance(out, dict):
        loss = out.get("loss")
    else:
        loss = getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(out).__name__
        raise ValueError(f"loss: model needs the model to return its loss (a scalar tensor, an output with a "
                         f"loss attribute or a 'loss' key); it returned {what}"
                         + (" without a loss (did the batch give the model its labels?)"
                            if not isinstance(out, torch.Tensor) else ""))
    return loss.float().reshape(())


def batch_loss(kind: str, loss_fn: Callable[..., Any] | None, fields: dict[str, str] | tuple[str, ...] | None,
               out: Any, inputs: Any, targets: Any, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's loss *sum* (backward starts from it) and correct count (both fp32 scalars on the
    device, read by nobody here), under ``loss`` ``kind``:
    a built-in loss on the output (or its logits) against ``targets``; ``model``, the output's
    own loss, a mean over the batch, times ``samples``; ``module:callable`` (``loss_fn``), the sum
    of its per-sample losses. Only cross-entropy counts correct predictions. Raises ValueError
    naming what does not fit."""
    if kind == "model":
        loss = model_loss(out) * samples
        return loss, loss.new_zeros(())
    if loss_fn is not None:
        loss = user_loss_sum(kind, loss_fn(out, batch_view(fields, inputs, targets)), samples)
        return loss, loss.new_zeros(())
    logits = output_logits(kind, out)
    return loss_sum(kind, logits, targets), correct_count(kind, logits.detach(), targets)


def metric_sums(path: str, fn: Callable[..., Any], out: Any, batch: dict[str, Any]) -> tuple[float, float]:
    """The ``(sum, count)`` a metric ``module:callable`` gives for one batch, as floats; a metric
    that raises or returns something else stops the run with one line naming it."""
    try:
        total, count = fn(out, batch)
        return float(total), float(count)
    except Exception as exc:
        raise DasktrainError(f"metric {path} failed on a batch of {len(next(iter(batch.values())))} samples: "
                             f"{type(exc).__name__}: {exc} (a metric returns a (sum, count) pair)") from None


def user_loss_sum(kind: str, per_sample: Any, samples: int) -> torch.Tensor:
    """The sum of what a ``loss: module:callable`` returned, after checking it is one loss per sample."""
    if not isinstance(per_sample, torch.Tensor) or tuple(per_sample.shape) != (samples,):
        got = f"shape {tuple(per_sample.shape)}" if isinstance(per_sample, torch.Tensor) else type(per_sample).__name__
        raise ValueError(f"loss {kind} returned {got} for a batch of {samples} samples; it must return one loss "
                         f"per sample, a tensor of shape ({samples},)")
    return per_sample.float().sum()


def build_optimizer(config: OptimizerConfig, params: list[nn.Parameter], *, fused: bool = False) -> torch.optim.Optimizer:
    """The configured torch optimizer, with the implementation torch picks for the parameters'
    device, as a plain PyTorch user gets it: one loop over the parameters on CPU (the same
    arithmetic as the tests' reference loop), the ``foreach`` kernels on CUDA, which update every
    parameter in a few launches instead of several per parameter. Replicas on one kind of device
    run one implementation and update alike (CPU and CUDA kernels round differently anyway).

    ``fused``: torch's fused kernels instead, which read a ``found_inf`` flag on the device and
    leave parameters and state alone where it is set: an update decided without a host read
    (``train.host_reads: segment``). Their updates round within an ulp or so of the loop's."""
    if config.name == "sgd":
        sgd = torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
            weight_decay=config.weight_decay, fused=fused or None,
        )
        if fused and config.momentum:
            _momentum_from_zeros(sgd)
        return sgd
    cls = torch.optim.Adam if config.name == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
               fused=fused or None)


def _momentum_from_zeros(optimizer: torch.optim.Optimizer) -> None:
    """Before the fused SGD's first step, give each parameter a momentum buffer of zeros.

    torch's fused SGD makes the buffers on its first step with ``empty_like`` and lets the kernel
    fill them, which a set ``found_inf`` skips whole: a first update skipped so (a non-finite
    first step under ``skip_step``) leaves them uninitialized, and the next update reads whatever
    memory they got. From zeros, the first update (``buf = momentum * 0 + grad``, no dampening
    here) is bitwise torch's own first step (``buf = grad``). The hook goes once it has run; a
    state loaded before then (a checkpoint's) keeps the buffers it brings."""
    def prime(opt: torch.optim.Optimizer, *_: Any) -> None:
        for group in opt.param_groups:
            for p in group["params"]:
                if opt.state[p].get("momentum_buffer") is None:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        handle.remove()

    handle = optimizer.register_step_pre_hook(prime)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load ``state`` (a checkpoint's, or another replica's) into ``optimizer``, keeping the
    implementation it was built with. torch takes a group's ``fused`` flag from the state it
    loads, and places Adam's step counts by it (on the device for the fused kernels, on the host
    for the others); so a checkpoint written by a run of the other ``host_reads`` is loaded as
    if this optimizer had written it."""
    own = [group["fused"] for group in optimizer.param_groups]
    groups = [{**saved, "fused": fused} for saved, fused in zip(state["param_groups"], own)]
    optimizer.load_state_dict({**state, "param_groups": groups})


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
