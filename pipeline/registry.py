"""What a worker process keeps for the runs it serves between their tasks, by run id.

This is the project's only global mutable state: a run's :class:`~dasktrain.replica.Replica`
(model, optimizer, data feed) and, with ``reduce: collective``, its process group and rank 0's
rendezvous store. Each kind is one :class:`Resident` table, made by the module that owns the
kind (the replica module its replicas, the collective module its groups), so that the collective
module can use a run's replica while the replica module knows nothing of the collective one.
:func:`release` frees all that a worker keeps for a run, whatever the kinds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

from dasktrain.errors import DasktrainError

T = TypeVar("T")


class Resident(Generic[T]):
    """One kind of worker-resident object, at most one per run; ``close`` frees one."""

    tables: ClassVar[list[Resident[Any]]] = []
    """Every table made in this process, for :func:`release`."""

    def __init__(self, what: str, close: Callable[[T], object] = lambda item: None) -> None:
        self.what = what
        """What the table holds, as errors name it ("replica", "process group")."""
        self._close = close
        self._items: dict[str, T] = {}
        Resident.tables.append(self)

    def get(self, run_id: str) -> T:
        """The object of ``run_id``; a clear error when this worker holds none."""
        try:
            return self._items[run_id]
        except KeyError:
            raise DasktrainError(f"this worker holds no {self.what} of run {run_id} (was it restarted?)") from None

    def find(self, run_id: str) -> T | None:
        """The object of ``run_id``, or None."""
        return self._items.get(run_id)

    def put(self, run_id: str, item: T) -> None:
        """Keep ``item`` for ``run_id``; the caller has freed any it replaces (see :meth:`pop`)."""
        self._items[run_id] = item

    def pop(self, run_id: str) -> T | None:
        """Take the object of ``run_id`` out, unfreed (the caller frees it, e.g. under its lock)."""
        return self._items.pop(run_id, None)

    def discard(self, run_id: str) -> bool:
        """Free and forget the object of ``run_id``; whether there was one."""
        item = self._items.pop(run_id, None)
        if item is not None:
            self._close(item)
        return item is not None


def release(run_id: str) -> None:
    """Free everything this worker keeps for ``run_id``, in the order the tables were made."""
    for table in Resident.tables:
        table.discard(run_id)
