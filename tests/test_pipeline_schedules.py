"""Pipeline schedules as action lists, checked without a cluster.

Each schedule must list, for every rank, each micro-batch's F and B (and W when it splits the
backward) exactly once per chunk, in an order that can run against the cross-stage dependencies
(checked here by a simulation written in the test, not the module's own); its bubble must be the
published one. The split backward (input gradient now, weight gradient later) must give exactly
the gradients of one plain backward. The replicas' reduction tree must be a tree: 2(R - 1)
messages, not R(R - 1).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dasktrain.config import validate_config
from dasktrain.errors import ConfigError
from dasktrain.schedules import SCHEDULES, Action, Costs, actions, efficiency_bound, simulate
from dasktrain.stage_actor import tree_routes

SHAPES = [(2, 1), (2, 4), (3, 4), (4, 4), (4, 8), (3, 5), (4, 16)]


def runs(kind: str, lists: list[list[Action]]) -> float:
    """Replays ``lists`` in unit time against the dependencies, independently of the module:
    F of virtual stage vs needs F of vs - 1; B needs F at vs and B at vs + 1; W needs B.
    Returns the makespan; fails on a deadlock."""
    P = len(lists)
    v = 1 + max(a.chunk for ops in lists for a in ops)
    last = P * v - 1
    split = any(a.kind == "W" for ops in lists for a in ops)
    finished: dict[tuple[str, int, int], float] = {}
    clock, pos = [0.0] * P, [0] * P
    while any(pos[r] < len(lists[r]) for r in range(P)):
        moved = False
        for r in range(P):
            if pos[r] == len(lists[r]):
                continue
            kind_, j, c = lists[r][pos[r]]
            vs = c * P + r
            deps = {"F": [("F", j, vs - 1)] if vs else [],
                    "B": [("F", j, vs)] + ([("B", j, vs + 1)] if vs < last else []),
                    "W": [("B", j, vs)]}[kind_]
            if all(d in finished for d in deps):
                cost = 2.0 if kind_ == "B" and not split else 1.0
                clock[r] = finished[(kind_, j, vs)] = max([clock[r]] + [finished[d] for d in deps]) + cost
                pos[r] += 1
                moved = True
        assert moved, f"{kind}: deadlock, ranks wait at {[lists[r][pos[r]] for r in range(P) if pos[r] < len(lists[r])]}"
    return max(clock)


def shapes(kind: str) -> list[tuple[int, int, int]]:
    if kind == "interleaved-1f1b":
        return [(P, m, v) for P, m in SHAPES for v in (2, 3) if m % P == 0]
    return [(P, m, 1) for P, m in SHAPES]


@pytest.mark.parametrize("kind", SCHEDULES)
def test_every_action_once_per_chunk_and_no_deadlock(kind):
    for P, m, v in shapes(kind):
        lists = actions(kind, P, m, v)
        assert len(lists) == P
        letters = "FBW" if kind == "zb-h1" else "FB"
        for ops in lists:
            assert sorted(ops) == sorted(Action(k, j, c) for k in letters for j in range(m) for c in range(v)), (P, m, v)
            # Within a rank, each micro-batch's F comes before its B, and its B before its W.
            for j in range(m):
                for c in range(v):
                    order = [ops.index(Action(k, j, c)) for k in letters]
                    assert order == sorted(order)
        runs(kind, lists)


@pytest.mark.parametrize("kind,bubble", [
    # Published bubbles in units of one F (= B = W): GPipe and 1F1B (P-1)(F+B+W); interleaved
    # 1F1B that over v; ZB-H1 (P-1)(F+B-W).
    ("gpipe", lambda P, m, v: 3 * (P - 1)),
    ("1f1b", lambda P, m, v: 3 * (P - 1)),
    ("interleaved-1f1b", lambda P, m, v: 3 * (P - 1)),  # in units of one chunk: (P-1)(F+B+W)
    ("zb-h1", lambda P, m, v: P - 1),
])
def test_makespan_has_the_published_bubble(kind, bubble):
    for P, m, v in shapes(kind):
        if m < P:
            continue
        assert runs(kind, actions(kind, P, m, v)) == 3 * m * v + bubble(P, m, v), (P, m, v)


def test_zb_h1_beats_1f1b_by_the_papers_margin_at_4_stages_8_micro_batches():
    assert efficiency_bound("1f1b", 4, 8) == pytest.approx(8 / 11)
    assert efficiency_bound("zb-h1", 4, 8) == pytest.approx(24 / 27)
    assert efficiency_bound("interleaved-1f1b", 4, 8, 2) == pytest.approx(8 / (8 + 3 / 2))
    # With W cheaper than F, less bubble is left to fill.
    assert efficiency_bound("zb-h1", 4, 8, costs=Costs(1.0, 1.0, 0.5)) < efficiency_bound("zb-h1", 4, 8)


def test_1f1b_and_gpipe_activation_peaks():
    def peak(ops):
        alive = most = 0
        for a in ops:
            alive += {"F": 1, "B": -1}[a.kind]
            most = max(most, alive)
        return most

    assert [peak(ops) for ops in actions("1f1b", 4, 8)] == [4, 3, 2, 1]
    assert [peak(ops) for ops in actions("gpipe", 4, 8)] == [8, 8, 8, 8]


def test_simulation_refuses_a_deadlocked_or_incomplete_schedule():
    good = actions("1f1b", 2, 2)
    swapped = [good[0], [Action("B", 0), Action("F", 0), Action("F", 1), Action("B", 1)]]
    with pytest.raises(ValueError, match="deadlocks"):
        simulate(swapped, "1f1b")
    with pytest.raises(ValueError, match="exactly once"):
        simulate([good[0][:-1], good[1]], "1f1b")


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="multiple of it"):
        actions("interleaved-1f1b", 4, 6, 2)
    with pytest.raises(ValueError, match="virtual_stages"):
        actions("zb-h1", 2, 4, 2)


def test_split_backward_gives_exactly_the_plain_gradients():
    # A chunk in the middle of a pipeline: input x from the previous stage, gradient g of its output.
    torch.manual_seed(0)
    chunk = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    x0, g = torch.randn(5, 8), torch.randn(5, 4)

    x = x0.clone().requires_grad_(True)
    chunk(x).backward(g)
    plain = [p.grad.clone() for p in chunk.parameters()] + [x.grad.clone()]
    chunk.zero_grad(set_to_none=True)

    x = x0.clone().requires_grad_(True)
    out = chunk(x)
    (gx,) = torch.autograd.grad(out, [x], g, retain_graph=True)  # B: what the previous stage needs
    assert all(p.grad is None for p in chunk.parameters())
    torch.autograd.backward(out, g, inputs=list(chunk.parameters()))  # W, later
    split = [p.grad for p in chunk.parameters()] + [gx]
    assert all(torch.equal(a, b) for a, b in zip(plain, split))


@pytest.mark.parametrize("replicas,fan_in", [(2, 2), (3, 2), (3, 3), (5, 2), (8, 2), (9, 3)])
def test_replica_reduction_is_a_tree(replicas, fan_in):
    routes = [tree_routes(replicas, fan_in, r) for r in range(replicas)]
    parents = [parent for _, parent in routes]
    assert parents[0] is None and all(p is not None for p in parents[1:])
    # Every replica's sum reaches replica 0 (no cycle), and child lists match the parent links.
    for r in range(1, replicas):
        seen, node = set(), r
        while node != 0:
            assert node not in seen
            seen.add(node)
            node = parents[node]
        assert r in routes[parents[r]][0]
    assert sum(len(children) for children, _ in routes) == replicas - 1  # up; as many down: 2(R-1) in all
    assert max(len(children) for children, _ in routes) <= (fan_in - 1) * max(1, (replicas - 1).bit_length())


@pytest.mark.parametrize("parallel,message", [
    ({"schedule": "interleaved-1f1b", "micro_batches": 4}, r"interleaved-1f1b needs parallel.virtual_stages >= 2"),
    ({"schedule": "zb-h1", "virtual_stages": 2, "micro_batches": 4}, r"virtual_stages=2 needs parallel.schedule: interleaved"),
    ({"schedule": "interleaved-1f1b", "virtual_stages": 2, "micro_batches": 3}, r"micro_batches=3 must be a multiple"),
])
def test_config_refuses_a_schedule_it_cannot_run(parallel, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({"data": {"store": "unused.zarr"}, "model": {"factory": "dasktrain.models:mlp"},
                         "train": {"batch_size": 16}, "cluster": {"workers": 2}, "parallel": {"pipeline": 2, **parallel}})
