"""Cutting a model into pipeline stages: which layers each stage holds, and why that split.

A pipeline model is a sequence of *layers*: the children of an ``nn.Sequential``, or the modules
of a list a factory returns (then each list item is one stage, as the user named it). Stage
``s`` holds the contiguous layers ``[lo, hi)``; parameter names keep the full model's indices
(``"3.weight"``), so the stages' parts put together are exactly the full model's ``state_dict``.

Balance: by parameter count (the default, computed anywhere, identical every run), or by
measured forward+backward time of each layer on a micro-batch of the store's sample shape.
The split minimises the largest stage (a linear partition), ties going to the split whose
stages hold the most even number of layers. With ``parallel.virtual_stages = v`` the model is cut
into ``P * v`` stages (worker ``r`` holds stages ``r, r + P, ...``).

No process builds the whole model: the driver plans on the ``meta`` device, and a stage worker
builds its own layers with :func:`build_stage` (see :mod:`dasktrain.materialize`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import nn

from dasktrain import materialize
from dasktrain.config import RunConfig
from dasktrain.errors import ConfigError
from dasktrain.models import resolve_factory
from dasktrain.objective import inputs_torch_dtype

log = logging.getLogger(__name__)

Bounds = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class StageLayout:
    """Where the model is cut: ``bounds[s] = (lo, hi)``, the layers of stage ``s``."""

    bounds: Bounds
    layers: int
    """Cuttable layers of the whole model."""
    named: bool = False
    """The factory named the stages itself (returned a list of stage modules)."""

    @property
    def stages(self) -> int:
        return len(self.bounds)


def build_layers(config: RunConfig, device: str | None = None) -> tuple[list[nn.Module], bool]:
    """The model's layers, with initial weights drawn from the seed: identical in every process.

    Returns ``(layers, named)``: ``named`` is true when the factory returned a list of stage
    modules. Same seeding as :func:`dasktrain.models.build_model`, so an ``nn.Sequential`` here
    has exactly the weights the data-parallel path and the reference loop start from. This
    builds the *whole* model: on ``device="meta"`` it costs nothing (shapes and counts only);
    a stage worker uses :func:`build_stage`, which allocates its own layers only.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        if device is None:
            model = _call_factory(config)
        else:
            with torch.device(device):
                model = _call_factory(config)
    return _as_layers(config, model)


def build_stage(config: RunConfig, lo: int, hi: int) -> nn.Sequential:
    """Layers ``[lo, hi)`` of the model on the CPU, holding bitwise the initial values the whole
    model built from the seed holds, while allocating only these layers (see
    :mod:`dasktrain.materialize`). A factory whose construction cannot be replayed is built whole
    instead (same values), with a warning naming why."""
    try:
        recording = materialize.record(lambda: _call_factory(config))
        layers, _ = _as_layers(config, recording.model)
        materialize.replay(recording, layers[lo:hi], config.train.seed)
    except materialize.NotReplayable as exc:
        log.warning("model.factory %s: building the whole model to keep layers %d..%d, as its "
                    "construction cannot be replayed in place (%s)", config.model.factory, lo, hi - 1, exc)
        layers, _ = build_layers(config)
    return stage_module(layers, lo, hi)


def _call_factory(config: RunConfig) -> Any:
    model_cfg = config.model
    factory = resolve_factory(model_cfg.factory)
    try:
        return factory(**model_cfg.kwargs)
    except TypeError as exc:
        raise ConfigError(f"model.kwargs do not fit {model_cfg.factory}: {exc}") from None


def _as_layers(config: RunConfig, model: Any) -> tuple[list[nn.Module], bool]:
    model_cfg = config.model
    if isinstance(model, nn.Sequential):
        return list(model.children()), False
    if isinstance(model, (list, tuple, nn.ModuleList)) and all(isinstance(m, nn.Module) for m in model):
        return list(model), True
    raise ConfigError(
        f"parallel.pipeline={config.parallel.pipeline} needs a model that can be cut into stages: "
        f"model.factory {model_cfg.factory} returned {type(model).__name__}, which is not an "
        "nn.Sequential and names no stages; return an nn.Sequential, or a list of the stage modules"
    )


def as_sequential(layers: Sequence[nn.Module]) -> nn.Sequential:
    """The full model the stages make up: its ``state_dict`` keys are the checkpoint's keys."""
    return nn.Sequential(*layers)


