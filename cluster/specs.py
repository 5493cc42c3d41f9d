"""Turn a :class:`ClusterConfig` into a running cluster and a connected ``Client``.

Launching is left to Dask's own classes (LocalCluster, dask-cuda's LocalCUDACluster, the
dask-jobqueue clusters); this module maps a spec onto them, waits for the workers, and closes
whatever it started on every exit path. Every failure is one :class:`ClusterError` sentence that
names the spec file and the field to change (a batch system's refusal: in its own words).

Jobqueue kinds: the class gets the spec merged onto the site's ``jobqueue.<kind>`` config
(:mod:`dasktrain.cluster.jobqueue`); the jobs are submitted and their submission awaited, and the
run may start once ``start_with`` workers (``train.min_workers``) are up: later jobs join it.

Where things listen: in a local cluster every socket (scheduler, nannies, workers, and the HTTP
servers of the scheduler and the workers) is bound to the loopback address, so nothing answers
from the network. A jobqueue cluster's scheduler and workers listen where dask-jobqueue puts them
(``jobqueue.interface``, or ``scheduler_options``); its scheduler's HTTP server listens on every
interface only when the spec asks for a dashboard.

Where the user's code comes from: the worker processes of a local cluster are spawned from this
process and start with its ``sys.path`` (multiprocessing's ``spawn`` hands it over, and a nanny
restarting a worker spawns it again from here), so a module the driver imports, from the working
directory the CLI put first, they import too; no ``PYTHONPATH`` is needed or set. Workers started
elsewhere get it from their own path or from ``model.upload`` (:mod:`dasktrain.cluster.upload`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dask.config
from distributed import Client, LocalCluster, Security
from distributed.core import Status
from distributed.deploy import Cluster

from dasktrain.cluster.jobqueue import JobqueuePlan, job_script, jobs_for, plan_jobqueue
from dasktrain.cluster.tls import cluster_security
from dasktrain.config import JOBQUEUE_KINDS, ClusterConfig, RunConfig
from dasktrain.errors import ClusterError

log = logging.getLogger(__name__)


def workers_to_start(config: RunConfig) -> int:
    """Workers a run of ``config`` can start training with: ``train.min_workers``, and at least one
    per pipeline stage of every replica (a pipeline's shape is fixed when it starts)."""
    stages = config.parallel.pipeline * config.parallel.data if config.parallel.pipeline > 1 else 1
    return max(config.train.min_workers, stages)


@contextmanager
def open_cluster(spec: ClusterConfig, start_with: int | None = None) -> Iterator[Client]:
    """Start (or, for ``address``, connect to) the cluster ``spec`` describes and yield a client
    once its workers have arrived. A cluster started here is closed, and its batch jobs cancelled,
    however the block is left; a cluster reached by address is left running.

    ``start_with``: on jobqueue kinds, yield once this many workers are up (a run's
    ``train.min_workers``); the jobs still queued join later, and a run takes them over at a step
    boundary. Local clusters start all their workers at once, and are waited for whole."""
    security = cluster_security(spec)
    if spec.kind == "address":
        with _connect(spec, security) as client:
            yield client
        return
    cluster, workers = _start(spec, security)
    try:
        with Client(cluster, timeout=spec.wait_timeout) as client:
            need = min(workers, start_with) if start_with and spec.kind in JOBQUEUE_KINDS else workers
            _wait_for_workers(client, cluster, spec, workers, need)
            yield client
    finally:
        cluster.close()


WORKER_ENVIRON = {"MALLOC_ARENA_MAX": "1"}
"""Environment every worker process dasktrain starts gets (besides Dask's own): one glibc arena,
so that the thread a worker trains in allocates from the main heap, as a plain PyTorch loop does
(see :mod:`dasktrain.allocator` for what the per-thread arenas cost)."""

LOOPBACK = "127.0.0.1"
"""The host every socket of a local cluster is bound to."""

LOOPBACK_HTTP = f"{LOOPBACK}:0"
"""The scheduler's HTTP server in a local cluster (and, without a dashboard, in every cluster):
loopback only, on a free port, so it clashes with no other cluster on the default one."""

NO_DASHBOARD_CONFIG = {
    "distributed.scheduler.http.routes": ["distributed.http.health"],
    "distributed.worker.http.routes": ["distributed.http.health"],
}
"""Dask settings of ``cluster.dashboard: false``. Dask starts the HTTP server of the scheduler and
of every worker whatever the dashboard setting (there is no switch to turn them off); without a
dashboard they serve ``/health`` alone: no ``/metrics``, no pages about the workers, their
tasks or their logs."""

LEAN_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "500ms",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "1s",
}
"""Dask settings of ``cluster.lean`` (see its docstring)."""


