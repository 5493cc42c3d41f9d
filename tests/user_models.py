"""A user's own models and losses, as a user would write them: plain torch, nothing from dasktrain.

Imported by the workers by name (``tests.user_models:...``) from the configs of
tests/test_fields_and_losses.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TwoInputs(nn.Module):
    """Class logits from two arrays of features, ``a`` and ``b``, each through its own layer.

    With ``returns_loss`` the forward also takes ``labels`` and returns a dict with the batch's
    mean cross-entropy under ``"loss"`` (the way Hugging Face models return a ``ModelOutput``)."""

    def __init__(self, a_features: int, b_features: int, classes: int, hidden: int = 16,
                 returns_loss: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(a_features, hidden)
        self.b = nn.Linear(b_features, hidden)
        self.head = nn.Linear(hidden, classes)
        self.returns_loss = returns_loss

    def forward(self, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | dict:
        logits = self.head(torch.tanh(self.a(a) + self.b(b)))
        if not self.returns_loss:
            return logits
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def two_inputs(a_features: int, b_features: int, classes: int, returns_loss: bool = False) -> nn.Module:
    return TwoInputs(a_features, b_features, classes, returns_loss=returns_loss)


def weighted_cross_entropy(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per sample: cross-entropy weighted by 1 + label / 2, so higher classes count more."""
    labels = batch["targets"]
    return F.cross_entropy(outputs, labels, reduction="none") * (1.0 + labels.float() / 2.0)


def batch_mean_loss(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A mistake users make: the batch's mean, where one loss per sample is asked for."""
    return F.cross_entropy(outputs, batch["targets"])


def top2_hits(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Top-2 accuracy as a (hits, samples) pair: the label among the two highest logits."""
    hits = (outputs.topk(2, dim=1).indices == batch["targets"].unsqueeze(1)).any(dim=1)
    return hits.sum(), len(hits)


def broken_metric(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """A metric with a bug: it indexes a key the batch does not have."""
    return float(batch["labels"].sum()), 1.0