def plan_stages(config: RunConfig, sample_shape: tuple[int, ...]) -> StageLayout:
    """Cut ``config``'s model into ``parallel.pipeline`` stages; errors name the value and the need."""
    par = config.parallel
    stages = par.pipeline * par.virtual_stages  # ranks x chunks per rank
    # Parameter counts and the layer count need no weights: build on the meta device.
    layers, named = build_layers(config, device="meta")
    n = len(layers)
    if named:
        if n != stages:
            raise ConfigError(
                f"model.factory {config.model.factory} names {n} stages, parallel.pipeline={stages}; "
                "they must be equal"
            )
        return StageLayout(tuple((s, s + 1) for s in range(n)), n, named=True)
    if stages > n:
        raise ConfigError(
            f"parallel.pipeline={stages} stages, but model {config.model.factory} has only {n} cuttable "
            f"layers (children of its nn.Sequential); needs parallel.pipeline <= {n}"
        )
    if par.cuts is not None:
        return StageLayout(bounds_from_cuts(par.cuts, stages, n), n)
    if par.balance == "time":
        weights = measured_costs(config, sample_shape)
    else:
        weights = [float(sum(p.numel() for p in layer.parameters())) for layer in layers]
    return StageLayout(balanced_bounds(weights, stages), n)


def bounds_from_cuts(cuts: Sequence[int], stages: int, layers: int) -> Bounds:
    """Bounds from explicit cut points (the layer indices where stages 2..P begin)."""
    points = list(cuts)
    if len(points) != stages - 1:
        raise ConfigError(
            f"parallel.cuts={tuple(points)} gives {len(points) + 1} stages, parallel.pipeline={stages} "
            f"needs {stages - 1} cut points"
        )
    edges = [0, *points, layers]
    if any(a >= b for a, b in zip(edges, edges[1:])):
        raise ConfigError(
            f"parallel.cuts={tuple(points)} must increase strictly within 1..{layers - 1} "
            f"(the model has {layers} cuttable layers), so that every stage holds a layer"
        )
    return tuple(zip(edges[:-1], edges[1:]))


def balanced_bounds(weights: Sequence[float], stages: int) -> Bounds:
    """Contiguous split of ``weights`` into ``stages`` non-empty parts minimising the largest part.

    Exact linear partition by dynamic programming (layers are few); among splits with the same
    largest part, the one with the smallest spread of layer counts.
    """
    n = len(weights)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot cut {n} layers into {stages} stages")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    @cache
    def best(start: int, parts: int) -> tuple[float, int, tuple[int, ...]]:
        # (largest part, largest layer count, cut points) for layers[start:] in `parts` parts.
        if parts == 1:
            return prefix[n] - prefix[start], n - start, ()
        choice: tuple[float, int, tuple[int, ...]] | None = None
        for stop in range(start + 1, n - parts + 2):
            rest = best(stop, parts - 1)
            here = (max(prefix[stop] - prefix[start], rest[0]), max(stop - start, rest[1]), (stop, *rest[2]))
            if choice is None or here[:2] < choice[:2]:
                choice = here
        assert choice is not None
        return choice

    edges = [0, *best(0, stages)[2], n]
    return tuple(zip(edges[:-1], edges[1:]))


def measured_costs(config: RunConfig, sample_shape: tuple[int, ...], repeats: int = 3) -> list[float]:
    """Forward+backward seconds of each layer on one micro-batch of zeros (median of ``repeats``)."""
    layers, _ = build_layers(config)
    par = config.parallel
    rows = max(1, config.train.batch_size // (par.data * par.micro_batches))
    x = torch.zeros((rows, *sample_shape), dtype=inputs_torch_dtype(config.data.inputs_dtype))
    costs = []
    for layer in layers:
        times = []
        for _ in range(repeats):
            inp = x.detach().requires_grad_(x.is_floating_point())
            t0 = time.perf_counter()
            out = layer(inp)
            if out.requires_grad:
                out.backward(torch.ones_like(out))
            times.append(time.perf_counter() - t0)
        costs.append(sorted(times)[len(times) // 2])
        x = out.detach()
    return costs


def stage_module(layers: Sequence[nn.Module], lo: int, hi: int) -> nn.Sequential:
    """The layers of one stage, as a module; see :func:`full_key` for its parameter names."""
    return nn.Sequential(*layers[lo:hi])


def full_key(lo: int, local: str) -> str:
    """The full model's name of a stage-local ``state_dict`` key (``"1.weight"`` of a stage at 2 -> ``"3.weight"``)."""
    index, _, rest = local.partition(".")
    return f"{lo + int(index)}.{rest}"


def local_key(lo: int, full: str) -> str:
    index, _, rest = full.partition(".")
    return f"{int(index) - lo}.{rest}"
