"""The gradient reduction tree: step partials summed by Dask tasks, never by the driver.

A tree of fan-in ``k`` is laid over ``n`` ordered leaves: node ``(0, j)`` is leaf ``j``; node
``(L, j)`` sums children ``(L-1, j*k) ... (L-1, j*k+k-1)`` in that order. In fast mode the leaves
are the workers (each worker's fused gradient is one leaf). In deterministic mode the leaves are
the shards: a worker owning a contiguous block of shards sums, locally, the largest subtrees that
lie inside its block (its *cover*), and the remaining nodes are Dask tasks. Every node's value
is then computed by the same additions in the same order whatever the worker count, so the root
is bitwise the same for any number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

NodeId = tuple[int, int]


@dataclass
class StepStats:
    """Small per-step numbers that ride along the tree and reach the driver (sums, or maxima for times)."""

    loss_sum: float = 0.0
    count: int = 0
    correct: float = 0.0
    """Samples right: whole for class labels; each sequence adds the share of its tokens right."""
    val_loss_sum: float = 0.0
    val_count: int = 0
    val_correct: float = 0.0
    val_metrics: dict[str, list[float]] = field(default_factory=dict)
    """The run's own metrics on the validation split: name -> [sum, count]."""
    nonfinite: int = 0
    chunks_read: int = 0
    data_wait_s: float = 0.0
    compute_s: float = 0.0

    _MAX = ("data_wait_s", "compute_s")

    def __add__(self, other: StepStats) -> StepStats:
        merged: dict[str, Any] = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, dict):
                merged[f.name] = {k: [x + y for x, y in zip(a.get(k, (0.0, 0.0)), b.get(k, (0.0, 0.0)))]
                                  for k in sorted({**a, **b})}
            else:
                merged[f.name] = max(a, b) if f.name in self._MAX else a + b
        return StepStats(**merged)

    def add_metric(self, name: str, total: float, count: float) -> None:
        """Count one batch's ``(sum, count)`` of metric ``name`` into the validation sums."""
        sums = self.val_metrics.setdefault(name, [0.0, 0.0])
        sums[0] += total
        sums[1] += count

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Partial:
    """A worker's or a reduction task's output: gradient sums by tree node, and stats.

    ``stats`` is None where the stats of that source were already counted by another task.
    """

    grads: dict[NodeId, torch.Tensor] = field(default_factory=dict)
    stats: StepStats | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # A pickled torch tensor goes through torch.save into a byte string: a copy and a slow
        # path on both ends of every transfer. A NumPy array is pickled (protocol 5, as Dask
        # does) as an out-of-band buffer that Dask sends as it is. bf16 has no NumPy dtype: it
        # travels as its int16 bits.
        wire = {node: (g.view(torch.int16).numpy(), True) if g.dtype == torch.bfloat16 else (g.numpy(), False)
                for node, g in self.grads.items()}
        return _partial_from_wire, (wire, self.stats)


def _partial_from_wire(wire: dict[NodeId, tuple[np.ndarray, bool]], stats: StepStats | None) -> Partial:
    grads = {}
    for node, (array, bf16) in wire.items():
        if not array.flags.writeable:  # torch wants a writable buffer; Dask's receive buffers are
            array = array.copy()
        tensor = torch.from_numpy(array)
        grads[node] = tensor.view(torch.bfloat16) if bf16 else tensor
    return Partial(grads, stats)


def sum_in_order(tensors: Sequence[torch.Tensor], keep_fp32: bool = False) -> torch.Tensor:
    """Sum left to right into a fresh tensor: the single summation rule of the whole tree.

    The sum is taken in fp32 and returned in the inputs' dtype (fp32 with ``keep_fp32``, for a
    value that travels no further), so gradients that travel in bf16 (``grad_transfer: bf16``)
    are still accumulated in fp32 at every node.
    """
    total = tensors[0].to(torch.float32, copy=True)
    for t in tensors[1:]:
        total.add_(t)
    return total if keep_fp32 else total.to(tensors[0].dtype)


def default_fan_in(leaves: int) -> int:
    """Fan-in when the config gives none: one reduction task up to 4 leaves, then a 4-ary tree."""
    return max(2, min(leaves, 4))


