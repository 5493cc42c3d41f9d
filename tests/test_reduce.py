"""The reduction tree: shape, covers, and bitwise sameness of sums for any worker split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dasktrain.reduce import ReductionTree, sum_in_order


@pytest.mark.parametrize("leaves,fan_in", [(1, 2), (2, 2), (5, 2), (8, 3), (16, 4), (7, 7)])
def test_cover_partitions_any_block(leaves, fan_in):
    tree = ReductionTree(leaves, fan_in)
    for lo in range(leaves):
        for hi in range(lo + 1, leaves + 1):
            spans = [tree.span(n) for n in tree.cover(lo, hi)]
            covered = [i for a, b in spans for i in range(a, b)]
            assert covered == list(range(lo, hi))


@pytest.mark.parametrize("leaves,fan_in", [(4, 2), (6, 2), (12, 3), (9, 4)])
def test_blocked_sums_are_bitwise_equal_to_the_whole_tree(leaves, fan_in):
    torch.manual_seed(0)
    values = {i: torch.randn(1000) * 10 ** float(np.random.default_rng(i).uniform(-3, 3)) for i in range(leaves)}
    tree = ReductionTree(leaves, fan_in)
    whole = tree.sum_subtree(tree.root, values)
    for workers in range(1, leaves + 1):
        blocks = np.array_split(np.arange(leaves), workers)
        held = {}
        for b in blocks:
            for node in tree.cover(int(b[0]), int(b[-1]) + 1):
                held[node] = tree.sum_subtree(node, values)

        def value(node, held=held):
            if node in held:
                return held[node]
            return sum_in_order([value(c, held) for c in tree.children(node)])

        assert torch.equal(value(tree.root), whole)
