"""Cluster specs (YAML, one file per kind beside this module) and :func:`open_cluster`, the one
function that turns a spec into a running cluster and a connected ``Client``.

- ``specs``: the mapping of a spec onto LocalCluster, LocalCUDACluster, the dask-jobqueue classes,
  or an existing scheduler; waiting for workers; closing on every exit path.
- ``tls``: the certificates of ``security: tls`` (generated for local kinds, files otherwise).

The spec itself, and the reading of spec files, is :class:`dasktrain.config.ClusterConfig`.
"""

from __future__ import annotations

from dasktrain.cluster.specs import open_cluster, visible_gpus
from dasktrain.cluster.tls import cluster_security

__all__ = ["cluster_security", "open_cluster", "visible_gpus"]
