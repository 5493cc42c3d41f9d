"""The arguments of a dask-jobqueue cluster: a spec merged onto the site's ``jobqueue.<kind>`` config.

dask-jobqueue reads every argument it is not given from the Dask config section ``jobqueue.<kind>``
(a site's ``jobqueue.yaml`` in ``/etc/dask``, ``~/.config/dask`` or ``$DASK_CONFIG``), and an
argument it is given replaces that config's value. So dasktrain passes only what the run decides,
and the rest stays the site's:

- ``cluster.jobqueue``, the run config's own arguments, as they are: they win, as in dask-jobqueue;
- ``cluster.jobqueue_defaults`` (the shipped specs' cores, memory, walltime, processes) only for the
  keys the site does not set, so ``spec: slurm`` never overrides a site's own;
- the lists dasktrain adds lines to (the prologue: its environment lines; the directives: the GPU
  request; the worker arguments: the GPU pinning of :mod:`dasktrain.cluster.gpu_pin`) are the run
  config's, else the site's, with dasktrain's lines added, and passed whole;
- ``processes`` is ``gpus_per_job`` when that is set (a worker process per GPU).

A site "sets" a key when its value differs from dask-jobqueue's own packaged default. The checks
(cores and memory known, one worker process per GPU, a thread for every process) look at the
merged values, and their messages say where each value came from.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import dask.config
import yaml

from dasktrain.config import ClusterConfig
from dasktrain.errors import ClusterError

JOBQUEUE_CLASSES = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}

RESERVED_JOBQUEUE_OPTIONS = {
    "n_workers": "cluster.workers",
    "security": "cluster.security and cluster.tls",
    "protocol": "cluster.security",
    "dashboard_address": "cluster.dashboard (or scheduler_options)",
    "job_cls": None, "loop": None, "asynchronous": None, "scheduler": None, "name": None, "config_name": None,
}
"""dask-jobqueue arguments that dasktrain sets itself, and the spec field that decides each."""

GPU_DIRECTIVES = {"slurm": "--gres=gpu:{n}", "lsf": '-gpu "num={n}"'}
"""How a job asks its batch system for ``n`` GPUs, as a directive (PBS: ``ngpus`` in its select)."""

GPU_PIN_PRELOAD = ["--preload-nanny", "dasktrain.cluster.gpu_pin"]
"""Worker arguments that pin each worker process of a multi-GPU job to its own GPU."""

SCHEDULER_PLACEHOLDER = "tcp://<insert-scheduler-address-here>:8786"
"""The scheduler address of a job script shown before any scheduler runs (dask-jobqueue's own)."""

DEPRECATED_NAMES = {"job_script_prologue": "env_extra", "job_extra_directives": "job_extra",
                    "worker_extra_args": "extra"}
"""Older names dask-jobqueue still reads from a site's config, when the new name is empty."""

RUN = "cluster.jobqueue"
SPEC_DEFAULT = "cluster.jobqueue_defaults"
PACKAGE = "dask-jobqueue's default"


@dataclass(frozen=True)
class JobqueuePlan:
    """What dasktrain hands a dask-jobqueue class, and the merged values it was made from."""

    class_name: str
    """``SLURMCluster``, ``PBSCluster``, ... in :mod:`dask_jobqueue`."""
    options: dict[str, Any]
    """Keyword arguments of the class (security and protocol are added where it is made)."""
    merged: dict[str, tuple[Any, str]]
    """Every argument a job of this run gets, with where its value came from: ``cluster.jobqueue``,
    ``site jobqueue.<kind>``, ``cluster.jobqueue_defaults``, dask-jobqueue's default, or dasktrain
    (lines it adds)."""
    processes: int
    """Worker processes per job."""


def _site(kind: str) -> str:
    return f"site jobqueue.{kind}"


@cache
def package_defaults(kind: str) -> dict[str, Any]:
    """dask-jobqueue's own defaults for ``jobqueue.<kind>`` (its packaged ``jobqueue.yaml``), keys with underscores."""
    text = resources.files("dask_jobqueue").joinpath("jobqueue.yaml").read_text()
    section = (yaml.safe_load(text) or {}).get("jobqueue", {}).get(kind, {})
    return {key.replace("-", "_"): value for key, value in section.items()}


def site_settings(kind: str) -> dict[str, Any]:
    """The keys of the Dask config section ``jobqueue.<kind>`` that the site sets (a value other than
    dask-jobqueue's default), with underscores; read now, as dask-jobqueue reads it."""
    section = dask.config.get(f"jobqueue.{kind}", default={}) or {}
    defaults = package_defaults(kind)
    found = {key.replace("-", "_"): value for key, value in section.items()}
    return {key: value for key, value in found.items() if key not in defaults or defaults[key] != value}


def plan_jobqueue(spec: ClusterConfig, worker_settings: dict[str, Any], closed_http: str,
                  worker_environ: dict[str, str] | None = None) -> JobqueuePlan:
    """Merge ``spec`` onto the site's config (see the module docstring) and check the result.

    ``worker_settings``: Dask settings the workers get through their environment (prologue lines);
    ``closed_http``: where the scheduler's HTTP server listens without a dashboard;
    ``worker_environ``: environment variables the job exports before it starts its workers.

    Raises :class:`ClusterError` naming the spec and where a bad value came from."""
    try:
        import dask_jobqueue
        from dask_jobqueue.core import Job
    except ImportError as exc:
        raise ClusterError(f"{spec.source}: cluster.kind {spec.kind!r} needs dask-jobqueue ({exc}); "
                           "install it with pip install 'dasktrain[jobqueue]'") from None
    kind = spec.kind
    cls = getattr(dask_jobqueue, JOBQUEUE_CLASSES[kind])
    for field, given in (("jobqueue", spec.jobqueue), ("jobqueue_defaults", spec.jobqueue_defaults)):
        _check_option_names(spec, field, cls, Job, given)
    site, package = site_settings(kind), package_defaults(kind)

    def merged_value(key: str) -> tuple[Any, str]:
        if key in spec.jobqueue:
            return spec.jobqueue[key], RUN
        if key in site:
            return site[key], _site(kind)
        if key in spec.jobqueue_defaults:
            return spec.jobqueue_defaults[key], SPEC_DEFAULT
        return package.get(key), PACKAGE

    options: dict[str, Any] = dict(spec.jobqueue)
    options.update({k: v for k, v in spec.jobqueue_defaults.items() if k not in spec.jobqueue and k not in site})
    shown = _accepted(cls, Job) - set(RESERVED_JOBQUEUE_OPTIONS) - set(DEPRECATED_NAMES.values())
    merged = {key: merged_value(key) for key in {*package, *site, *options} if key in shown}
    if spec.gpus_per_job:
        options["processes"] = spec.gpus_per_job
        merged["processes"] = (spec.gpus_per_job, "cluster.gpus_per_job")
        if merged["cores"][1] == SPEC_DEFAULT:  # the shipped default is per worker process
            options["cores"] = int(spec.jobqueue_defaults["cores"]) * spec.gpus_per_job
            merged["cores"] = (options["cores"], f"{SPEC_DEFAULT} x cluster.gpus_per_job")
    cores, memory = merged["cores"][0], merged["memory"][0]
    missing = [key for key, value in (("cores", cores), ("memory", memory)) if value is None]
    if missing:
        names = " and ".join(missing)
        raise ClusterError(f"{spec.source}: dask_jobqueue.{cls.__name__} needs {names} per job, and neither "
                           f"cluster.jobqueue, the site's Dask config jobqueue.{kind} nor cluster.jobqueue_defaults "
                           f"sets {'them' if len(missing) > 1 else 'it'}; set cluster.jobqueue.{missing[0]}, or use "
                           f"cluster: {{spec: {kind}}} for the shipped defaults")
    processes = merged["processes"][0]
    if processes is None:  # dask-jobqueue's own choice from cores, as its Job makes it
        from distributed.deploy.utils import nprocesses_nthreads

        processes = nprocesses_nthreads(int(cores))[0]
        merged["processes"] = (processes, f"{PACKAGE} for cores={cores}")
    _check_processes(spec, merged, int(processes), int(cores))
    _add_lines(spec, options, merged, site, worker_settings, closed_http, worker_environ or {})
    merged = {k: v for k, v in merged.items() if v[0] not in (None, [], {}) or v[1] != PACKAGE}
    return JobqueuePlan(cls.__name__, options, dict(sorted(merged.items())), int(processes))


def _accepted(cls: Any, base_job: Any) -> set[str]:
    """Every keyword argument the class, its job class and the base job take."""
    accepted: set[str] = set()
    for func in (cls.__init__, cls.job_cls.__init__, base_job.__init__):
        accepted |= {p.name for p in inspect.signature(func).parameters.values()
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return accepted - {"self"}


def _check_option_names(spec: ClusterConfig, field: str, cls: Any, base_job: Any, options: dict[str, Any]) -> None:
    """Name the first option the class would reject, before anything is submitted."""
    accepted = _accepted(cls, base_job)
    for key in options:
        if key in RESERVED_JOBQUEUE_OPTIONS:
            instead = RESERVED_JOBQUEUE_OPTIONS[key]
            raise ClusterError(f"{spec.source}: cluster.{field}.{key} is set by dasktrain"
                               + (f" from {instead}; set that instead" if instead else ""))
        if key not in accepted:
            raise ClusterError(f"{spec.source}: cluster.{field}.{key} is not an option of dask_jobqueue."
                               f"{cls.__name__} (options: {', '.join(sorted(accepted - set(RESERVED_JOBQUEUE_OPTIONS)))})")


def _check_processes(spec: ClusterConfig, merged: dict[str, tuple[Any, str]], processes: int, cores: int) -> None:
    """One GPU per worker process, and a thread for each, on the merged values."""
    where = merged["processes"][1]
    if spec.gpus_per_worker and processes != 1:
        raise ClusterError(
            f"{spec.source}: cluster.gpus_per_worker={spec.gpus_per_worker} needs one worker process per job, and "
            f"processes is {processes} (from {where}); set cluster.jobqueue.processes: 1, or use "
            f"cluster.gpus_per_job: {processes} for one job per node with a worker process per GPU")
    if processes > cores:
        raise ClusterError(
            f"{spec.source}: processes={processes} (from {where}) is more than cores={cores} (from "
            f"{merged['cores'][1]}): each worker process needs a thread; raise cluster.jobqueue.cores")


def _add_lines(spec: ClusterConfig, options: dict[str, Any], merged: dict[str, tuple[Any, str]],
               site: dict[str, Any], worker_settings: dict[str, Any], closed_http: str,
               worker_environ: dict[str, str]) -> None:
    """Add dasktrain's lines to the lists it extends, and its scheduler options, keeping the site's."""

    def extend(key: str, lines: list[str]) -> None:
        value, where = merged.get(key, ([], PACKAGE))
        if where == _site(spec.kind) or where == PACKAGE:
            old = DEPRECATED_NAMES.get(key)
            if not value and old and site.get(old):  # the site still uses the old name
                value, where = site[old], f"{_site(spec.kind)} ({old.replace('_', '-')})"
        base = list(value or [])
        if lines:
            options[key] = [*base, *lines]
            merged[key] = ([*base, *lines], f"{where} + dasktrain" if base else "dasktrain")

    gpus = spec.gpus_per_job or spec.gpus_per_worker
    # A job's worker reads these settings from its environment.
    extend("job_script_prologue", [f"export {name}={value}" for name, value in worker_environ.items()]
           + [f"export DASK_{key.upper().replace('.', '__').replace('-', '_')}={value}"
              for key, value in worker_settings.items()])
    if gpus and spec.kind in GPU_DIRECTIVES:
        extend("job_extra_directives", [GPU_DIRECTIVES[spec.kind].format(n=gpus)])
    elif gpus and spec.kind == "pbs":
        _pbs_gpus(options, merged, gpus)
    elif gpus:
        raise ClusterError(f"{spec.source}: cluster.gpus_per_worker has no standard request on kind "
                           f"{spec.kind!r}; put your site's directive in cluster.jobqueue.job_extra_directives")
    if spec.gpus_per_job > 1:
        extend("worker_extra_args", GPU_PIN_PRELOAD)
    # The scheduler and the workers listen on jobqueue.interface (or scheduler_options' host or
    # interface), as dask-jobqueue does. A dashboard asked for is served on every interface, for
    # a browser elsewhere; without one, the HTTP server (which Dask starts anyway) is loopback only.
    dashboard = {"dashboard_address": ":0"} if spec.dashboard else {"dashboard": False, "dashboard_address": closed_http}
    scheduler = {**dashboard, **(site.get("scheduler_options") or {}), **spec.jobqueue.get("scheduler_options", {})}
    options["scheduler_options"] = scheduler


def _pbs_gpus(options: dict[str, Any], merged: dict[str, tuple[Any, str]], gpus: int) -> None:
    """PBS Pro asks for GPUs in the select statement of ``resource_spec`` (a job-wide ``-l ngpus``
    beside a select is refused): the merged one, or the one dask-jobqueue would write, plus ``ngpus``."""
    from dask.utils import parse_bytes
    from dask_jobqueue.pbs import pbs_format_bytes_ceil

    value, where = merged.get("resource_spec", (None, PACKAGE))
    if value is None:
        cores, memory = merged["cores"][0], merged["memory"][0]
        value, where = f"select=1:ncpus={int(cores)}:mem={pbs_format_bytes_ceil(parse_bytes(memory))}", PACKAGE
    if "gpus=" not in value:
        value, where = f"{value}:ngpus={gpus}", f"{where} + dasktrain"
    options["resource_spec"] = value
    merged["resource_spec"] = (value, where)


def job_kwargs(plan: JobqueuePlan, security: Any, protocol: str | None) -> dict[str, Any]:
    """The arguments the class hands each of its jobs, as :class:`dask_jobqueue.core.JobQueueCluster`
    splits them off its own (scheduler and cluster options stay with the cluster)."""
    from dask_jobqueue.core import JobQueueCluster

    own = set(inspect.signature(JobQueueCluster.__init__).parameters) - {"interface", "protocol", "security",
                                                                          "config_name", "job_kwargs"}
    kwargs = {k: v for k, v in plan.options.items() if k not in own}
    return {**kwargs, "protocol": protocol, "security": security}


def job_script(plan: JobqueuePlan, security: Any = None, protocol: str | None = None) -> str:
    """The batch script a job of ``plan`` is submitted with (dask-jobqueue's ``job_script()``), made
    without a scheduler: its address is dask-jobqueue's placeholder, its worker name ``dummy-name``."""
    import dask_jobqueue

    cls = getattr(dask_jobqueue, plan.class_name)
    job = cls.job_cls(SCHEDULER_PLACEHOLDER, name="dummy-name", **job_kwargs(plan, security, protocol))
    script: str = job.job_script()
    return script


def jobs_for(workers: int, processes: int) -> int:
    """Batch jobs dask-jobqueue submits for ``workers`` workers of ``processes`` per job."""
    return math.ceil(workers / processes)
