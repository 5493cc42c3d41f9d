"""Prefect's local server for a run that names no ``PREFECT_API_URL``: a child of the driver.

Prefect's own temporary server is a subprocess in the driver's process group, so Ctrl-C in a
terminal stops it first, and the run's last calls to the API (logs, the final state) then retry
against a dead server for minutes; a driver killed by SIGTERM or SIGKILL leaves it running for
good. This one is Prefect's own ``prefect server start`` (API only, no UI, no background
services: a run in this process needs neither), started

- in a session of its own, so the terminal's Ctrl-C reaches the driver only, which shuts the run
  down against a live API and then stops the server;
- with the parent-death signal set (Linux ``prctl(PR_SET_PDEATHSIG)``, before ``exec``), so the
  kernel ends it whenever the driver ends, however it ends.

It runs in the foreground of its own process, not with ``--background``: a background server is
by design not the driver's child (Prefect's CLI starts it and exits), so the parent-death signal
cannot reach it, and there is one per ``PREFECT_HOME``. A server that outlives its caller (tests,
CI, scheduled deployments) is ``scripts/prefect-server.sh``, which uses ``--background``. Both
listen on 127.0.0.1 only, with analytics off.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dasktrain.errors import DasktrainError

_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
parent = int(sys.argv[1])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass  # not Linux: the driver's own exit still stops the server
if os.getppid() != parent:  # the driver ended before the signal was armed
    sys.exit(0)
os.execv(sys.argv[2], sys.argv[2:])
"""


class LocalServerError(DasktrainError):
    """Prefect's local server did not start."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def local_server(database: Path, log_file: Path, timeout_s: float = 120.0) -> Iterator[str]:
    """Start ``prefect server start`` on 127.0.0.1 with its SQLite ``database``; yields the API URL
    and stops the server (by its pid) on exit. The first start on a fresh database sets it up
    (10-30 s); ``timeout_s`` bounds the wait for ``/api/health``."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_API_URL": "",  # the server must not report to another one
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{database}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
               "--no-services", "--no-ui", "--analytics-off"]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        server = subprocess.Popen([sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command],
                                  env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(url):
            if server.poll() is not None:
                raise LocalServerError(f"Prefect's local server exited with code {server.returncode}; see {log_file}")
            if time.monotonic() > deadline:
                raise LocalServerError(f"Prefect's local server did not answer {url} within {timeout_s:.0f} s; "
                                       f"see {log_file}")
            time.sleep(0.2)
        yield url
    finally:
        _stop(server)


def _stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM (uvicorn shuts down cleanly), then SIGKILL after 10 s; the process is reaped."""
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=10)
