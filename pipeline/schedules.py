"""Pipeline schedules as pure functions: which actions each pipeline rank runs in a step, in order.

An action is ``F`` (forward), ``B`` (backward) or ``W`` (weight gradient) of one micro-batch on
one *chunk* of a rank. With ``v`` virtual stages per rank (interleaved 1F1B), the model is cut into
``P * v`` virtual stages and rank ``r`` holds chunks ``c = 0..v-1``, virtual stage ``c * P + r``:
activations go round the ranks ``v`` times. Without virtual stages ``v = 1`` and the chunk is 0.

In a schedule with ``W`` actions (ZB-H1), ``B`` computes only the gradient of the chunk's input
(what the previous stage waits for) and ``W`` later the gradient of its weights, filling time a
rank would otherwise wait; elsewhere ``B`` computes both at once and there is no ``W``.

- ``gpipe``: every forward, then every backward: ``m`` activations alive per rank.
- ``1f1b``: ``P - 1 - r`` warm-up forwards, then one forward and one backward in turn: at most
  ``P - r`` activations alive; bubble ``(P - 1)(F + B)``.
- ``interleaved-1f1b`` (Megatron-LM's order; needs ``m`` a multiple of ``P``): forwards of ``P``
  micro-batches chunk after chunk; bubble ``(P - 1)(F + B) / v``.
- ``zb-h1`` (Qi et al., Zero Bubble Pipeline Parallelism, 2024): 1F1B's order of ``F`` and ``B``
  with ``W`` put off to fill the bubbles; bubble ``(P - 1)(F + B - W)``. Rank ``r`` keeps up
  to ``2P - 1 - r`` micro-batches' graphs until their ``W`` (1F1B: ``P - r``).

:func:`simulate` runs the action lists against the cross-stage dependencies with given costs:
it finds a schedule that would deadlock, and gives the bound a schedule can reach
(:func:`efficiency_bound`), against which the measured efficiency is reported.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

Kind = Literal["F", "B", "W"]
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1")


class Action(NamedTuple):
    """One step of a rank's schedule: ``kind`` of ``micro_batch`` on the rank's ``chunk``."""

    kind: Kind
    micro_batch: int
    chunk: int = 0


def splits_backward(kind: str) -> bool:
    """Whether ``kind``'s ``B`` computes the input gradient only, its ``W`` the weights'."""
    return kind == "zb-h1"


def schedule_problem(kind: str, stages: int, micro_batches: int, virtual: int) -> str | None:
    """Why ``kind`` cannot run ``stages`` ranks x ``micro_batches`` with ``virtual`` chunks (None: it can)."""
    if kind not in SCHEDULES:
        return f"unknown schedule {kind!r}; one of {', '.join(SCHEDULES)}"
    if kind == "interleaved-1f1b":
        if virtual < 2:
            return "schedule interleaved-1f1b needs parallel.virtual_stages >= 2"
        if micro_batches % stages:
            return (f"schedule interleaved-1f1b sends micro-batches round the ranks in groups of parallel.pipeline="
                    f"{stages}: parallel.micro_batches={micro_batches} must be a multiple of it")
    elif virtual != 1:
        return f"parallel.virtual_stages={virtual} needs schedule interleaved-1f1b, not {kind}"
    return None


def actions(kind: str, stages: int, micro_batches: int, virtual: int = 1) -> list[list[Action]]:
    """Every rank's actions of one step, in order: ``result[r]`` is rank ``r``'s list."""
    return [list(ops) for ops in _actions(kind, stages, micro_batches, virtual)]


@functools.cache
def _actions(kind: str, stages: int, micro_batches: int, virtual: int) -> tuple[tuple[Action, ...], ...]:
    # Computed once per shape: the engine asks for the bound of every step.
    problem = schedule_problem(kind, stages, micro_batches, virtual)
    if problem is not None:
        raise ValueError(problem)
    return tuple(tuple(ops) for ops in _lists(kind, stages, micro_batches, virtual))


def _lists(kind: str, stages: int, micro_batches: int, virtual: int) -> list[list[Action]]:
    P, m = stages, micro_batches
    if kind == "gpipe":
        return [[Action("F", j) for j in range(m)] + [Action("B", j) for j in range(m)] for _ in range(P)]
    if kind == "1f1b":
        return [_one_f_one_b(P - 1 - r, m) for r in range(P)]
    if kind == "interleaved-1f1b":
        return [_interleaved(r, P, m, virtual) for r in range(P)]
    return _zb_h1(P, m)


def _one_f_one_b(warm: int, m: int) -> list[Action]:
    warm = min(warm, m)
    ops = [Action("F", j) for j in range(warm)]
    for j in range(m - warm):
        ops += [Action("F", warm + j), Action("B", j)]
    return ops + [Action("B", j) for j in range(m - warm, m)]


def _interleaved(r: int, P: int, m: int, v: int) -> list[Action]:
    """Megatron-LM's interleaved order: the k-th forward of a rank is micro-batch
    ``(k // (P v)) P + k % P`` on chunk ``(k % (P v)) // P``; backwards alike with the chunks
    reversed; ``2 (P - 1 - r) + (v - 1) P`` warm-up forwards."""
    total = m * v

    def unit(k: int, forward: bool) -> tuple[int, int]:
        chunk = (k % (P * v)) // P
        return (k // (P * v)) * P + k % P, chunk if forward else v - 1 - chunk

    warm = total if m == P else min(2 * (P - 1 - r) + (v - 1) * P, total)
    ops = [Action("F", *unit(k, True)) for k in range(warm)]
    for k in range(total - warm):
        ops += [Action("F", *unit(warm + k, True)), Action("B", *unit(k, False))]
    return ops + [Action("B", *unit(k, False)) for k in range(total - warm, total)]


def _zb_h1(P: int, m: int) -> list[list[Action]]:
    """ZB-H1 from a unit-time simulation in which every ``F``, ``B`` and ``W`` takes one unit.
    Whenever free, rank ``r`` runs a ready ``B``; else its next ``F`` where 1F1B would (fewer
    than ``P - r`` micro-batches between ``F`` and ``B``) and fewer than ``2P - 1 - r`` await
    their ``W``; else its oldest pending ``W``. So ``F`` and ``B`` keep 1F1B's order and the
    ``W`` fill the bubbles: makespan ``3m + P - 1`` units against 1F1B's ``3(m + P - 1)``."""
    done: dict[tuple[str, int, int], int] = {}  # (kind, micro-batch, rank) -> end time
    ops: list[list[Action]] = [[] for _ in range(P)]
    next_f = [0] * P
    pending_w: list[list[int]] = [[] for _ in range(P)]
    counts = [{"B": 0, "W": 0} for _ in range(P)]
    time = 0

    def over(key: tuple[str, int, int]) -> bool:
        return done.get(key, time + 1) <= time

    while any(len(o) < 3 * m for o in ops):
        ready_b = [[j for j in range(m) if ("B", j, r) not in done and over(("F", j, r))
                    and (r == P - 1 or over(("B", j, r + 1)))] for r in range(P)]
        for r in range(P):
            j_f = next_f[r]
            f_ok = (j_f < m and (r == 0 or over(("F", j_f, r - 1)))
                    and j_f - counts[r]["B"] < P - r and j_f - counts[r]["W"] < 2 * P - 1 - r)
            if ready_b[r]:
                j, kind = ready_b[r][0], "B"
                pending_w[r].append(j)
            elif f_ok:
                j, kind = j_f, "F"
                next_f[r] += 1
            elif pending_w[r]:
                j, kind = pending_w[r].pop(0), "W"
            else:
                continue
            counts[r][kind] = counts[r].get(kind, 0) + 1
            done[(kind, j, r)] = time + 1
            ops[r].append(Action(kind, j))  # type: ignore[arg-type]
        time += 1
    return ops


@dataclass(frozen=True)
class Costs:
    """Seconds (or any unit) each action takes on one chunk; ``B`` without ``W`` is ``b + w``."""

    f: float = 1.0
    b: float = 1.0
    w: float = 1.0


def simulate(lists: Sequence[Sequence[Action]], kind: str, costs: Costs | Sequence[Costs] = Costs()) -> float:
    """Makespan of running ``lists`` (one per rank, in order, each action as soon as its input
    is there) with no transfer time; ``costs`` alike for every virtual stage or one per virtual
    stage. Raises ``ValueError`` naming a rank and action that can never run (a deadlock) or an
    action that runs twice or never."""
    P = len(lists)
    v = 1 + max((a.chunk for ops in lists for a in ops), default=0)
    m = 1 + max((a.micro_batch for ops in lists for a in ops), default=0)
    split = splits_backward(kind)
    last = P * v - 1
    for r, ops in enumerate(lists):
        expected = sorted((k, j, c) for c in range(v) for j in range(m) for k in ("FBW" if split else "FB"))
        if sorted(ops) != expected:
            raise ValueError(f"rank {r} does not run every F, B{', W' if split else ''} of {m} micro-batches "
                             f"on {v} chunk(s) exactly once")
    end: dict[tuple[str, int, int], float] = {}  # (kind, micro-batch, virtual stage) -> end time

    per_stage = [costs] * (last + 1) if isinstance(costs, Costs) else list(costs)

    def cost(kind_: str, vs: int) -> float:
        c = per_stage[vs]
        return {"F": c.f, "B": c.b if split else c.b + c.w, "W": c.w}[kind_]

    def needs(a: Action, vs: int) -> list[tuple[str, int, int]]:
        if a.kind == "F":
            return [("F", a.micro_batch, vs - 1)] if vs > 0 else []
        if a.kind == "B":
            return [("F", a.micro_batch, vs)] + ([("B", a.micro_batch, vs + 1)] if vs < last else [])
        return [("B", a.micro_batch, vs)]

    clock, pos = [0.0] * P, [0] * P
    progressed = True
    while progressed:
        progressed = False
        for r in range(P):
            while pos[r] < len(lists[r]):
                a = lists[r][pos[r]]
                vs = a.chunk * P + r
                deps = needs(a, vs)
                if any(d not in end for d in deps):
                    break
                start = max([clock[r], *(end[d] for d in deps)])
                clock[r] = end[(a.kind, a.micro_batch, vs)] = start + cost(a.kind, vs)
                pos[r] += 1
                progressed = True
    stuck = [(r, lists[r][pos[r]]) for r in range(P) if pos[r] < len(lists[r])]
    if stuck:
        raise ValueError(f"schedule {kind} deadlocks: rank {stuck[0][0]} waits forever at {stuck[0][1]}")
    return max(clock)


def efficiency_bound(kind: str, stages: int, micro_batches: int, virtual: int = 1,
                     costs: Costs | Sequence[Costs] = Costs()) -> float:
    """Busy share of ``stages`` ranks over a step of ``kind`` with these per-chunk costs (alike,
    or one per virtual stage) and free transfers: the best a measured ``pipeline_efficiency``
    can be (1F1B, GPipe with equal costs: ``m / (m + P - 1)``)."""
    lists = actions(kind, stages, micro_batches, virtual)
    per_stage = [costs] * (stages * virtual) if isinstance(costs, Costs) else list(costs)
    busy = micro_batches * sum(c.f + c.b + c.w for c in per_stage)
    return busy / (stages * simulate(lists, kind, per_stage))
