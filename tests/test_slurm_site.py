"""A site's dask-jobqueue config on a real SLURM, a run that starts before all its jobs run, and a
submission SLURM refuses.

Needs the single-node SLURM of ``scripts/slurm/start.sh`` (CI starts it) and skips without one.
The site's config is a ``jobqueue.yaml`` in a folder named by ``DASK_CONFIG``, as on a cluster.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.config
import numpy as np
import pytest
import yaml
from distributed import default_client

from dasktrain.cluster import open_cluster
from dasktrain.config import ClusterConfig
from dasktrain.errors import ClusterError
from dasktrain.ingest import example_arrays, write_store
from dasktrain.metrics import read_metrics
from dasktrain.run_loop import train
from tests.helpers import run_config
from tests.ledger_check import check_exactly_once
from tests.test_clusters import slurm, squeue, wait_until  # noqa: F401 (slurm: the fixture, skips without SLURM)

pytest.importorskip("dask_jobqueue")

SITE = {"cores": 1, "memory": "3GB", "walltime": "00:09:00",
        "job-script-prologue": ["export DASKTRAIN_SITE_MARK=prologue-kept"],
        "job-extra-directives": ["--comment=site-directive-kept", "--hold"]}
"""The site's jobqueue.slurm section. Its ``--hold`` makes SLURM keep every job until released."""


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_store(tmp_path_factory.mktemp("digits") / "digits.zarr", example_arrays("digits"), chunk_size=64)


