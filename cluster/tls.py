"""TLS for a cluster spec: certificates generated for the run (local kinds) or read from files.

With ``security: tls`` every connection (client to scheduler, worker to scheduler, worker to
worker) is TLS with mutual authentication: a peer must present a certificate signed by the run's
authority, so a client without one is refused by the scheduler.
"""

from __future__ import annotations

from pathlib import Path

from distributed import Security

from dasktrain.config import ClusterConfig
from dasktrain.errors import ClusterError


def cluster_security(spec: ClusterConfig) -> Security | None:
    """The :class:`Security` that the scheduler, the workers and the client share; None without TLS."""
    if spec.security != "tls":
        return None
    if spec.tls is None:
        # Only local kinds get here (the config requires files otherwise): every process of the
        # cluster is started from this one, so in-memory certificates reach all of them.
        try:
            return Security.temporary()
        except ImportError as exc:
            raise ClusterError(f"{spec.source}: security 'tls' needs the 'cryptography' package to generate "
                               f"certificates ({exc}); install it or name files in cluster.tls") from None
    files = {"ca_file": spec.tls.ca_file, "cert": spec.tls.cert, "key": spec.tls.key}
    for field, name in files.items():
        if name is not None and not Path(name).is_file():
            raise ClusterError(f"{spec.source}: cluster.tls.{field} {name} is not a file")
    cert, key = spec.tls.cert, spec.tls.key
    return Security(
        tls_ca_file=spec.tls.ca_file,
        tls_scheduler_cert=cert, tls_scheduler_key=key,
        tls_worker_cert=cert, tls_worker_key=key,
        tls_client_cert=cert, tls_client_key=key,
        require_encryption=True,
    )
