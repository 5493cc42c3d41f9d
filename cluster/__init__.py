"""Cluster specs and the one function that turns a spec into a running cluster and ``Client``.

The YAML files beside this module document each kind's options with their defaults. Launching
is left to Dask's own cluster classes; this module only maps a spec onto them and guarantees
that whatever it started is closed on every exit path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster

from pipeline.config import ClusterConfig
from pipeline.errors import ClusterError

log = logging.getLogger(__name__)


@contextmanager
def open_cluster(spec: ClusterConfig) -> Iterator[Client]:
    """Start the cluster a spec describes, yield a connected client, close both afterwards."""
    if spec.kind != "local":
        raise ClusterError(f"cluster.kind {spec.kind!r} is not supported")
    try:
        cluster = LocalCluster(
            n_workers=spec.workers,
            threads_per_worker=spec.threads_per_worker,
            processes=True,
            memory_limit=spec.memory_limit,
            dashboard_address=":0" if spec.dashboard else None,
        )
    except Exception as exc:
        raise ClusterError(f"cannot start a local cluster of {spec.workers} workers: {exc}") from exc
    try:
        with Client(cluster) as client:
            client.wait_for_workers(spec.workers, timeout=120)
            yield client
    finally:
        cluster.close()
