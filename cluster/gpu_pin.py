"""Pin each worker process of a multi-GPU batch job to its own GPU (``cluster.gpus_per_job``).

dask-jobqueue starts a job's workers with one command, ``dask worker ... --nworkers N``: one
process holding N nannies, each of which spawns one worker process, all with the job's environment
(the same ``CUDA_VISIBLE_DEVICES``, the same ``SLURM_LOCALID``). What tells them apart is their
name: with ``--nworkers`` the command names them ``NAME-0`` ... ``NAME-(N-1)`` (its documented
behaviour). This module is a nanny preload (``--preload-nanny dasktrain.cluster.gpu_pin``): it runs
in the nanny before the nanny spawns its worker and sets, in the environment the nanny gives that
worker (``Nanny.env``), ``CUDA_VISIBLE_DEVICES`` to the one GPU of the job at that index. The
worker then sees exactly one GPU, as ``cuda:0`` (:mod:`dasktrain.device`), and a worker its nanny
restarts gets the same one. Nothing in the nanny touches CUDA.

This is dask-cuda's way (its ``CUDAWorker`` gives every nanny its own ``CUDA_VISIBLE_DEVICES``),
without needing dask-cuda on the nodes or a launcher of our own; a prologue line cannot do it, as
it runs once for all the job's processes.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


def job_gpus(environ: Mapping[str, str]) -> list[str]:
    """The GPUs the batch system gave the job, as ``CUDA_VISIBLE_DEVICES`` lists them (SLURM's
    ``--gres`` and PBS's cgroups set it); an empty list when it is not set."""
    listed = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return [d.strip() for d in listed.split(",") if d.strip()] if listed else []


def process_index(name: str) -> int:
    """The index of a worker process in its job, from the ``NAME-i`` names of ``--nworkers``."""
    found = re.fullmatch(r".*-(\d+)", str(name))
    if found is None:
        raise RuntimeError(f"dasktrain.cluster.gpu_pin: nanny name {name!r} does not end in -<index>: it pins "
                           "the worker processes of one 'dask worker --nworkers N' command (cluster.gpus_per_job)")
    return int(found.group(1))


def device_for(name: str, environ: Mapping[str, str]) -> str:
    """The one GPU the worker process ``name`` of a job with environment ``environ`` trains on: the
    i-th of the job's GPUs, or GPU i when the batch system did not list them."""
    index = process_index(name)
    gpus = job_gpus(environ)
    if not gpus:
        return str(index)
    if index >= len(gpus):
        raise RuntimeError(f"dasktrain.cluster.gpu_pin: worker process {index} of its job has no GPU of its own: "
                           f"the job sees CUDA_VISIBLE_DEVICES={','.join(gpus)} ({len(gpus)} GPUs); the job must "
                           "ask for one GPU per worker process (cluster.gpus_per_job)")
    return gpus[index]


def dask_setup(nanny: Any) -> None:
    """Nanny preload hook: the worker this nanny spawns (now and on every restart) sees one GPU."""
    device = device_for(nanny.name, os.environ)
    nanny.env["CUDA_VISIBLE_DEVICES"] = device
    log.info("worker %s pinned to GPU %s", nanny.name, device)
