"""Cluster specs (YAML, one file per kind beside this module) and :func:`open_cluster`, the one
function that turns a spec into a running cluster and a connected ``Client``.

- ``specs``: the mapping of a spec onto LocalCluster, LocalCUDACluster, the dask-jobqueue classes,
  or an existing scheduler; waiting for workers; closing on every exit path.
- ``jobqueue``: a jobqueue spec merged onto the site's ``jobqueue.<kind>`` Dask config, and its job script.
- ``gpu_pin``: the nanny preload that pins each worker process of a multi-GPU job to its own GPU.
- ``tls``: the certificates of ``security: tls`` (generated for local kinds, files otherwise).
- ``upload``: ``model.upload``, the user's own code sent to every worker (Dask's ``UploadFile``).
- ``latency``: Dask's streams set to send each message at once (a step waits on a few of them).

The spec itself, and the reading of spec files, is :class:`dasktrain.config.ClusterConfig`.
"""

from __future__ import annotations

from dasktrain.cluster.latency import send_without_delay
from dasktrain.cluster.specs import jobqueue_script, open_cluster, visible_gpus, workers_to_start
from dasktrain.cluster.tls import cluster_security
from dasktrain.cluster.upload import upload_user_code

__all__ = ["cluster_security", "jobqueue_script", "open_cluster", "send_without_delay", "upload_user_code",
           "visible_gpus", "workers_to_start"]