def _start(spec: ClusterConfig, security: Security | None) -> tuple[Cluster, int]:
    # The scheduler reads its config when it starts (in this process, for every kind); nannies
    # hand theirs to the workers they start, now and on a restart: their environment too.
    settings = {**(LEAN_CONFIG if spec.lean else {}), **({} if spec.dashboard else NO_DASHBOARD_CONFIG),
                **{f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_ENVIRON.items()}}
    with dask.config.set(settings), _workers_ignore_sigint():
        return _start_kind(spec, security)


@contextmanager
def _workers_ignore_sigint() -> Iterator[None]:
    """Start local worker processes with SIGINT ignored (a disposition a new process inherits, and
    Python keeps when it finds it at start-up). Ctrl-C in a terminal signals the whole process
    group: the driver alone should handle it, stopping the run and closing the cluster in order,
    not every worker dying mid-step with its own traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _start_kind(spec: ClusterConfig, security: Security | None) -> tuple[Cluster, int]:
    if spec.kind == "local":
        workers = spec.workers or 2
        try:
            # Loopback for every socket. The workers' HTTP servers follow their host (no
            # worker_dashboard_address); the scheduler's runs even without a dashboard.
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=spec.threads_per_worker, processes=True,
                memory_limit=spec.memory_limit, host=LOOPBACK, dashboard_address=LOOPBACK_HTTP,
                scheduler_kwargs={"dashboard": spec.dashboard},
                security=security, protocol="tls://" if security else None,
            )
        except Exception as exc:
            raise ClusterError(f"{spec.source}: cannot start a local cluster of cluster.workers={workers} "
                               f"workers: {_one_line(exc)}") from exc
        return cluster, workers
    if spec.kind == "local-cuda":
        return _local_cuda(spec, security)
    if spec.kind in JOBQUEUE_KINDS:
        return _jobqueue(spec, security)
    raise ClusterError(f"{spec.source}: cluster.kind {spec.kind!r} is not supported")


def _local_cuda(spec: ClusterConfig, security: Security | None) -> tuple[Cluster, int]:
    visible = visible_gpus()
    if visible == 0:
        raise ClusterError(
            f"{spec.source}: cluster.kind 'local-cuda' needs a CUDA GPU, and none is visible on this machine "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); use kind 'local' on CPUs")
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        raise ClusterError(f"{spec.source}: cluster.kind 'local-cuda' needs dask-cuda, which cannot be imported "
                           f"here ({exc}); install it with pip install 'dasktrain[cuda]' (dask-cuda==26.10.*)") from None
    devices = list(spec.devices) if spec.devices is not None else list(range(visible))
    if any(d >= visible for d in devices):
        raise ClusterError(f"{spec.source}: cluster.devices {devices} names GPUs that do not exist; "
                           f"{visible} are visible (0 to {visible - 1})")
    workers = spec.workers or len(devices)
    if workers > len(devices):
        raise ClusterError(f"{spec.source}: cluster.workers={workers} needs as many GPUs, found {len(devices)} "
                           "(one worker per GPU); lower cluster.workers")
    try:
        cluster = LocalCUDACluster(
            n_workers=workers, CUDA_VISIBLE_DEVICES=devices[:workers], threads_per_worker=spec.threads_per_worker,
            memory_limit=spec.memory_limit, host=LOOPBACK, dashboard_address=LOOPBACK_HTTP,
            scheduler_kwargs={"dashboard": spec.dashboard},
            security=security, protocol="tls://" if security else None,
        )
    except Exception as exc:  # NVML and CUDA errors: one sentence, not their traceback
        raise ClusterError(f"{spec.source}: cannot start a local-cuda cluster on GPUs {devices[:workers]}: "
                           f"{_one_line(exc)}") from None
    return cluster, workers


def visible_gpus() -> int:
    """CUDA devices this process may use (honours ``CUDA_VISIBLE_DEVICES``); 0 without a driver."""
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # a broken driver counts as no GPU; the message says what to use instead
        return 0


def resolve_jobqueue(spec: ClusterConfig) -> JobqueuePlan:
    """The dask-jobqueue arguments of ``spec``, merged onto the site's ``jobqueue.<kind>`` Dask config
    (:mod:`dasktrain.cluster.jobqueue`), with dasktrain's worker settings added."""
    return plan_jobqueue(spec, LEAN_CONFIG if spec.lean else {}, LOOPBACK_HTTP, WORKER_ENVIRON)


def jobqueue_script(spec: ClusterConfig) -> tuple[JobqueuePlan, str]:
    """The merged arguments of a jobqueue spec and the batch script its jobs are submitted with
    (dask-jobqueue's ``job_script()``), made without a scheduler and submitting nothing."""
    plan = resolve_jobqueue(spec)
    security = cluster_security(spec)
    return plan, job_script(plan, security, "tls://" if security else None)


