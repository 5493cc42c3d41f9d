"""Prefect flows and deployments of dasktrain: orchestration only, every stage calls ``pipeline``.

Importing this package sets the Prefect defaults dasktrain wants *before* Prefect itself is
imported (Prefect reads its settings once, at import): no telemetry from the local server or the
client, and a longer wait for the local temporary server, whose first start on a fresh database
runs its migrations (about 20-30 s). Values already in the environment win.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dasktrain.errors import DasktrainError

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}
for _key, _value in PREFECT_DEFAULTS.items():
    os.environ.setdefault(_key, _value)

PREFECT_DB = "prefect.db"


class PrefectAPIError(DasktrainError):
    """The Prefect API named by ``PREFECT_API_URL`` cannot be reached."""


def check_api(url: str, timeout: float = 5.0) -> None:
    """Raise :class:`PrefectAPIError` naming ``url`` unless its ``/health`` answers."""
    import httpx

    health = url.rstrip("/") + "/health"
    try:
        response = httpx.get(health, timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise PrefectAPIError(
            f"PREFECT_API_URL={url} cannot be reached ({health}: {type(exc).__name__}: {exc}); start that "
            "server (prefect server start), fix the URL, or unset PREFECT_API_URL to use a local database"
        ) from None


@contextmanager
def prefect_api(db_dir: str | Path) -> Iterator[str]:
    """Make Prefect report to the server of ``PREFECT_API_URL`` (checked first), or, with none set,
    to a local Prefect server with its SQLite database in ``db_dir``, started for this run as the
    driver's child (:mod:`dasktrain.flows.local_server`). Yields the URL, or the database path for the local
    server."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings

    url = PREFECT_API_URL.value()
    if url:
        check_api(url)
        yield url
        return
    from dasktrain.flows.local_server import local_server

    db = Path(db_dir).resolve() / PREFECT_DB
    db.parent.mkdir(parents=True, exist_ok=True)
    with local_server(db, db.parent / "prefect-server.log") as local_url:
        try:
            with temporary_settings(updates={PREFECT_API_URL: local_url,
                                             PREFECT_SERVER_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{db}"}):
                yield str(db)
        finally:
            _drain_to_api()  # the run's last logs and events reach the server before it stops


def _drain_to_api(timeout_s: float = 5.0) -> None:
    """Send the logs and events Prefect still holds in its background workers, waiting at most
    ``timeout_s`` each (they would otherwise retry against a stopped server at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout_s)
        except Exception as exc:  # a failed drain must not hide the run's own outcome
            logging.getLogger(__name__).debug("could not drain %s: %s", worker.__name__, exc)


def quiet_run_logs() -> None:
    """Send flow- and task-run logs to the Prefect API only, not to the terminal (the CLI draws its
    own progress there); Prefect's own warnings still reach the root logger."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).propagate = False
