"""``reduce: collective``: gradients summed by a torch.distributed all-reduce among the workers.

The tree of Dask tasks costs a few task round trips per step; for a cluster that does not change
while it trains, a process group over the same workers sums a flat buffer in one all-reduce
(gloo on CPU, NCCL on GPU) and one Dask task per worker can run many steps. The tasks here run
on the workers:

- :func:`open_rendezvous`, on rank 0: a ``TCPStore`` on a port the OS picks now (never a fixed
  one), listening on the worker's own Dask host only (loopback in a local cluster); its address
  reaches the other ranks through the scheduler, as the task's result;
- :func:`join_group`, on every rank at once: the process group, kept on the worker beside the
  run's replica (a private group object, not torch's process-global default group, so runs never
  clash; see :mod:`dasktrain.registry`);
- :func:`run_segment`: steps ``[start, stop)`` with no task boundary between them. Each step,
  every rank computes its fused gradient, summed over the ranks in buckets launched from
  backward as each bucket is made (:class:`BucketedSum`, as torch's DDP does). The step's
  numbers (loss sum, correct count, sample count, times, and a failure flag that makes every
  rank stop at the same step when one failed) ride at the head of the same buffer, in its last
  bucket, and are summed with it. Under ``train.host_reads: step`` a rank reads them with the
  reduced gradient's sum in one host read per step, its loss values staying on the device until
  then (a non-finite loss sum, only, makes the ranks count their micro-batches exactly), and
  every rank then applies the same update, or skips or stops alike. Under ``segment`` (the
  default on a GPU) nothing is read until the segment's end: each rank decides each update on
  the device, alike, and the ranks stop at the first failed step when they read the segment's
  table. Every rank launches every bucket every step, failed or not, so no rank is left waiting
  in an all-reduce the others never start.

A lost worker leaves the others blocked until the group's timeout (``train.step_timeout``, or
:data:`DEFAULT_TIMEOUT_S`); the driver then regroups as in tree mode, with a new group.

Outside TLS: the store and the gloo/NCCL traffic are plain TCP, and the store asks nobody for
credentials; so the config refuses ``reduce: collective`` with ``cluster.security: tls``. Every
socket listens on the worker's Dask host: the store and gloo bind to it, and NCCL is kept on the
loopback interface when that host is a loopback address.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from distributed import get_worker
from distributed.comm import get_address_host
from torch import nn

from dasktrain.errors import DasktrainError, NonFiniteLossError
from dasktrain.reduce import StepStats
from dasktrain.registry import Resident
from dasktrain.replica import Replica, get_replica
from dasktrain.step_core import DeviceTally, Scored

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0
"""Seconds a rank waits for the others in one collective when ``train.step_timeout`` is unset."""


class PeerFailedError(DasktrainError):
    """Raised on the ranks whose step was fine when another rank's failed: the other rank's
    error is the one to report."""


class CollectiveGroup:
    """One rank's process group of a run's generation, and the store it met the others through."""

    def __init__(self, store: dist.Store, rank: int, size: int, host: str, device: torch.device,
                 timeout: datetime.timedelta) -> None:
        self.store = store  # rank 0's store must outlive the group: the others reach it
        self.rank = rank
        self.size = size
        self.device = device
        group: Any
        if device.type == "cuda":
            if _is_loopback(host):
                # NCCL picks its bootstrap interface itself, never lo when another one exists;
                # a worker served on loopback has all its peers on this machine.
                os.environ.setdefault("NCCL_SOCKET_IFNAME", "=lo")
            nccl_options = dist.ProcessGroupNCCL.Options()
            nccl_options._timeout = timeout
            group = dist.ProcessGroupNCCL(store, rank, size, nccl_options)
        else:
            gloo_options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
            # Bind to the address the worker serves Dask on: it is reachable from the other
            # ranks, which a container's hostname may not be.
            gloo_options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            gloo_options._timeout = timeout
            group = dist.ProcessGroupGloo(store, rank, size, gloo_options)
        self.group = group

        self.buckets: BucketedSum | None = None
        """The replica's gradient buckets, for a group of more than one rank (see :func:`join_group`)."""
        self.step: torch.Tensor | None = None
        """The rank's step buffer: the step's numbers (:data:`SLOTS`), then the gradients and the
        running statistics, which the replica accumulates into (see :func:`join_group`)."""

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it (as it is, for a group of one)."""
        if self.size > 1:
            self.group.allreduce([tensor]).wait()
        return tensor

    def close(self) -> None:
        """Release the group's connections (a regroup makes a new one) and its gradient hooks."""
        if self.buckets is not None:
            self.buckets.close()
        shutdown = getattr(self.group, "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except RuntimeError:  # peers already gone: nothing left to close politely
                pass


FIRST_BUCKET_BYTES = 2**20
"""The first bucket's size, as DDP's (``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES``): small,
so that the first all-reduce starts early in backward."""


class BucketedSum:
    """One rank's gradient all-reduce, cut in buckets, each launched as soon as backward has made it.

    ``buffer`` holds ``head`` entries of the step's own numbers, then the parameters' gradients,
    then what else the step sums (running statistics). A bucket is a run of parameters in the
    reverse order of the model's (about the order in which backward finishes them), so each is
    one contiguous slice of the buffer. As in torch's DDP, a bucket closes with the parameter
    that brings it to ``cap_bytes`` (``train.bucket_mb``), the first one at
    :data:`FIRST_BUCKET_BYTES` already: the last layers' gradients then travel while backward
    still works through the first layers. The last bucket, whose gradients backward makes last,
    also takes the head, so the step's numbers cost no all-reduce of their own: :meth:`finish`
    launches it, once the rank has written them. Every step, every rank launches every bucket
    once, in bucket order: one that backward finishes early waits for the ones before it, and
    what backward did not reach (a parameter the step did not use, a step that failed or was
    voided) is launched by :meth:`finish`. Ranks thus always pair their all-reduces, whatever
    happened on one of them; the sums are the same as one all-reduce of the whole buffer,
    element by element.

    Hooks (``register_post_accumulate_grad_hook``) fire for every backward pass; they only count
    during the step's last one (:meth:`last_backward`), when each parameter's gradient is whole.
    """

    def __init__(self, group: CollectiveGroup, params: list[nn.Parameter], buffer: torch.Tensor, head: int,
                 cap_bytes: int) -> None:
        self.group = group
        self.buffer = buffer
        offsets = [head]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        self.spans: list[tuple[int, int]] = []
        """Each bucket's slice of the flat buffer, in launch order (from the buffer's end)."""
        self.members: list[int] = []
        bucket_of: dict[int, int] = {}
        closed = True
        for i in reversed(range(len(params))):
            lo, hi = offsets[i], offsets[i + 1]
            if closed:
                self.spans.append((lo, hi))
                self.members.append(1)
            else:
                self.spans[-1] = (lo, self.spans[-1][1])
                self.members[-1] += 1
            bucket_of[i] = len(self.spans) - 1
            limit = min(FIRST_BUCKET_BYTES, cap_bytes) if len(self.spans) == 1 else cap_bytes
            closed = 4 * (self.spans[-1][1] - self.spans[-1][0]) >= limit  # fp32 gradients
        # The head and what follows the gradients (running-statistics updates) are whole only
        # once the step ends, so :meth:`finish` launches them: the head in the last bucket, which
        # backward finishes last anyway. A model of one bucket sends all of it in that bucket,
        # one all-reduce per step; with more, running statistics are a small all-reduce of their own.
        width = len(buffer)
        self.tail: tuple[int, int] | None = None
        self.hooked = len(self.spans) - 1
        """Buckets before this one are launched by the hooks; the others by :meth:`finish`."""
        if len(self.spans) <= 1:
            self.spans, self.members, self.hooked = [(0, width)], [len(params)], 0
        else:
            self.spans[-1] = (0, self.spans[-1][1])
            if width > offsets[-1]:
                self.tail = (offsets[-1], width)
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(bucket_of[i]))
                       for i, p in enumerate(params)] if self.hooked else []  # one bucket: no hooks to run
        self._armed = False
        self._missing: list[int] = []
        self._next = 0
        self._works: list[Any] = []

    def begin(self) -> None:
        """A new step: no bucket made, none launched."""
        self._armed, self._missing, self._next, self._works = False, list(self.members), 0, []

    def last_backward(self, flat: torch.Tensor) -> None:
        # ``flat`` is the buffer's body (``run_segment`` checks it, every step, for any group size).
        self._armed = True

    def finish(self) -> list[Any]:
        """Launch every bucket not launched yet (in order), then the tail; returns the step's
        pending all-reduces."""
        self._launch(len(self.spans))
        if self.tail is not None:
            self._works.append(self.group.group.allreduce([self.buffer[self.tail[0]:self.tail[1]]]))
        works, self._works, self._armed = self._works, [], False
        return works

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _hook(self, bucket: int) -> Any:
        def made(_: torch.Tensor) -> None:
            if not self._armed:  # not the step's last backward pass
                return
            self._missing[bucket] -= 1
            if self._missing[bucket] == 0:
                ready = self._next
                while ready < self.hooked and self._missing[ready] <= 0:
                    ready += 1
                self._launch(ready)
        return made

    def _launch(self, upto: int) -> None:
        while self._next < upto:
            lo, hi = self.spans[self._next]
            self._works.append(self.group.group.allreduce([self.buffer[lo:hi]]))
            self._next += 1