def _jobqueue(spec: ClusterConfig, security: Security | None) -> tuple[Cluster, int]:
    plan = resolve_jobqueue(spec)
    import dask_jobqueue

    cls = getattr(dask_jobqueue, plan.class_name)
    workers = spec.workers or 1
    try:
        cluster = cls(**plan.options, security=security, protocol="tls://" if security else None)
    except (TypeError, ValueError) as exc:
        raise ClusterError(f"{spec.source}: dask_jobqueue.{cls.__name__} rejects cluster.jobqueue "
                           f"{dict(spec.jobqueue)}: {_one_line(exc)}") from None
    try:
        _submit(cluster, jobs_for(workers, plan.processes))
    except Exception as exc:
        cluster.close()
        raise ClusterError(f"{spec.source}: cannot submit {jobs_for(workers, plan.processes)} worker job(s) with "
                           f"dask_jobqueue.{cls.__name__}: {_submission_error(exc)}") from None
    log.info("submitted worker jobs with %s:\n%s", cls.__name__, cluster.job_script())
    return cluster, workers


def _submit(cluster: Any, jobs: int) -> None:
    """Submit ``jobs`` batch jobs and wait until the batch system has answered each; raise its
    first refusal here, as an exception.

    This is ``cluster.scale`` (add job specs, then bring the jobs in line with them) done on the
    cluster's event loop and awaited: ``scale`` only schedules the submissions, so a refusal
    would be logged there, traceback and all, and the workers then waited for in vain. A job the
    batch system refused is marked failed: it has nothing to cancel, and closing the cluster
    expects every job it made to have started or failed."""
    async def submit_and_wait() -> None:
        while len(cluster.worker_spec) < jobs:
            cluster.worker_spec.update(cluster.new_worker_spec())
        await cluster._correct_state()

    try:
        cluster.sync(submit_and_wait)
    finally:
        for job in cluster.workers.values():
            if getattr(job, "job_id", None) is None:
                job.status = Status.failed


def _submission_error(exc: BaseException) -> str:
    """A refused submission as one line: the batch system's own message (``sbatch``'s stderr, which
    dask-jobqueue puts after ``stderr:`` in its error), else the error's first line."""
    text = str(exc)
    _, found, stderr = text.partition("\nstderr:\n")
    lines = [line.strip() for line in stderr.splitlines() if line.strip()] if found else []
    if lines:
        command = text.partition("\nCommand:\n")[2].partition("\n")[0].split(" ")[0]
        return f"{command or 'the submit command'} said: {' '.join(lines)}"
    return _one_line(exc)


def _wait_for_workers(client: Client, cluster: Cluster | None, spec: ClusterConfig, workers: int,
                      need: int | None = None) -> None:
    """Wait for ``need`` of the cluster's ``workers`` workers (all of them by default)."""
    need = workers if need is None else need
    try:
        client.wait_for_workers(need, timeout=spec.wait_timeout)
    except TimeoutError:
        arrived = len(client.scheduler_info(n_workers=-1)["workers"])
        hint = ""
        if spec.kind in JOBQUEUE_KINDS:
            jobs = [getattr(job, "job_id", None) for job in getattr(cluster, "workers", {}).values()]
            logs = spec.jobqueue.get("log_directory")
            hint = (f"; jobs {[j for j in jobs if j]} are queued or failed: see the batch queue"
                    + (f" and the job logs in {logs}" if logs else " (set cluster.jobqueue.log_directory for job logs)"))
        wanted = (f"cluster.workers={workers} workers" if need == workers
                  else f"the train.min_workers={need} workers to start with (of cluster.workers={workers})")
        raise ClusterError(f"{spec.source}: {arrived} of {wanted} arrived within "
                           f"cluster.wait_timeout={spec.wait_timeout:g} s{hint}") from None
    if need < workers:
        log.info("cluster ready: %d of %d workers (%s); the others join as their jobs start", need, workers, spec.kind)
    else:
        log.info("cluster ready: %d workers (%s)", workers, spec.kind)


@contextmanager
def _connect(spec: ClusterConfig, security: Security | None) -> Iterator[Client]:
    assert spec.address is not None  # the config requires it for this kind
    try:
        client = Client(spec.address, security=security, timeout=spec.wait_timeout)
    except Exception as exc:  # OSError, TimeoutError, TLS errors: one sentence with the address
        raise ClusterError(f"{spec.source}: cannot reach the scheduler at cluster.address={spec.address} "
                           f"within cluster.wait_timeout={spec.wait_timeout:g} s: {_one_line(exc)}") from None
    # Closing the client leaves the scheduler and its workers running: they are not ours.
    with client:
        _wait_for_workers(client, None, spec, spec.workers or 1)
        yield client


def _one_line(exc: BaseException) -> str:
    """An exception as one short line: its type and the first non-empty line of its message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