@pytest.fixture
def site_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder holding the site's jobqueue.yaml, read as Dask reads DASK_CONFIG (here, and in the
    CLI's subprocess through the variable itself); Dask's config is read afresh afterwards."""
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "jobqueue.yaml").write_text(yaml.safe_dump({"jobqueue": {"slurm": SITE}}))
    dask.config.refresh(paths=[*dask.config.paths, str(folder)])
    try:
        yield folder
    finally:
        dask.config.refresh()


def scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=10, check=True).stdout


def same_job(script: str) -> str:
    """A job script with what differs from job to job (the scheduler's address, the worker's
    name) replaced by what ``cluster show`` prints there."""
    script = re.sub(r"tcp://[\d.]+:\d+", "tcp://<insert-scheduler-address-here>:8786", script)
    return re.sub(r"--name \S+", "--name dummy-name", script).strip()


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("slurm")
def test_site_config_is_kept_and_a_held_job_joins_the_run_when_released(digits: Path, site_dir: Path,
                                                                         tmp_path: Path) -> None:
    name = f"dasktrain-site-{uuid.uuid4().hex[:8]}"
    config = run_config(
        digits, tmp_path / "run",
        train={"epochs": 3, "batch_size": 100, "shards": 4, "seed": 3, "deterministic": True, "ledger": True,
               "min_workers": 1},
        cluster={"spec": "slurm", "workers": 2, "wait_timeout": 90,
                 # A spec default other than the site's cores: the site's must stand.
                 "jobqueue_defaults": {"cores": 2},
                 "jobqueue": {"interface": "lo", "job_name": name, "log_directory": str(tmp_path / "jobs")}})
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(config.to_yaml())

    # 1. The job script `cluster show` prints keeps the site's lines and values.
    shown = subprocess.run([sys.executable, "-m", "dasktrain.cli", "cluster", "show", str(run_yaml)],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "DASK_CONFIG": str(site_dir), "NO_COLOR": "1"})
    assert shown.returncode == 0, shown.stderr
    script = shown.stdout.partition("\n# job script")[2].partition("\n")[2].strip()
    for line in ("#SBATCH --cpus-per-task=1", "#SBATCH --mem=3G", "#SBATCH -t 00:09:00",
                 "#SBATCH --comment=site-directive-kept", "#SBATCH --hold", "export DASKTRAIN_SITE_MARK=prologue-kept",
                 "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False"):
        assert line in script.splitlines(), (line, script)
    assert not squeue(name), "cluster show submitted a job"

    # 2. The jobs as SLURM got them: held; the first is released by the time its script was read.
    seen: dict[str, Any] = {}

    def release_the_first() -> None:
        if not wait_until(lambda: len(squeue(name)) == 2, 60):
            return
        jobs = sorted((job[0] for job in squeue(name)), key=int)
        seen["jobs"] = jobs
        seen["shown"] = {job: scontrol("show", "job", job) for job in jobs}
        seen["scripts"] = {job: scontrol("write", "batch_script", job, "-") for job in jobs}
        scontrol("release", jobs[0])

    releaser = threading.Thread(target=release_the_first, daemon=True)
    releaser.start()

    def on_event(event: dict[str, Any]) -> None:
        if event["kind"] == "start":
            seen["start_workers"] = len(event["workers"])
            seen["second_at_start"] = scontrol("show", "job", seen["jobs"][1])
        elif event["kind"] == "step" and "released" not in seen:
            # The run trains on one worker; the second job, released now, joins it: the driver
            # waits here (between two steps) until its worker is up, so the join falls mid-run.
            seen["released"] = event["global_step"]
            scontrol("release", seen["jobs"][1])
            client = default_client()
            assert wait_until(lambda: len(client.scheduler_info(n_workers=-1)["workers"]) == 2, 90)

    result = train(config, on_event=on_event)
    releaser.join(5)
    assert result.completed
    for job in seen["jobs"]:
        info = seen["shown"][job]
        assert "Reason=JobHeldUser" in info and "Comment=site-directive-kept" in info, info
        assert "TimeLimit=00:09:00" in info and "MinMemoryNode=3G" in info and "NumCPUs=1 " in info, info
        assert same_job(seen["scripts"][job]) == script
    assert seen["start_workers"] == 1
    assert "JobState=PENDING" in seen["second_at_start"] and "Reason=JobHeldUser" in seen["second_at_start"]
    records = read_metrics(tmp_path / "run")
    joined = [r for r in records if r["kind"] == "regroup" and r["joined"]]
    assert len(joined) == 1 and joined[0]["global_step"] > seen["released"], joined
    steps = [r for r in records if r["kind"] == "step"]
    assert {r["workers"] for r in steps if r["global_step"] < joined[0]["global_step"]} == {1}
    assert {r["workers"] for r in steps if r["global_step"] >= joined[0]["global_step"]} == {2}
    # Every sample once per epoch, across the join (a reference of its own: every sample of the store).
    check_exactly_once(tmp_path / "run", np.arange(len(example_arrays("digits")["targets"])), epochs=3)
    assert wait_until(lambda: not squeue(name), 30), squeue(name)


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("slurm")
def test_a_submission_slurm_refuses_is_one_line_with_sbatchs_message(digits: Path, tmp_path: Path) -> None:
    name = f"dasktrain-refused-{uuid.uuid4().hex[:8]}"
    spec = ClusterConfig.model_validate({"spec": "slurm", "workers": 2, "wait_timeout": 30, "jobqueue": {
        "queue": "no-such-partition", "interface": "lo", "job_name": name}})
    with pytest.raises(ClusterError) as info:
        with open_cluster(spec):
            pass
    message = str(info.value)
    assert re.fullmatch(r"cluster spec .*slurm\.yaml: cannot submit 2 worker job\(s\) with dask_jobqueue\.SLURMCluster: "
                        r"sbatch said: sbatch: error: invalid partition specified: no-such-partition .*", message), message
    assert "\n" not in message
    # And on the command line: one error line, no traceback, nothing else logged.
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(run_config(digits, tmp_path / "run", cluster=spec.model_dump(mode="json")).to_yaml())
    result = subprocess.run(
        [sys.executable, "-m", "dasktrain.cli", "predict", str(run_yaml), "--checkpoint", str(tmp_path / "none"),
         "--input", str(digits), "--output", str(tmp_path / "out.zarr")],
        capture_output=True, text=True, timeout=60, env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cluster spec ") and "sbatch said: sbatch: error: " \
        "invalid partition specified: no-such-partition" in lines[0], result.stderr
    assert not squeue(name)