_DEVICE_SLOTS = ("loss_sum", "correct", "nonfinite")
"""Step numbers summed on the device, in :class:`~dasktrain.step_core.DeviceTally`'s order: it
adds to the first two every micro-batch; the count of non-finite losses is written by its
:meth:`~dasktrain.step_core.DeviceTally.settle` (``host_reads: segment``), else stays 0."""
_TALLIED = 2
_HOST_SLOTS = ("count", "chunks_read", "data_wait_s", "compute_s")
"""Step numbers the rank knows on the host; the last slot after them says whether its step failed."""
_FAILED = len(_DEVICE_SLOTS) + len(_HOST_SLOTS)
_NONFINITE, _COUNT = len(_DEVICE_SLOTS) - 1, len(_DEVICE_SLOTS)
SLOTS = 16
"""Entries before the gradients in a rank's step buffer: the step's numbers (up to
:data:`_FAILED`, then zeros), summed over the ranks in the gradients' last bucket (see
:class:`BucketedSum`), and read to the host with the reduced gradient's sum, once per step or
once per segment (``train.host_reads``). 16 fp32 entries are 64 bytes: the gradients after them
start on a cache line, as a tensor of their own would."""

_GROUPS: Resident[CollectiveGroup] = Resident("process group", CollectiveGroup.close)
"""The process group of each run this worker is a rank of (freed with the run's replica)."""
_RENDEZVOUS: Resident[tuple[dist.TCPStore, int]] = Resident("rendezvous store")
"""On rank 0 of a run: the store the ranks meet through, and the generation it was made for."""


