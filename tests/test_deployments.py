"""A served, scheduled deployment of the training flow on a real ``prefect server``.

Needs PREFECT_API_URL pointing at a live server (``.ci/run`` starts one with
``scripts/prefect-server.sh``); skipped otherwise. Every process the test starts is ended by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.helpers import run_config

ROOT = Path(__file__).resolve().parents[1]
API_URL = os.environ.get("PREFECT_API_URL", "")


def _live(url: str) -> bool:
    try:
        return httpx.get(url.rstrip("/") + "/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


if not API_URL or not _live(API_URL):
    pytest.skip("needs PREFECT_API_URL of a live Prefect server (scripts/prefect-server.sh start DIR; .ci/run does it)",
                allow_module_level=True)

pytestmark = pytest.mark.timeout(240)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """End a process this test started: SIGTERM (Prefect's runner shuts down gracefully), then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_served_deployment_runs_on_schedule(digits_store: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    runs_dir = tmp_path / "runs"
    config = tmp_path / "nightly.yaml"
    config.write_text(run_config(digits_store, runs_dir, train={"epochs": 1, "batch_size": 64, "shards": 2, "seed": 0},
                                 cluster={"workers": 1, "dashboard": False}).to_yaml())
    name = f"test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PREFECT_API_URL": API_URL, "PREFECT_RUNNER_POLL_FREQUENCY": "2", "NO_COLOR": "1"}
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([sys.executable, "-m", "dasktrain.cli", "deploy", str(config), "--interval", "5", "--name", name],
                             cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deployment_id = None
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 180
            completed = []
            while time.monotonic() < deadline and len(completed) < 2:
                assert serve.poll() is None, (tmp_path / "serve.log").read_text()
                time.sleep(2)
                if deployment_id is None:
                    try:
                        deployment_id = client.read_deployment_by_name(f"dasktrain-training/{name}").id
                    except Exception:  # not registered yet
                        continue
                completed = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))),
                )
            assert len(completed) >= 2, "two scheduled runs did not complete within 180 s:\n" + (
                tmp_path / "serve.log").read_text()
            run = completed[0]
            assert run.deployment_id == deployment_id and run.state.is_completed()
            # Two scheduled runs, each in its own run directory, publish under the same keys, named
            # after the deployment: one history per key in the UI.
            keys = [sorted(a.key for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[r.id])))) for r in completed[:2]]
            assert keys[0] == keys[1] == sorted(f"dasktrain-{name}-{kind}" for kind in ("summary", "epochs", "curves",
                                                                                       "progress")), keys
            # Stop scheduling, let a run in progress end, then stop the server process.
            client.pause_deployment(deployment_id)
            active = [StateType.RUNNING, StateType.PENDING]
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=active)))):
                time.sleep(1)
        # Each scheduled run trains in its own directory under output_dir.
        run_dirs = [d for d in runs_dir.iterdir() if (d / "model.safetensors").is_file()]
        assert any(run.name in d.name for d in run_dirs), sorted(p.name for p in runs_dir.iterdir())
    finally:
        stop(serve)
        log.close()
        if deployment_id is not None:
            with get_client(sync_client=True) as client:
                client.delete_deployment(deployment_id)
