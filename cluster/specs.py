"""Turn a :class:`ClusterConfig` into a running cluster and a connected ``Client``.

Launching is left to Dask's own classes (LocalCluster, dask-cuda's LocalCUDACluster, the
dask-jobqueue clusters); this module maps a spec onto them, waits for the workers, and closes
whatever it started on every exit path. Every failure is one :class:`ClusterError` sentence that
names the spec file and the field to change.

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

import inspect
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dask.config
from distributed import Client, LocalCluster, Security
from distributed.deploy import Cluster

from dasktrain.cluster.tls import cluster_security
from dasktrain.config import JOBQUEUE_KINDS, ClusterConfig
from dasktrain.errors import ClusterError

log = logging.getLogger(__name__)

JOBQUEUE_CLASSES = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}

RESERVED_JOBQUEUE_OPTIONS = {
    "n_workers": "cluster.workers",
    "security": "cluster.security and cluster.tls",
    "protocol": "cluster.security",
    "dashboard_address": "cluster.dashboard (or scheduler_options)",
    "job_cls": None, "loop": None, "asynchronous": None, "scheduler": None, "name": None, "config_name": None,
}
"""dask-jobqueue arguments that dasktrain sets itself, and the spec field that decides each."""

GPU_DIRECTIVES = {"slurm": "--gres=gpu:{n}", "pbs": "-l ngpus={n}", "lsf": '-gpu "num={n}"'}
"""How a job asks its batch system for ``n`` GPUs (site conventions vary: override with job_extra_directives)."""


@contextmanager
def open_cluster(spec: ClusterConfig) -> Iterator[Client]:
    """Start (or, for ``address``, connect to) the cluster ``spec`` describes and yield a client
    once its workers have arrived. A cluster started here is closed, and its batch jobs cancelled,
    however the block is left; a cluster reached by address is left running."""
    security = cluster_security(spec)
    if spec.kind == "address":
        with _connect(spec, security) as client:
            yield client
        return
    cluster, workers = _start(spec, security)
    try:
        with Client(cluster, timeout=spec.wait_timeout) as client:
            _wait_for_workers(client, cluster, spec, workers)
            yield client
    finally:
        cluster.close()


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
}
"""Dask settings of ``cluster.lean`` (see its docstring)."""


def _start(spec: ClusterConfig, security: Security | None) -> tuple[Cluster, int]:
    # The scheduler reads its config when it starts (in this process, for every kind); nannies
    # hand theirs to the workers they start, now and on a restart.
    settings = {**(LEAN_CONFIG if spec.lean else {}), **({} if spec.dashboard else NO_DASHBOARD_CONFIG)}
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


def _jobqueue(spec: ClusterConfig, security: Security | None) -> tuple[Cluster, int]:
    try:
        import dask_jobqueue
        from dask_jobqueue.core import Job
    except ImportError as exc:
        raise ClusterError(f"{spec.source}: cluster.kind {spec.kind!r} needs dask-jobqueue ({exc}); "
                           "install it with pip install 'dasktrain[jobqueue]'") from None
    cls = getattr(dask_jobqueue, JOBQUEUE_CLASSES[spec.kind])
    options = dict(spec.jobqueue)
    _check_jobqueue_options(spec, cls, Job, options)
    if spec.gpus_per_worker:
        if spec.kind not in GPU_DIRECTIVES:
            raise ClusterError(f"{spec.source}: cluster.gpus_per_worker has no standard request on kind "
                               f"{spec.kind!r}; put your site's directive in cluster.jobqueue.job_extra_directives")
        directive = GPU_DIRECTIVES[spec.kind].format(n=spec.gpus_per_worker)
        options["job_extra_directives"] = [*options.get("job_extra_directives", []), directive]
    # The scheduler and the workers listen on jobqueue.interface (or scheduler_options' host or
    # interface), as dask-jobqueue does. A dashboard asked for is served on every interface, for
    # a browser elsewhere; without one, the HTTP server (which Dask starts anyway) is loopback only.
    dashboard = {"dashboard_address": ":0"} if spec.dashboard else {"dashboard": False, "dashboard_address": LOOPBACK_HTTP}
    options["scheduler_options"] = {**dashboard, **options.get("scheduler_options", {})}
    if spec.lean:  # a job's worker reads its config from the environment
        exports = [f"export DASK_{key.upper().replace('.', '__').replace('-', '_')}={value}"
                   for key, value in LEAN_CONFIG.items()]
        options["job_script_prologue"] = [*options.get("job_script_prologue", []), *exports]
    workers = spec.workers or 1
    try:
        cluster = cls(**options, security=security, protocol="tls://" if security else None)
    except (TypeError, ValueError) as exc:
        raise ClusterError(f"{spec.source}: dask_jobqueue.{cls.__name__} rejects cluster.jobqueue "
                           f"{dict(spec.jobqueue)}: {_one_line(exc)}") from None
    try:
        cluster.scale(n=workers)
    except Exception as exc:
        cluster.close()
        raise ClusterError(f"{spec.source}: cannot submit {workers} worker jobs with dask_jobqueue."
                           f"{cls.__name__}: {_one_line(exc)}") from None
    log.info("submitted worker jobs with %s:\n%s", cls.__name__, cluster.job_script())
    return cluster, workers


def _check_jobqueue_options(spec: ClusterConfig, cls: Any, base_job: Any, options: dict[str, Any]) -> None:
    """Name the first option the class would reject, before anything is submitted."""
    accepted: set[str] = set()
    for func in (cls.__init__, cls.job_cls.__init__, base_job.__init__):
        accepted |= {p.name for p in inspect.signature(func).parameters.values()
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key in options:
        if key in RESERVED_JOBQUEUE_OPTIONS:
            instead = RESERVED_JOBQUEUE_OPTIONS[key]
            raise ClusterError(f"{spec.source}: cluster.jobqueue.{key} is set by dasktrain"
                               + (f" from {instead}; set that instead" if instead else ""))
        if key not in accepted - {"self"}:
            raise ClusterError(f"{spec.source}: cluster.jobqueue.{key} is not an option of dask_jobqueue."
                               f"{cls.__name__} (options: {', '.join(sorted(accepted - set(RESERVED_JOBQUEUE_OPTIONS) - {'self'}))})")


def _wait_for_workers(client: Client, cluster: Cluster | None, spec: ClusterConfig, workers: int) -> None:
    try:
        client.wait_for_workers(workers, timeout=spec.wait_timeout)
    except TimeoutError:
        arrived = len(client.scheduler_info(n_workers=-1)["workers"])
        hint = ""
        if spec.kind in JOBQUEUE_KINDS:
            jobs = [getattr(job, "job_id", None) for job in getattr(cluster, "workers", {}).values()]
            logs = spec.jobqueue.get("log_directory")
            hint = (f"; jobs {[j for j in jobs if j]} are queued or failed: see the batch queue"
                    + (f" and the job logs in {logs}" if logs else " (set cluster.jobqueue.log_directory for job logs)"))
        raise ClusterError(f"{spec.source}: {arrived} of cluster.workers={workers} workers arrived within "
                           f"cluster.wait_timeout={spec.wait_timeout:g} s{hint}") from None
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
