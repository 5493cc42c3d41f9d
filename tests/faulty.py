"""Models that fail once in a worker, at its Nth forward pass, while a flag file is armed: one
raises, one kills its process.

The error is a ``ConnectionError``: a transient fault (say, a dropped connection to remote
storage) that the flow's train task retries; a model that fails on its data is not retried."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from torch import nn

from dasktrain.models import mlp

_CALLS: dict[str, int] = {}


class FailOnceIfArmed(nn.Module):
    def __init__(self, flag: str, after: int) -> None:
        super().__init__()
        self.flag = flag
        self.after = after

    def forward(self, x):
        if not self.training:  # count training forward passes only
            return x
        _CALLS[self.flag] = _CALLS.get(self.flag, 0) + 1
        if _CALLS[self.flag] >= self.after and Path(self.flag).exists():
            try:  # the first process to rename the flag disarms it and fails; the rest go on
                os.rename(self.flag, self.flag + ".fired")
            except FileNotFoundError:
                return x
            raise ConnectionError(f"injected fault in process {os.getpid()} at forward pass {_CALLS[self.flag]}")
        return x


class DieOnceIfArmed(nn.Module):
    """Kills its own process (SIGKILL, as the OOM killer would) at its Nth training forward pass,
    while a flag file is armed: the first process to disarm it dies, the rest go on."""

    def __init__(self, flag: str, after: int) -> None:
        super().__init__()
        self.flag = flag
        self.after = after

    def forward(self, x):
        if not self.training:
            return x
        _CALLS[self.flag] = _CALLS.get(self.flag, 0) + 1
        if _CALLS[self.flag] == self.after:
            try:
                os.rename(self.flag, self.flag + ".fired")
            except FileNotFoundError:
                return x
            os.kill(os.getpid(), signal.SIGKILL)
        return x


def faulty_mlp(flag: str, after: int, **kwargs) -> nn.Sequential:
    return nn.Sequential(FailOnceIfArmed(flag, after), *mlp(**kwargs))


def dying_mlp(flag: str, after: int, **kwargs) -> nn.Sequential:
    return nn.Sequential(DieOnceIfArmed(flag, after), *mlp(**kwargs))


def raising_factory(**kwargs) -> nn.Module:
    """A model factory that fails, as a user's factory with a bug does."""
    raise RuntimeError("this factory always fails")
