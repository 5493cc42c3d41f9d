"""Where a worker's replica computes, and in which precision.

A worker trains on CUDA when it has a GPU, else on its CPUs. dask-cuda starts each worker with
``CUDA_VISIBLE_DEVICES`` rotated so that the worker's own GPU comes first, and a jobqueue GPU job
sees only the GPUs it was granted, so "the worker's GPU" is always ``cuda:0``.

Mixed precision (``bf16``) is autocast only: the model's parameters, the optimizer state and the
flat gradient buffers stay fp32 (autocast differentiates back into the fp32 parameters), so the
gradient sums of the reduction tree and the optimizer step are fp32 as in an fp32 run. The loss
is taken in fp32 from the bf16 outputs.

Host-to-device copies go through pinned staging buffers with ``non_blocking=True``: the copy
overlaps with the host's work, and a buffer is only refilled after the copy that read it is done.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import numpy as np
import torch

Precision = Literal["fp32", "bf16"]
"""Compute precision of forward/backward: ``fp32``, or ``bf16`` autocast with fp32 master weights."""


def worker_device() -> torch.device:
    """This worker's device: its own GPU (``cuda:0``, see the module docstring) if it has one."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


class Placement:
    """One replica's device and precision: model placement, batch copies, autocast, host copies."""

    def __init__(self, precision: Precision = "fp32", device: torch.device | str | None = None) -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.device = torch.device(device) if device is not None else worker_device()
        self.precision: Precision = precision
        self._cuda = self.device.type == "cuda"
        self._staging: dict[str, tuple[torch.Tensor, torch.cuda.Event | None]] = {}

    def __repr__(self) -> str:
        return f"Placement(device={self.device}, precision={self.precision})"

    def model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move the model (fp32 parameters, whatever the precision) to the device; returns it."""
        if self._cuda:
            torch.cuda.set_device(self.device)
        return model.to(self.device, dtype=torch.float32)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Context for the forward pass (and the loss): bf16 autocast, or nothing for fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def zeros(self, numel: int) -> torch.Tensor:
        """A flat fp32 buffer on the device (gradients accumulate into it in fp32)."""
        return torch.zeros(numel, dtype=torch.float32, device=self.device)

    def to_device(self, array: np.ndarray | torch.Tensor, slot: str) -> torch.Tensor:
        """Copy a host array to the device, asynchronously through the pinned buffer ``slot``.

        Each slot (e.g. ``"inputs"``, ``"targets"``) holds one pinned buffer, grown as needed;
        before it is refilled, the host waits for the copy that last read it. A tensor already on
        the device (a batch from the GPU chunk cache) is returned as it is.
        """
        tensor = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
        if not self._cuda or self._holds(tensor):
            return tensor
        nbytes = tensor.numel() * tensor.element_size()
        buffer, done = self._staging.get(slot, (None, None))
        if buffer is None or buffer.numel() < nbytes:
            buffer, done = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True), None
        if done is not None:
            done.synchronize()  # the previous copy out of this buffer has finished
        staged = buffer[:nbytes].view(tensor.dtype).view(tensor.shape)
        staged.copy_(tensor)
        out = staged.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._staging[slot] = (buffer, event)
        return out

    def _holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is on this placement's device (plain ``cuda`` means the current GPU)."""
        here = tensor.device
        if here.type != self.device.type:
            return False
        if here.type != "cuda":
            return True
        return here.index == (self.device.index if self.device.index is not None else torch.cuda.current_device())

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A device tensor as an ordinary CPU tensor (for Dask to send); waits for the copy."""
        return tensor.detach().to("cpu") if tensor.device.type != "cpu" else tensor

    def from_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU tensor received from Dask (e.g. the reduced gradient) on the device."""
        return tensor.to(self.device, non_blocking=True) if self._cuda else tensor