def _timeout(seconds: float | None) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds or DEFAULT_TIMEOUT_S)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return host == "localhost"


def _store_server(host: str, timeout: datetime.timedelta) -> dist.TCPStore:
    """A ``TCPStore`` server listening on ``host`` alone, on a port the OS picks.

    Given only a port, torch's store listens on every interface; so the socket is bound here and
    handed over (``master_listen_fd``, Linux only), and the store owns it from then on."""
    if sys.platform != "linux":
        log.warning("the TCPStore of reduce: collective listens on every interface on %s "
                    "(binding it to %s needs Linux)", sys.platform, host)
        return dist.TCPStore(host, 0, None, True, timeout, wait_for_workers=False)
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(socket.SOMAXCONN)
        store = dist.TCPStore(host, sock.getsockname()[1], None, True, timeout, wait_for_workers=False,
                              master_listen_fd=sock.fileno(), use_libuv=True)
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store closes the descriptor
    return store


def open_rendezvous(run_id: str, generation: int, timeout_s: float | None) -> tuple[str, int]:
    """Dask task on rank 0: host a store on a free port of this worker's Dask host (no other
    interface); returns ``(host, port)`` for the others."""
    get_replica(run_id)  # only a worker holding the run's replica hosts its rendezvous
    host = get_address_host(get_worker().address)
    store = _store_server(host, _timeout(timeout_s))
    _RENDEZVOUS.put(run_id, (store, generation))
    return host, int(store.port)


