"""A model that hangs in the worker whose pid is written in a flag file: a straggler on demand."""

from __future__ import annotations

import os
import time
from pathlib import Path

from torch import nn


class HangIfFlagged(nn.Module):
    def __init__(self, flag: str, seconds: float) -> None:
        super().__init__()
        self.flag = flag
        self.seconds = seconds

    def forward(self, x):
        path = Path(self.flag)
        if path.exists() and path.read_text().strip() == str(os.getpid()):
            time.sleep(self.seconds)
        return x


def sleepy_mlp(flag: str, seconds: float = 15.0, in_features: int = 64, out_features: int = 10,
               hidden: tuple[int, ...] = (32,)) -> nn.Sequential:
    """The hang, then a plain ReLU MLP built here (the reference loop imports this module too)."""
    widths = [in_features, *hidden]
    layers: list[nn.Module] = [HangIfFlagged(flag, seconds), nn.Flatten()]
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], out_features))
