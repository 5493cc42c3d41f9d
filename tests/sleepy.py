"""A model that hangs in the worker whose pid is written in a flag file: a straggler on demand."""

from __future__ import annotations

import os
import time
from pathlib import Path

from torch import nn

from pipeline.models import mlp


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


def sleepy_mlp(flag: str, seconds: float = 15.0, **kwargs) -> nn.Sequential:
    return nn.Sequential(HangIfFlagged(flag, seconds), *mlp(**kwargs))