def join_group(run_id: str, generation: int, rank: int, size: int, master: tuple[str, int],
               timeout_s: float | None) -> dict[str, Any]:
    """Dask task on every rank, all at once: join the run's process group for ``generation``."""
    replica = get_replica(run_id)
    timeout = _timeout(timeout_s)
    store: dist.Store | None
    if rank == 0:
        store, made_for = _RENDEZVOUS.find(run_id) or (None, None)
        if store is None or made_for != generation:
            raise DasktrainError(f"rank 0 of run {run_id} has no rendezvous store for generation {generation}")
    else:
        store = dist.TCPStore(master[0], master[1], None, False, timeout)
    prefixed = dist.PrefixStore(f"{run_id}/g{generation}", store)
    host = get_address_host(get_worker().address)
    _GROUPS.discard(run_id)  # the previous generation's group
    group = CollectiveGroup(prefixed, rank, size, host, replica.place.device, timeout)
    group.store = store
    # A segment's step sums and applies its buffer before the next step: one buffer serves all,
    # the step's numbers (SLOTS) first, then what the replica accumulates into, summed together.
    group.step = replica.place.zeros(SLOTS + replica.width)
    if size > 1:
        cap = int(replica.spec.config.train.bucket_mb * 2**20)
        group.buckets = BucketedSum(group, replica.params, group.step, SLOTS, cap)
    replica.grad_sink = group.buckets
    replica.step_buffer = group.step[SLOTS:]
    # Read once per segment, the step's loss numbers are summed by the tally's settle() alone.
    replica.tally = DeviceTally(None if replica.reads_per_segment else group.step[:_TALLIED])
    _GROUPS.put(run_id, group)
    return {"rank": rank, "size": size, "backend": "nccl" if replica.place.device.type == "cuda" else "gloo"}


@dataclass(frozen=True)
class SegmentEnd:
    """What a segment does after its last update: validate (and, on the writer, checkpoint)."""

    validate: bool = False
    checkpoint: dict[str, Any] | None = None


def run_segment(run_id: str, start: int, stop: int, end: SegmentEnd, after: Any = None) -> dict[str, Any]:
    """Dask task on every rank: steps ``[start, stop)``, each computed, all-reduced and applied.

    ``after`` is the rank's previous segment (a dependency only, so Dask runs segments in order).
    Returns per-step stats, summed over the ranks (times: the mean over ranks, plus the time
    this rank spent in the all-reduces), and the validation sums when ``end.validate``.
    """
    replica = get_replica(run_id)
    group = _GROUPS.find(run_id)
    if group is None or group.step is None:
        raise DasktrainError(f"this worker's replica of run {run_id} has joined no process group")
    with replica.lock:
        if replica.applied != start:
            raise DasktrainError(f"replica out of step: asked for segment {start}-{stop} after {replica.applied} updates")
        steps = _steps_read_per_segment(replica, group, start, stop) if replica.reads_per_segment \
            else _steps_read_per_step(replica, group, start, stop)
        result: dict[str, Any] = {"steps": steps, "val": None}
        if end.validate:
            val = StepStats()
            replica.validate(val)
            names = [name for name, _, _ in replica.core.metric_fns]  # the config's order, alike on every rank
            metric_sums = [x for name in names for x in val.val_metrics.get(name, [0.0, 0.0])]
            vector = torch.tensor([val.val_loss_sum, val.val_count, val.val_correct, *metric_sums],
                                  dtype=torch.float64, device=group.device)
            group.sum_(vector)
            loss, count, correct, *summed_metrics = vector.tolist()
            # float64 sums: exact for whole counts, and a sequence's token accuracy is a fraction
            result["val"] = {"val_loss_sum": loss, "val_count": round(count), "val_correct": correct,
                             "val_metrics": {name: summed_metrics[2 * i : 2 * i + 2] for i, name in enumerate(names)}}
        if end.checkpoint is not None:
            replica.write_checkpoint(stop, end.checkpoint)
        return result


