"""Build one pipeline stage in place: only its layers are allocated, with the whole model's initial values.

Why: pipeline parallelism is for models too large for one worker, so no process may build the
whole model. Yet every stage must start from exactly (bitwise) the values the whole model built on
the CPU from the seed would hold, or pipeline runs would not match data-parallel or single-process
ones. Those values depend on the order in which the model's construction draws from torch's
global generator: a stage's layers sit somewhere in that stream.

How: the factory runs once on the ``meta`` device (no memory, no computation) under a dispatch
recorder that logs every ATen call it makes: tensor creations, views, the in-place initialisers
(``uniform_``, ``normal_``, ``fill_``, ``zero_``...), whether a module's ``reset_parameters`` or
the factory itself (``transformer_lm``'s GPT-2 init) called them. Then the log is *replayed* on the
CPU from the seeded generator, in order:

- a call that writes a tensor this stage keeps (or one such a tensor is later computed from) runs
  for real;
- a random call on anything else still runs, on a scratch tensor of the same shape, so the
  generator advances by exactly the draws the whole model made there (``uniform_`` in chunks of
  :data:`SCRATCH_ELEMENTS`: it draws one number per element, so chunking draws the same numbers);
- everything else is skipped.

A stage therefore holds its own layers plus, briefly, one scratch buffer. What the recorder cannot
replay (a random call with a generator of its own, a factory that reseeds or draws on the CPU
itself, a tensor kept in a plain module attribute, one computed from values never recorded) makes :func:`build_stage` fall back to building the whole model
and keeping the stage's layers, with a warning: the same values, without the memory saving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

log = logging.getLogger(__name__)

SCRATCH_ELEMENTS = 1 << 20
"""Scratch buffer (elements) skipped ``uniform_`` calls draw into, a piece at a time: 4 MiB of fp32."""


class NotReplayable(Exception):
    """The factory did something the replay cannot reproduce without building the whole model."""


@dataclass
class _Call:
    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: Any
    reads: set[int] = field(default_factory=set)
    """Storages of the tensors the call takes."""
    writes: set[int] = field(default_factory=set)
    """Storages the call creates (its outputs) or mutates in place."""
    random: bool = False
    mutated: list[torch.Tensor] = field(default_factory=list)
    """The tensors the call writes in place."""


def _storage(t: torch.Tensor) -> int:
    return int(t.untyped_storage()._cdata)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


class _Recorder(TorchDispatchMode):
    """Logs every ATen call made on the meta device, keeping its tensors alive (their storage
    ids then stay unique for the whole recording)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[_Call] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        call = _Call(func, args, kwargs, out)
        call.random = any(a.name == "generator" for a in schema.arguments)
        if call.random and kwargs.get("generator") is not None:
            raise NotReplayable(f"{func} draws from a generator of its own")
        mutated = [args[i] if i < len(args) else kwargs.get(a.name)
                   for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
        for t in _tensors((args, kwargs)):
            call.reads.add(_storage(t))
        call.mutated = _tensors(mutated)
        call.writes = {_storage(t) for t in call.mutated + _tensors(out)}
        self.calls.append(call)
        return out


@dataclass
class Recording:
    """The model built on the meta device, and the ATen calls its construction made, in order."""

    model: Any
    calls: list[_Call]


def record(build: Callable[[], Any]) -> Recording:
    """Run ``build`` (a model factory) on the meta device, logging its calls. Raises
    :class:`NotReplayable` when the factory moved torch's CPU generator itself (reseeded it, or
    drew on the CPU): meta calls never do, so the replay would not see those draws."""
    recorder = _Recorder()
    with torch.random.fork_rng(devices=[]):
        before = torch.random.get_rng_state()
        with torch.device("meta"), recorder:
            model = build()
        if not torch.equal(before, torch.random.get_rng_state()):
            raise NotReplayable("the factory seeds or draws from torch's CPU generator itself")
    return Recording(model, recorder.calls)


def _owned_tensors(modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    tensors: list[torch.Tensor] = []
    for module in modules:
        for sub in module.modules():
            tensors += [p for p in sub._parameters.values() if p is not None]
            tensors += [b for b in sub._buffers.values() if b is not None]
            for name, value in vars(sub).items():
                if isinstance(value, torch.Tensor) and name not in ("_parameters", "_buffers"):
                    raise NotReplayable(f"{type(sub).__name__}.{name} is a tensor outside parameters and buffers")
    return tensors


def _needed(calls: Sequence[_Call], keep: set[int]) -> list[bool]:
    """Which calls the kept storages depend on: walking back from the end, a call that writes a
    needed storage is needed, and so are the storages it reads."""
    needed = [False] * len(calls)
    wanted = set(keep)
    for i in range(len(calls) - 1, -1, -1):
        if calls[i].writes & wanted:
            needed[i] = True
            wanted |= calls[i].reads
    return needed


def replay(recording: Recording, modules: Sequence[nn.Module], seed: int,
           scratch_elements: int = SCRATCH_ELEMENTS) -> None:
    """Give ``modules`` (part of ``recording.model``, on meta) their initial values, on the CPU,
    as the whole model built from ``seed`` has them. Raises :class:`NotReplayable`."""
    owned = _owned_tensors(modules)
    needed = _needed(recording.calls, {_storage(t) for t in owned})
    real: dict[int, torch.Tensor] = {}
    """Storage id on meta -> the CPU tensor that owns the whole storage."""

    def to_real(x: Any) -> Any:
        if isinstance(x, torch.device) and x.type == "meta":
            return torch.device("cpu")
        if not isinstance(x, torch.Tensor) or not x.is_meta:
            return x
        base = real.get(_storage(x))
        if base is None or base.dtype != x.dtype:
            raise NotReplayable("a kept tensor is computed from one the replay never made")
        if base.shape == x.shape and base.stride() == x.stride() and base.storage_offset() == x.storage_offset():
            return base
        return base.as_strided(x.shape, x.stride(), x.storage_offset())

    def to_scratch(x: Any) -> Any:
        if isinstance(x, torch.device) and x.type == "meta":
            return torch.device("cpu")
        if isinstance(x, torch.Tensor) and x.is_meta:
            return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
        return x

    scratch: dict[torch.dtype, torch.Tensor] = {}
    """One buffer per dtype that skipped ``uniform_`` calls draw into, piece by piece."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for call, need in zip(recording.calls, needed):
            if need:
                for t in call.mutated:
                    if _storage(t) not in real and _overwrites(call, t):
                        # Made without an ATen call of its own (``torch.tensor(0)`` on meta), then set whole.
                        real[_storage(t)] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
                args, kwargs = tree_map(to_real, (call.args, call.kwargs))
                out = call.func(*args, **kwargs)
                for meta_t, real_t in zip(_tensors(call.out), _tensors(out)):
                    real.setdefault(_storage(meta_t), real_t)
            elif call.random:
                _advance(call, scratch_elements, scratch, to_scratch)
    memo: dict[int, torch.Tensor] = {}
    for module in modules:
        for sub in module.modules():
            for name, p in sub._parameters.items():
                if p is not None:
                    if id(p) not in memo:
                        memo[id(p)] = nn.Parameter(to_real(p), requires_grad=p.requires_grad)
                    sub._parameters[name] = memo[id(p)]  # type: ignore[assignment]
            for name, b in sub._buffers.items():
                if b is not None:
                    sub._buffers[name] = memo.setdefault(id(b), to_real(b))


OVERWRITING = {torch.ops.aten.zero_.default, torch.ops.aten.fill_.Scalar, torch.ops.aten.uniform_.default,
               torch.ops.aten.normal_.default}
"""In-place calls that set every element of their target, whatever it held."""


def _overwrites(call: _Call, t: torch.Tensor) -> bool:
    """Whether ``call`` sets every byte of ``t``'s storage."""
    whole = t.storage_offset() == 0 and t.is_contiguous() and t.numel() * t.element_size() == t.untyped_storage().nbytes()
    return call.func in OVERWRITING and whole


def _advance(call: _Call, scratch_elements: int, scratch: dict[torch.dtype, torch.Tensor],
             to_scratch: Callable[[Any], Any]) -> None:
    """Draw what ``call`` drew, into scratch memory, so the generator moves on as it did."""
    target = call.args[0] if call.args else None
    if (call.func is torch.ops.aten.uniform_.default and isinstance(target, torch.Tensor)
            and target.dtype in (torch.float32, torch.float64) and target.is_contiguous()
            and target.numel() > scratch_elements):
        low = call.args[1] if len(call.args) > 1 else call.kwargs.get("from", 0.0)
        high = call.args[2] if len(call.args) > 2 else call.kwargs.get("to", 1.0)
        buffer = scratch.setdefault(target.dtype, torch.empty(scratch_elements, dtype=target.dtype))
        left = target.numel()
        while left > 0:
            n = min(left, scratch_elements)
            buffer[:n].uniform_(low, high)
            left -= n
        return
    args, kwargs = tree_map(to_scratch, (call.args, call.kwargs))
    call.func(*args, **kwargs)
