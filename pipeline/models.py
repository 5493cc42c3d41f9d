"""Built-in models and the one way every process builds a model from its config.

Every built-in is an ``nn.Sequential``, so the pipeline-parallel path can cut it into stages
between its top-level children. Their optional dropout (MLP, transformer) and BatchNorm (CNN)
layers follow the data-parallel policies of :mod:`dasktrain.streams` (random streams keyed by
shard, not worker) and :mod:`dasktrain.running_stats` (running statistics reduced with the
gradients).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dasktrain import hf_support, keras_support
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


class TokenEmbedding(nn.Module):
    """Token ids ``(batch, T)`` to vectors ``(batch, T, d_model)``: a learned embedding of each
    token plus a learned embedding of each position (``T`` at most ``context``)."""

    def __init__(self, vocab_size: int, context: int, d_model: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(context, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        if length > self.context:
            raise ValueError(f"sequences of {length} tokens are longer than the model's context of {self.context}")
        where = torch.arange(length, device=ids.device)
        return self.dropout(self.tokens(ids) + self.positions(where))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position ``t`` sees positions ``0..t`` only.

    The query, key and value projections have no bias: a key bias adds the same number to all
    of a query's scores, which the softmax ignores, so its gradient is zero in exact arithmetic
    and only rounding noise in floats, which Adam would scale up to full-size steps."""

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        # (batch, T, 3 * width) -> three of (batch, heads, T, width / heads)
        q, k, v = (part.view(batch, length, self.heads, width // self.heads).transpose(1, 2)
                   for part in self.qkv(x).split(width, dim=2))
        # Dropout on the attention weights draws from the stream seeded for the unit (dasktrain.streams).
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class DecoderBlock(nn.Module):
    """One pre-norm decoder block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(d_model)
        self.attention = CausalSelfAttention(d_model, heads, dropout)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x)))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


def transformer_lm(
    vocab_size: int = 256,
    context: int = 64,
    d_model: int = 64,
    heads: int = 4,
    layers: int = 2,
    dropout: float = 0.0,
    mlp_ratio: int = 4,
) -> nn.Sequential:
    """Small decoder-only transformer language model: int64 token ids ``(batch, T)``, ``T <=
    context``, to next-token logits ``(batch, T, vocab_size)``.

    Its top-level children, which pipeline parallelism cuts between, are: a token and position
    embedding (:class:`TokenEmbedding`), ``layers`` pre-norm :class:`DecoderBlock` (causal
    self-attention and a GELU MLP), a final LayerNorm and a linear head. The head is not tied to
    the token embedding, so that the two may sit on different stages. Linear and embedding
    weights start from N(0, 0.02), biases from zero (the GPT-2 initialisation, which trains
    better than PyTorch's defaults at this size); the projections that add into the residual
    stream are scaled down by sqrt(2 * layers) more. Needs ``data.inputs_dtype: int64``.
    """
    if d_model % heads:
        raise ValueError(f"d_model={d_model} must be a multiple of heads={heads}")
    model = nn.Sequential(
        TokenEmbedding(vocab_size, context, d_model, dropout),
        *(DecoderBlock(d_model, heads, dropout, mlp_ratio) for _ in range(layers)),
        nn.LayerNorm(d_model),
        nn.Linear(d_model, vocab_size),
    )
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            residual = name.endswith(("attention.proj", "mlp.2"))
            nn.init.normal_(module.weight, std=0.02 / math.sqrt(2 * layers) if residual else 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    return model


def resolve_factory(path: str) -> Callable[..., nn.Module]:
    """Import the model factory ``module:callable``; errors name the path."""
    return resolve_callable(path, "model.factory")


def resolve_callable(path: str, key: str) -> Callable[..., Any]:
    """Import ``module:callable`` named by config key ``key``; errors name the key and the path."""
    module_name, _, attr = path.partition(":")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        renamed = _renamed(module_name)
        if renamed is not None:
            raise ConfigError(f"{key} {path!r}: dasktrain's modules are installed as dasktrain.*; "
                              f"write {renamed}:{attr}") from None
        raise ConfigError(f"{key} {path!r}: cannot import module {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"{key} {path!r}: module {module_name!r} has no {attr!r}") from None
    if not callable(target):
        raise ConfigError(f"{key} {path!r} is not callable")
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
    keras_support.default_backend()  # before the factory's module is imported: keras reads it once
    factory = resolve_factory(config.factory)
    with torch.random.fork_rng(devices=[]), keras_support.seeded(seed):
        torch.manual_seed(seed)
        try:
            model = factory(**config.kwargs)
        except TypeError as exc:
            raise ConfigError(f"model.kwargs do not fit {config.factory}: {exc}") from None
        except Exception as exc:  # the user's factory failed: say which one, and its own words
            raise ConfigError(f"model.factory {config.factory} raised {type(exc).__name__}: {exc}") from None
    model = keras_support.adapt(model, config.factory)
    model = hf_support.adapt(model)  # tied weights saved once, as Hugging Face's own files hold them
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory {config.factory} returned {type(model).__name__}, not a torch nn.Module")
    return model