class ReductionTree:
    """The fixed shape of the reduction over ``leaves`` ordered leaves."""

    def __init__(self, leaves: int, fan_in: int) -> None:
        if leaves < 1 or fan_in < 2:
            raise ValueError(f"a tree needs leaves >= 1 and fan_in >= 2, got {leaves}, {fan_in}")
        self.leaves = leaves
        self.fan_in = fan_in
        widths = [leaves]
        while widths[-1] > 1:
            widths.append(math.ceil(widths[-1] / fan_in))
        self.widths = widths
        self.root: NodeId = (len(widths) - 1, 0)

    def children(self, node: NodeId) -> list[NodeId]:
        level, j = node
        if level == 0:
            return []
        below = self.widths[level - 1]
        return [(level - 1, c) for c in range(j * self.fan_in, min((j + 1) * self.fan_in, below))]

    def span(self, node: NodeId) -> tuple[int, int]:
        """Leaves ``[lo, hi)`` under ``node``."""
        level, j = node
        width = self.fan_in**level
        return j * width, min((j + 1) * width, self.leaves)

    def cover(self, lo: int, hi: int) -> list[NodeId]:
        """Largest nodes whose leaves all lie in ``[lo, hi)``, in leaf order."""
        found: list[NodeId] = []

        def visit(node: NodeId) -> None:
            a, b = self.span(node)
            if b <= lo or a >= hi:
                return
            if lo <= a and b <= hi:
                found.append(node)
                return
            for child in self.children(node):
                visit(child)

        visit(self.root)
        return found

    def sum_subtree(self, node: NodeId, leaf_values: dict[int, torch.Tensor]) -> torch.Tensor:
        """Value of ``node`` from its leaves, with exactly the additions the tree makes."""
        if node[0] == 0:
            return leaf_values[node[1]]
        return sum_in_order([self.sum_subtree(c, leaf_values) for c in self.children(node)])


def combine(node: NodeId, picks: list[tuple[int, NodeId, bool]], *sources: Partial, keep_fp32: bool = False) -> Partial:
    """Dask task: the value of ``node`` from its children, each picked from one of ``sources``.

    ``picks`` lists ``(source index, child node, take that source's stats)`` in child order.
    """
    grads = [sources[i].grads[child] for i, child, _ in picks if child in sources[i].grads]
    stats = StepStats()
    for i, _, take in picks:
        source_stats = sources[i].stats
        if take and source_stats is not None:
            stats = stats + source_stats
    return Partial({node: sum_in_order(grads, keep_fp32)} if grads else {}, stats)


Pick = tuple[int, NodeId, bool]
"""(source index, child node, take that source's stats): one input of a node's sum."""


@dataclass(frozen=True)
class RootRecipe:
    """How to form the root from its children: the next step's task on *every* worker sums them
    itself, with :func:`combine`, so the root is never computed in one place and sent on (one
    transfer and one task fewer on every step's critical path). Same inputs, same order: every
    replica gets the same bits."""

    node: NodeId
    picks: tuple[Pick, ...]

    def combine(self, sources: Sequence[Partial]) -> Partial:
        """The root, in fp32: it is summed where it is used and never travels."""
        return combine(self.node, list(self.picks), *sources, keep_fp32=True)


def stats_of(partial: Partial) -> StepStats | None:
    """Dask task, run where ``partial`` lives: its stats alone, so the gradients stay put (the
    tree engine's way to a step's numbers when the workers' events did not reach the driver)."""
    return partial.stats


def submit_tree(client: Any, tree: ReductionTree, worker_futures: Sequence[Any],
                covers: Sequence[list[NodeId]], key: str,
                workers: Sequence[str] | None = None) -> tuple[RootRecipe, list[Any]]:
    """Submit the reduction tasks below the root, above the workers' covers; returns the root's
    recipe and the futures of its sources (see :class:`RootRecipe`). ``workers``, when given,
    are the only workers the reduction tasks may run on.

    ``covers[w]`` lists the nodes worker ``w``'s partial holds; the first time a worker's
    partial is picked its stats are taken, so they are counted exactly once.
    """
    holder = {node: w for w, nodes in enumerate(covers) for node in nodes}
    stats_taken: set[int] = set()

    def inputs_of(node: NodeId) -> tuple[list[Any], list[Pick]]:
        """The futures ``node`` sums from, and its picks among them."""
        sources: list[Any] = []
        position: dict[str, int] = {}
        picks: list[tuple[int, NodeId, bool]] = []
        for child in tree.children(node):
            future, from_worker = value_of(child)
            if future.key not in position:
                position[future.key] = len(sources)
                sources.append(future)
            take = True
            if from_worker:
                w = holder[child]
                take = w not in stats_taken
                stats_taken.add(w)
            picks.append((position[future.key], child, take))
        return sources, picks

    def value_of(node: NodeId) -> tuple[Any, bool]:
        """(future holding ``node``, whether it is a worker partial)."""
        if node in holder:
            return worker_futures[holder[node]], True
        sources, picks = inputs_of(node)
        fut = client.submit(combine, node, picks, *sources, key=f"{key}-sum-{node[0]}.{node[1]}", pure=False,
                            workers=list(workers) if workers is not None else None)
        return fut, False

    if tree.root in holder:  # one worker holds the whole sum
        return RootRecipe(tree.root, ((0, tree.root, True),)), [worker_futures[holder[tree.root]]]
    sources, picks = inputs_of(tree.root)
    return RootRecipe(tree.root, tuple(picks)), sources
