"""Nothing a local run opens listens beyond loopback.

During a run on a local cluster that dasktrain starts itself (``dasktrain.cluster.open_cluster``), every
LISTEN socket of this process (the client, the scheduler and its HTTP server) and of every
process below it (nannies, workers, their HTTP servers, the TCPStore and gloo of ``reduce:
collective``) must be bound to 127.0.0.1 or ::1: by default, without a dashboard, with TLS, and
with a collective all-reduce. Without a dashboard the HTTP servers answer ``/health`` alone.
"""

from __future__ import annotations

import ipaddress
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from dasktrain.cluster import open_cluster
from dasktrain.errors import ConfigError
from dasktrain.run_loop import train
from tests.helpers import run_config

Socket = tuple[int, str, int]
"""A listening socket: (pid, address, port)."""

RUNS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # name: (cluster settings, train settings)
    "default": ({"dashboard": True}, {}),
    "no-dashboard": ({"dashboard": False}, {}),
    "tls": ({"dashboard": False, "security": "tls"}, {}),
    "collective": ({"dashboard": False}, {"reduce": "collective"}),
}


def listening_sockets() -> set[Socket]:
    """Every LISTEN socket of this process and of all the processes below it."""
    me = psutil.Process()
    found: set[Socket] = set()
    for proc in [me, *me.children(recursive=True)]:
        try:
            connections = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):  # ended meanwhile: nothing listens there
            continue
        found |= {(proc.pid, c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN}
    return found


def dask_ports(client: Any) -> set[int]:
    """Ports of the scheduler, its HTTP server, and every nanny, worker and worker HTTP server."""
    info = client.scheduler_info(n_workers=-1)
    ports = {int(info["address"].rsplit(":", 1)[1]), *info["services"].values()}
    for address, worker in info["workers"].items():
        ports |= {int(address.rsplit(":", 1)[1]), int(worker["nanny"].rsplit(":", 1)[1]), *worker["services"].values()}
    return ports


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(RUNS))
def test_every_listening_socket_is_loopback(digits_store: Path, tmp_path: Path, name: str) -> None:
    cluster, options = RUNS[name]
    config = run_config(digits_store, tmp_path / "run", cluster={"kind": "local", "workers": 2, **cluster},
                        train={"epochs": 1, "batch_size": 300, "shards": 4, "seed": 3, **options})
    before = listening_sockets()  # left by whatever ran earlier in this process: not this run's
    seen: dict[str, set[Socket]] = {}

    def on_event(event: dict[str, Any]) -> None:
        if event["kind"] == "step" and event["global_step"] >= 3 and "during" not in seen:
            seen["during"] = listening_sockets() - before

    with open_cluster(config.cluster) as client:
        ports = dask_ports(client)
        info = client.scheduler_info(n_workers=-1)
        assert train(config, client=client, on_event=on_event).completed
        if not config.cluster.dashboard:  # Dask's HTTP servers run anyway, and serve /health alone
            http = [info["services"]["dashboard"], *(w["services"]["dashboard"] for w in info["workers"].values())]
            for port in http:
                assert http_status(f"http://127.0.0.1:{port}/health") == 200
                assert http_status(f"http://127.0.0.1:{port}/metrics") == 404
            assert http_status(f"http://127.0.0.1:{http[0]}/info/main/workers.html") == 404
    during = seen["during"]
    assert ports <= {port for _, _, port in during}, "a Dask socket was not found among the listening ones"
    outside = sorted(s for s in during if not ipaddress.ip_address(s[1]).is_loopback)
    assert not outside, f"listening beyond loopback (pid, address, port): {outside}"
    others = {s for s in during if s[2] not in ports}
    if options.get("reduce") == "collective":  # the TCPStore and gloo were there, and are checked above
        assert others, during


def test_collective_with_tls_is_refused_naming_both_options(digits_store: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.reduce: collective .* outside TLS, so cluster\.security: tls "
                                          r"refuses it; use train\.reduce: tree .* or cluster\.security: none"):
        run_config(digits_store, tmp_path / "run", cluster={"security": "tls"}, train={"reduce": "collective"})