def _steps_read_per_step(replica: Replica, group: CollectiveGroup, start: int, stop: int) -> list[dict[str, Any]]:
    """Steps ``[start, stop)``, each ending in one host read of its summed numbers, from which
    every rank decides its update (``train.host_reads: step``)."""
    assert group.step is not None and replica.tally is not None
    slots, body = group.step[:SLOTS], group.step[SLOTS:]
    steps = []
    width = replica.width
    for t in range(start, stop):
        began = time.perf_counter()
        stats = StepStats()
        failure: Exception | None = None
        if group.buckets is not None:
            group.buckets.begin()
        try:
            grads = replica.local_grads(t, stats)  # launches the gradient buckets as backward makes them
            (flat,) = grads.values()
            if flat.data_ptr() != body.data_ptr():
                raise DasktrainError("the replica's step accumulated outside the group's step buffer")
        except Exception as exc:  # every rank must reach the all-reduces below, failed or not
            # What the buffer holds is summed all the same, and no rank applies it.
            failure = exc
        reduce_began = time.perf_counter()
        # The tallied slots were added to by the step's micro-batches; the host's go after them.
        _write_host_slots(slots, stats, failure)
        _sum_step(group)
        # The step's one host read: its summed numbers and the reduced gradient's sum.
        read = torch.cat((slots, body[:width].sum().reshape(1))).tolist()
        summed, failed, total = dict(zip(_DEVICE_SLOTS + _HOST_SLOTS, read[:_FAILED])), read[_FAILED], read[-1]
        if failure is not None:
            raise failure
        if failed:
            raise PeerFailedError(f"global step {t} failed on another worker of the process group; "
                                  "its error is the one this run reports")
        if not math.isfinite(summed["loss_sum"]):
            # Some rank's loss was not finite (every rank sees the same sum): count as the
            # micro-batches' own policy does, and sum those counts too.
            exact = group.sum_(torch.tensor(replica.tally.exact(), dtype=torch.float64, device=group.device))
            summed["loss_sum"], summed["correct"], summed["nonfinite"] = exact.tolist()
        reduced_s = time.perf_counter() - reduce_began
        step_stats = _step_stats(summed, group.size)
        if step_stats.nonfinite and replica.spec.config.train.on_nan == "stop":
            first = replica.tally.first_nonfinite()
            _stop_on_nonfinite(replica, t, None if first is None else first[0])
        replica.apply_sum(t, body[:width], step_stats, total)
        record = step_stats.as_dict()
        record.update(reduce_s=reduced_s, step_time_s=time.perf_counter() - began)
        steps.append(record)
    return steps


def _steps_read_per_segment(replica: Replica, group: CollectiveGroup, start: int, stop: int) -> list[dict[str, Any]]:
    """Steps ``[start, stop)`` with no host read between them (``train.host_reads: segment``).

    Each step's numbers are summed as in :func:`_steps_read_per_step`, then kept on the device,
    in a table read once, after the last step. Each update is decided on the device: skipped
    when a loss or the reduced gradient was not finite (``found_inf`` of the fused optimizer),
    and every update from a failed step on, under a flag that stays set once a rank has failed
    (or, under ``on_nan: stop``, a step was not finite). A rank whose step failed goes on
    joining every all-reduce of the segment without computing, so no rank waits on it. When the
    table is read, the ranks stop at that first step, alike, as :func:`_steps_read_per_step`
    would have: the weights and the optimizer's state are those before it, and no checkpoint
    is written. The steps after it were computed for nothing: at most one segment's worth.
    Should an all-reduce itself fail (a rank lost), the steps done so far are read and recorded
    before the error goes on, so the replica's step count matches its weights for a regroup."""
    assert group.step is not None and replica.tally is not None
    slots, body = group.step[:SLOTS], group.step[SLOTS:]
    width = replica.width
    device = group.device
    # Per step: the summed slots and the reduced gradient's sum (float64: a large finite sum does
    # not overflow to infinity), then this rank's own non-finite count and first non-finite loss.
    table = torch.zeros(stop - start, SLOTS + 3, dtype=torch.float64, device=device)
    own = torch.zeros(stop - start, 2, device=device)
    halted = torch.zeros((), dtype=torch.bool, device=device)
    stop_on_nan = replica.spec.config.train.on_nan == "stop"
    failure: Exception | None = None
    times: list[tuple[float, float]] = []
    try:
        for i, t in enumerate(range(start, stop)):
            began = time.perf_counter()
            stats = StepStats()
            if group.buckets is not None:
                group.buckets.begin()
            if failure is None:
                try:
                    (flat,) = replica.local_grads(t, stats).values()
                    if flat.data_ptr() != body.data_ptr():
                        raise DasktrainError("the replica's step accumulated outside the group's step buffer")
                    replica.tally.settle(slots[:_COUNT], own[i, 1])
                    own[i, 0] = slots[_NONFINITE]
                except Exception as exc:  # this rank joins the segment's all-reduces all the same
                    failure = exc
            if failure is not None:
                slots[:_COUNT].zero_()
            reduce_began = time.perf_counter()
            _write_host_slots(slots, stats, failure)
            _sum_step(group)
            table[i, :SLOTS] = slots
            table[i, SLOTS] = body[:width].sum(dtype=torch.float64)
            if failure is None:
                bad = (slots[_NONFINITE] > 0) | ~torch.isfinite(table[i, SLOTS])
                stop_here = (slots[_FAILED] > 0) | bad if stop_on_nan else slots[_FAILED] > 0
                torch.logical_or(halted, stop_here, out=halted)
                replica.apply_sum_unless(t, body[:width], slots[_COUNT], halted | bad)
            times.append((time.perf_counter() - reduce_began, time.perf_counter() - began))
    except BaseException:
        table[:, SLOTS + 1:] = own
        _read_segment(replica, group, start, table[: len(times)], times, failure)  # raises the first stop, if any
        raise
    table[:, SLOTS + 1:] = own
    return _read_segment(replica, group, start, table, times, failure)


