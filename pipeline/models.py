"""Built-in models and the one way every process builds a model from its config.

Both built-ins are ``nn.Sequential``, so the pipeline-parallel path can cut them into stages.
Their optional dropout (MLP) and BatchNorm (CNN) layers follow the data-parallel policies of
:mod:`dasktrain.streams` (random streams keyed by shard, not worker) and
:mod:`dasktrain.running_stats` (running statistics reduced with the gradients).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence

import torch
from torch import nn

from dasktrain.config import ModelConfig
from dasktrain.errors import ConfigError

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def mlp(
    in_features: int,
    out_features: int,
    hidden: Sequence[int] = (128,),
    activation: str = "relu",
    dropout: float = 0.0,
    batch_norm: bool = False,
) -> nn.Sequential:
    """Multi-layer perceptron; inputs of any per-sample shape are flattened first. Each hidden
    layer is Linear, (BatchNorm1d with ``batch_norm``), activation, (Dropout when ``dropout``)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for size in hidden:
        layers.append(nn.Linear(width, size))
        if batch_norm:
            layers.append(nn.BatchNorm1d(size))
        layers.append(_ACTIVATIONS[activation]())
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def cnn(
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    channels: Sequence[int] = (64, 64, 128, 128),
    hidden: int = 256,
    batch_norm: bool = False,
) -> nn.Sequential:
    """Small VGG-style CNN: 3x3 conv layers (each followed by BatchNorm with ``batch_norm``), a
    2x2 max-pool after every second, two linear layers."""
    layers: list[nn.Module] = []
    width, size = in_channels, image_size
    for i, ch in enumerate(channels):
        layers.append(nn.Conv2d(width, ch, kernel_size=3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(ch))
        layers.append(nn.ReLU())
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        width = ch
    layers += [nn.Flatten(), nn.Linear(width * size * size, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


def resolve_factory(path: str) -> Callable[..., nn.Module]:
    """Import ``module:callable``; errors name the path."""
    module_name, _, attr = path.partition(":")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        renamed = _renamed(module_name)
        if renamed is not None:
            raise ConfigError(f"model.factory {path!r}: dasktrain's modules are installed as dasktrain.*; "
                              f"write {renamed}:{attr}") from None
        raise ConfigError(f"model.factory {path!r}: cannot import module {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"model.factory {path!r}: module {module_name!r} has no {attr!r}") from None
    if not callable(target):
        raise ConfigError(f"model.factory {path!r} is not callable")
    return target


def _renamed(module_name: str) -> str | None:
    """The current name of a module that older configs spelled with the folder names
    (``pipeline.models`` is ``dasktrain.models``), when such a module exists."""
    head, _, rest = module_name.partition(".")
    if head not in ("pipeline", "flows", "cluster") or not rest:
        return None
    new = f"dasktrain.{rest}" if head == "pipeline" else f"dasktrain.{head}.{rest}"
    try:
        return new if importlib.util.find_spec(new) is not None else None
    except ImportError:
        return None


def build_model(config: ModelConfig, seed: int) -> nn.Module:
    """Build the model with its initial weights drawn from ``seed``: identical in every process."""
    factory = resolve_factory(config.factory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = factory(**config.kwargs)
        except TypeError as exc:
            raise ConfigError(f"model.kwargs do not fit {config.factory}: {exc}") from None
        except Exception as exc:  # the user's factory failed: say which one, and its own words
            raise ConfigError(f"model.factory {config.factory} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory {config.factory} returned {type(model).__name__}, not a torch nn.Module")
    return model
