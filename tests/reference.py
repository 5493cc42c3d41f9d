"""A plain single-process PyTorch loop: the yardstick every parallel mode is tested against.

It is written with plain torch calls (``F.cross_entropy``/``F.mse_loss`` with mean reduction,
``torch.optim`` directly) and takes its global batches from the public plan API, so that an
equality with the Dask run tests the whole distributed path, not shared helper code.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from pipeline.config import RunConfig
from pipeline.models import build_model
from pipeline.objective import lr_at
from pipeline.preflight import build_plan, resolve_splits


def reference_weights(config: RunConfig, steps: int | None = None) -> dict[str, torch.Tensor]:
    """Weights after ``steps`` global steps (default: all epochs) of the single-process loop."""
    splits = resolve_splits(config)
    plan = build_plan(config, splits)
    group = zarr.open_group(config.data.store, mode="r")
    inputs = np.asarray(group[config.data.inputs][:])
    targets = np.asarray(group[config.data.targets][:])
    model = build_model(config.model, config.train.seed)
    opt_cfg = config.optimizer
    if opt_cfg.name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=opt_cfg.lr, momentum=opt_cfg.momentum,
                              weight_decay=opt_cfg.weight_decay, nesterov=opt_cfg.nesterov)
    else:
        cls = torch.optim.Adam if opt_cfg.name == "adam" else torch.optim.AdamW
        opt = cls(model.parameters(), lr=opt_cfg.lr, betas=opt_cfg.betas, eps=opt_cfg.eps,
                  weight_decay=opt_cfg.weight_decay)
    total = steps if steps is not None else config.train.epochs * plan.steps_per_epoch
    for t in range(total):
        epoch, k = plan.locate(t)
        idx = plan.epoch(epoch).global_batch(k)
        x = torch.from_numpy(inputs[idx]).float()
        y = torch.from_numpy(targets[idx])
        torch.manual_seed(config.train.seed * 1_000_003 + t)
        out = model(x)
        loss = F.cross_entropy(out, y.long()) if config.loss == "cross_entropy" else F.mse_loss(out, y.float())
        opt.zero_grad()
        loss.backward()
        for group_ in opt.param_groups:
            group_["lr"] = lr_at(config, t, plan.steps_per_epoch)
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest ``max|a-b| / max|b|`` over the tensors of two state dicts with the same keys."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)
