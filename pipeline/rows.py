"""Samples along axis 0, in the three shapes a batch part takes, and the few operations on them.

A batch is ``(x, y)``. ``x`` is the inputs array, or, with ``data.fields``, a dict of arrays by
store array name (the model is called with several); ``y`` is the targets array, or None when the
loss needs none (``loss: model``). Each array is host numpy, or a torch tensor where it came from
a chunk cache's device part. The feed, the cache and the replicas slice, join, permute, count and
move these without caring which shape they hold: one function each here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeAlias

import numpy as np
import torch

Array: TypeAlias = np.ndarray | torch.Tensor
"""Samples along axis 0: host numpy, or a torch tensor where they came from the cache's device part."""
Rows: TypeAlias = Array | dict[str, Array] | None
"""One part of a batch: an array, a dict of arrays by store array name, or None (nothing read)."""


def count(rows: Rows) -> int:
    """Samples in ``rows`` (0 for None)."""
    if rows is None:
        return 0
    if isinstance(rows, dict):
        return len(next(iter(rows.values())))
    return len(rows)


def nbytes(rows: Rows) -> int:
    """Bytes ``rows`` hold."""
    if rows is None:
        return 0
    parts = rows.values() if isinstance(rows, dict) else (rows,)
    return sum(p.nbytes if isinstance(p, np.ndarray) else p.element_size() * p.nelement() for p in parts)


def apply(fn: Callable[[Array, str], Array], rows: Rows, name: str) -> Rows:
    """``fn(array, name)`` on every array of ``rows`` (a dict's arrays are named ``name:key``)."""
    if rows is None:
        return None
    if isinstance(rows, dict):
        return {k: fn(v, f"{name}:{k}") for k, v in rows.items()}
    return fn(rows, name)


def take(rows: Rows, lo: int, hi: int) -> Rows:
    """Samples ``lo:hi``."""
    return apply(lambda a, _: a[lo:hi], rows, "")


def permute(rows: Rows, order: np.ndarray) -> Rows:
    """``rows[order]``, indexing a tensor with an index tensor on its own device."""
    def one(a: Array, _: str) -> Array:
        return a[order] if isinstance(a, np.ndarray) else a[torch.from_numpy(order).to(a.device)]
    return apply(one, rows, "")


def concat(parts: Sequence[Rows]) -> Rows:
    """Parts laid end to end along axis 0 (all of one shape: arrays, dicts with the same keys, or
    None): numpy if every part is, else a tensor on the first tensor's device (a shard's window
    held on the host, or an empty part, joins device parts there)."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, dict):
        return {k: _concat_arrays([p[k] for p in parts]) for k in first}  # type: ignore[index]
    return _concat_arrays(parts)  # type: ignore[arg-type]


def _concat_arrays(parts: Sequence[Array]) -> Array:
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    device = next(p.device for p in parts if isinstance(p, torch.Tensor))
    return torch.cat([torch.from_numpy(p).to(device) if isinstance(p, np.ndarray) else p for p in parts])


def shapes(rows: Rows) -> str:
    """The per-batch shapes of ``rows`` as an error names them."""
    if rows is None:
        return "none"
    if isinstance(rows, dict):
        return ", ".join(f"{k} {tuple(v.shape)}" for k, v in rows.items())
    return str(tuple(rows.shape))
