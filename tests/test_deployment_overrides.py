"""A flow run of a served deployment may override data keys only, never code.

The deployment is served by ``dasktrain deploy`` (owner's ``--set``: trusted, baked in) on a real
``prefect server`` (PREFECT_API_URL; skipped without one); flow runs are created through the API
as a UI or ``prefect deployment run`` user would. A run naming code (``model.factory``) or changing
the deployment's own parameters fails with one line naming the key, and its command never runs;
``train.epochs`` is accepted. A direct call of the flow stays unrestricted. Every process the test
starts is ended by pid.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.helpers import run_config

# The live-server check (a module-level skip without one) and the process helper are the
# deployment tests' own.
from tests.test_deployments import API_URL, ROOT, stop

pytestmark = pytest.mark.timeout(240)


def test_flow_runs_of_a_deployment_override_data_keys_only(digits_store: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun

    runs_dir, marker = tmp_path / "runs", tmp_path / "MARKER"
    config = tmp_path / "deployed.yaml"
    config.write_text(run_config(digits_store, runs_dir, train={"epochs": 2, "batch_size": 64, "shards": 2, "seed": 0},
                                 cluster={"workers": 1, "dashboard": False}).to_yaml())
    payload = ["model.factory=subprocess:getoutput", f"model.kwargs={{cmd: touch {marker}}}"]

    # The payload works: a direct call of the flow (the user's own code) is not restricted. In a
    # process of its own: Prefect's background workers (events, logs) stay bound to the server of
    # the first flow run of a process, and the other test modules run flows on their own servers.
    direct = subprocess.run(
        [sys.executable, "-c", "import sys; from dasktrain.flows.training import training_flow; "
         "training_flow(sys.argv[1], overrides=sys.argv[2:], return_state=True)", str(config), *payload],
        cwd=ROOT, env={**os.environ, "PREFECT_API_URL": API_URL}, capture_output=True, text=True, timeout=120)
    assert marker.exists(), direct.stdout[-3000:] + direct.stderr[-3000:]
    marker.unlink()

    name = f"test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PREFECT_API_URL": API_URL, "PREFECT_RUNNER_POLL_FREQUENCY": "1", "NO_COLOR": "1"}
    log = open(tmp_path / "serve.log", "w")
    owner = "model.kwargs={in_features: 64, out_features: 10, hidden: [16]}"  # the owner may name code
    serve = subprocess.Popen([sys.executable, "-m", "dasktrain.cli", "deploy", str(config), "--cron", "0 0 1 1 *",
                              "--name", name, "--set", owner], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deployment_id = None
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 60
            while deployment_id is None:
                assert serve.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                try:
                    deployment_id = client.read_deployment_by_name(f"dasktrain-training/{name}").id
                except Exception:  # not registered yet
                    time.sleep(0.5)
            # Each run costs a process start (~10 s here): one override naming code, one change of a
            # parameter of the deployment's own (the same check refuses `config`, `per_run_output`, ...).
            bad = {"model.factory": {"overrides": payload}, "deployment_overrides": {"deployment_overrides": payload}}
            runs = {key: client.create_flow_run_from_deployment(deployment_id, parameters=parameters).id
                    for key, parameters in bad.items()}
            runs["good"] = client.create_flow_run_from_deployment(deployment_id, parameters={"overrides": ["train.epochs=1"]}).id
            final: dict[str, FlowRun] = {}
            deadline = time.monotonic() + 180
            while len(final) < len(runs):
                assert serve.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                for key, run_id in runs.items():
                    run = client.read_flow_run(run_id)
                    if run.state is not None and run.state.is_final():
                        final[key] = run
                time.sleep(0.5)
        for key in bad:
            message = final[key].state.message or ""
            assert final[key].state.is_failed() and f"{key!r} refused" in message and "\n" not in message, message
        assert not marker.exists()
        assert final["good"].state.is_completed(), final["good"].state.message
        (run_dir,) = [d for d in runs_dir.iterdir() if final["good"].name in d.name]
        trained = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert trained["train"]["epochs"] == 1 and trained["model"]["kwargs"]["hidden"] == [16]
    finally:
        stop(serve)
        log.close()
        if deployment_id is not None:
            with get_client(sync_client=True) as client:
                client.delete_deployment(deployment_id)