def _read_segment(replica: Replica, group: CollectiveGroup, start: int, table: torch.Tensor,
                  times: list[tuple[float, float]], failure: Exception | None) -> list[dict[str, Any]]:
    """Read the table of :func:`_steps_read_per_segment` (its one host read) and record its
    steps on the replica up to the first that stopped the ranks, whose error is raised; returns
    the steps' records when none did."""
    stop_on_nan = replica.spec.config.train.on_nan == "stop"
    steps = []
    for i, row in enumerate(table.tolist()):
        t = start + i
        if row[_FAILED]:
            if failure is not None:
                raise failure
            raise PeerFailedError(f"global step {t} failed on another worker of the process group; "
                                  "its error is the one this run reports")
        step_stats = _step_stats(dict(zip(_DEVICE_SLOTS + _HOST_SLOTS, row[:_FAILED])), group.size)
        if stop_on_nan and step_stats.nonfinite:
            _stop_on_nonfinite(replica, t, row[SLOTS + 2] if row[SLOTS + 1] else None)
        if stop_on_nan and not math.isfinite(row[SLOTS]):
            raise NonFiniteLossError(f"the gradient of {replica.core.where(t)} is not finite; the update was not applied")
        replica.note_applied(t, step_stats)
        record = step_stats.as_dict()
        record.update(reduce_s=times[i][0], step_time_s=times[i][1])
        steps.append(record)
    return steps


def _write_host_slots(slots: torch.Tensor, stats: StepStats, failure: Exception | None) -> None:
    """Write the step's numbers the rank knows on the host, and whether its step failed, into
    ``slots`` (from :data:`_COUNT` on, which the caller zeroed or leaves at zero)."""
    host = [float(getattr(stats, name)) for name in _HOST_SLOTS] + [1.0 if failure else 0.0]
    slots[_COUNT:].zero_()
    for i, value in enumerate(host, start=_COUNT):
        if value:
            slots[i].fill_(value)  # a kernel: no host-to-device copy to wait for


def _sum_step(group: CollectiveGroup) -> None:
    """Launch the step's buckets not launched yet, and wait for all of them."""
    for work in group.buckets.finish() if group.buckets is not None else []:
        work.wait()


def _step_stats(totals: dict[str, float], ranks: int) -> StepStats:
    """The ranks' step numbers from their all-reduced sums: counts as integers, times as the mean
    over ranks (a rank's time is the step's), the rest as sums."""
    values: dict[str, Any] = {}
    for f in fields(StepStats):
        if f.name not in totals:
            continue
        total = totals[f.name]
        if f.name in StepStats._MAX:
            values[f.name] = total / ranks
        elif isinstance(f.default, int):
            values[f.name] = round(total)
        else:
            values[f.name] = total
    return StepStats(**values)


def _stop_on_nonfinite(replica: Replica, t: int, first_loss: float | None) -> None:
    """``on_nan: stop`` when step ``t``'s loss was not finite on some rank: the rank where it was
    (``first_loss``: its first non-finite loss there, None elsewhere) names it, the others report
    a peer's failure."""
    if first_loss is not None:
        replica.core.admit_loss(Scored(torch.tensor(first_loss), first_loss, 0.0), 0, StepStats(), t,
                                f" on shards {list(replica.spec.shards)}")  # raises, under on_nan: stop
    raise PeerFailedError(f"the loss of global step {t} was not finite on another worker of the process group; "
                          "its error is the one this run reports")
