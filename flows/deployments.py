"""Scheduled deployments of the training flow, served by a long-running process.

``dasktrain deploy CONFIG --cron "0 2 * * *"`` calls :func:`serve_training`: it registers a
deployment of :func:`dasktrain.flows.training.training_flow` with that schedule on the Prefect server of
``PREFECT_API_URL`` and stays up, running each scheduled flow run in a subprocess, until it is
stopped (Ctrl-C or SIGTERM). ``prefect.yaml`` shows the other way, a work pool and ``prefect deploy``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prefect.settings import PREFECT_API_URL

from dasktrain.flows import PrefectAPIError, check_api
from dasktrain.flows.training import training_flow


def serve_training(config: str | Path, *, name: str | None = None, cron: str | None = None,
                   interval: float | None = None, overrides: Sequence[str] = (), limit: int = 1) -> None:
    """Serve the training flow on ``cron`` (or every ``interval`` seconds) with this config.

    Every run trains in its own directory under the config's ``output_dir``; ``limit`` runs at a
    time (a retrain that outlasts its period is not overlapped by the next). ``overrides`` (the
    owner's ``--set``) are baked into the deployment; a flow run created from it (UI, API,
    ``prefect deployment run``) may pass its own ``overrides`` only for the data keys of
    :data:`dasktrain.config.FLOW_RUN_OVERRIDE_KEYS`, and change no other parameter."""
    url = PREFECT_API_URL.value()
    if not url:
        raise PrefectAPIError(
            "dasktrain deploy needs a Prefect server that outlives it: set PREFECT_API_URL (start one with "
            "`prefect server start`, or scripts/prefect-server.sh start DIR)"
        )
    check_api(url)
    if (cron is None) == (interval is None):
        raise ValueError("give exactly one of cron or interval")
    path = Path(config).resolve()  # runs start in their own processes: no relative config path
    training_flow.serve(
        name=name or path.stem,
        cron=cron,
        interval=interval,
        # The owner's overrides are the deployment's own; a flow run's `overrides` are checked
        # against an allow-list (dasktrain.flows.training.check_deployment_run).
        parameters={"config": str(path), "deployment_overrides": list(overrides), "per_run_output": True},
        tags=["dasktrain"],
        description=f"dasktrain training of {path}",
        limit=limit,
    )
