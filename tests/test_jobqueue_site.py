"""Jobqueue specs merged onto a site's dask-jobqueue config, the job scripts they give, and
multi-GPU jobs that pin one worker process per GPU.

No batch system is needed here: the job scripts are dask-jobqueue's own (``job_script()``), and
the multi-GPU script is run as the batch system would run it, by bash, against a real scheduler.
A site's config is what dask-jobqueue reads, ``jobqueue.<kind>`` in Dask's config, set here with
``dask.config.set`` (tests/test_slurm_site.py gives it as a ``jobqueue.yaml`` through DASK_CONFIG).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask.config
import pytest
import yaml
from distributed import Client, LocalCluster

from dasktrain.cluster import jobqueue_script, visible_gpus
from dasktrain.cluster.gpu_pin import device_for
from dasktrain.config import ClusterConfig, load_config
from dasktrain.errors import ClusterError, ConfigError

pytest.importorskip("dask_jobqueue")

SITE = {
    "jobqueue.slurm.cores": 4,
    "jobqueue.slurm.memory": "6GB",
    "jobqueue.slurm.walltime": "00:20:00",
    "jobqueue.slurm.queue": "sitepart",
    "jobqueue.slurm.job-script-prologue": ["module load site-python"],
    "jobqueue.slurm.job-extra-directives": ["--constraint=site"],
}
"""A site's jobqueue.slurm section, as its jobqueue.yaml would give it."""

LEAN_LINE = "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False"


def script_lines(spec: dict[str, Any]) -> list[str]:
    _, script = jobqueue_script(ClusterConfig.model_validate(spec))
    return script.splitlines()


def test_the_site_config_stands_under_the_shipped_spec_and_dasktrain_adds_its_lines() -> None:
    with dask.config.set(SITE):
        lines = script_lines({"spec": "slurm", "workers": 2, "gpus_per_worker": 1})
    for expected in ("#SBATCH --cpus-per-task=4", "#SBATCH --mem=6G", "#SBATCH -t 00:20:00", "#SBATCH -p sitepart",
                     "#SBATCH --constraint=site", "#SBATCH --gres=gpu:1"):
        assert expected in lines, (expected, lines)
    # The site's prologue first, then dasktrain's environment lines, then the worker.
    assert lines.index("module load site-python") < lines.index("export MALLOC_ARENA_MAX=1") < len(lines) - 1
    assert lines.index("module load site-python") < lines.index(LEAN_LINE) < len(lines) - 1
    assert "--nthreads 4" in lines[-1] and "--nworkers" not in lines[-1]
    # Without a site config, the shipped spec's defaults.
    lines = script_lines({"spec": "slurm", "workers": 2})
    assert {"#SBATCH --cpus-per-task=1", "#SBATCH --mem=2G", "#SBATCH -t 01:00:00"} <= set(lines), lines
    assert "module load site-python" not in lines and LEAN_LINE in lines


def test_the_run_config_wins_over_the_site_key_by_key() -> None:
    with dask.config.set(SITE):
        lines = script_lines({"spec": "slurm", "lean": False, "jobqueue": {
            "cores": 2, "walltime": "00:05:00", "job_script_prologue": ["source run-env.sh"]}})
    assert {"#SBATCH --cpus-per-task=2", "#SBATCH -t 00:05:00", "#SBATCH --mem=6G", "#SBATCH -p sitepart",
            "#SBATCH --constraint=site", "source run-env.sh"} <= set(lines), lines
    assert "module load site-python" not in lines and LEAN_LINE not in lines


def test_the_gpu_check_looks_at_the_site_processes() -> None:
    with dask.config.set({**SITE, "jobqueue.slurm.processes": 4}):
        with pytest.raises(ClusterError, match=r"slurm\.yaml: cluster\.gpus_per_worker=1 needs one worker process per "
                                               r"job, and processes is 4 \(from site jobqueue\.slurm\)"):
            script_lines({"spec": "slurm", "gpus_per_worker": 1})
        # The run config's own processes win over the site's, in the check as in the job.
        lines = script_lines({"spec": "slurm", "gpus_per_worker": 1, "jobqueue": {"processes": 1}})
        assert "--nworkers" not in lines[-1] and "--nthreads 4" in lines[-1]
    # A spec of the user's own with no processes anywhere: dask-jobqueue's own choice counts too.
    with pytest.raises(ClusterError, match=r"processes is 3 \(from dask-jobqueue's default for cores=9\)"):
        script_lines({"kind": "slurm", "gpus_per_worker": 1, "jobqueue": {"cores": 9, "memory": "9GB"}})


def test_a_kind_without_cores_or_memory_anywhere_is_one_sentence() -> None:
    with pytest.raises(ClusterError, match=r"dask_jobqueue\.SLURMCluster needs cores and memory per job, and neither "
                                           r"cluster\.jobqueue, the site's Dask config jobqueue\.slurm nor "
                                           r"cluster\.jobqueue_defaults sets them; .*cluster: \{spec: slurm\}"):
        script_lines({"kind": "slurm"})


def test_spec_and_kind_that_disagree_are_refused_naming_both(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"data": {"store": "x"}, "model": {"factory": "m:f"},
                                   "cluster": {"kind": "local", "workers": 2}}))
    with pytest.raises(ConfigError, match=r"run\.yaml: 'cluster': cluster\.spec=slurm is a spec of kind 'slurm' "
                                          r"\(.*slurm\.yaml\), and cluster\.kind is 'local': they conflict"):
        load_config(run, ["cluster.spec=slurm"])
    # A kind given alone is the shipped spec of that kind, defaults included.
    cluster = load_config(run, ["cluster=slurm"]).cluster
    assert (cluster.kind, cluster.jobqueue_defaults["cores"], cluster.jobqueue_defaults["memory"]) == ("slurm", 1, "2GB")
    with pytest.raises(ConfigError, match=r"gpus_per_job=2 and gpus_per_worker=1 both ask for GPUs"):
        load_config(run, ["cluster=slurm", "cluster.gpus_per_worker=1", "cluster.gpus_per_job=2"])
    with pytest.raises(ConfigError, match=r"gpus_per_job=2 pins one worker process per GPU on kinds 'slurm' and "
                                          r"'pbs', not 'sge'"):
        load_config(run, ["cluster=sge", "cluster.gpus_per_job=2"])


@pytest.mark.parametrize("kind, request_line", [
    ("slurm", "#SBATCH --gres=gpu:2"),
    ("pbs", "#PBS -l select=1:ncpus=2:mem=1908MB:ngpus=2"),
])
@pytest.mark.timeout(90)
def test_a_multi_gpu_job_runs_a_worker_process_per_gpu_each_pinned_to_its_own(kind: str, request_line: str) -> None:
    _, script = jobqueue_script(ClusterConfig.model_validate(
        {"spec": kind, "workers": 4, "gpus_per_job": 2, "jobqueue": {"interface": "lo"}}))
    lines = script.splitlines()
    assert request_line in lines, lines
    worker = lines[-1]
    assert "--nworkers 2" in worker and "--nthreads 1" in worker
    assert "--preload-nanny dasktrain.cluster.gpu_pin" in worker
    # Run the job as its batch system would: bash, with the job's GPUs in CUDA_VISIBLE_DEVICES.
    with job_running(script, {**os.environ, "CUDA_VISIBLE_DEVICES": "3,5"}) as client:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        names = {address: info["name"] for address, info in client.scheduler_info(n_workers=-1)["workers"].items()}
    assert {str(names[address]): device for address, device in seen.items()} == {"dummy-name-0": "3", "dummy-name-1": "5"}


@pytest.mark.gpu
@pytest.mark.skipif(visible_gpus() < 2, reason="needs two CUDA GPUs")
@pytest.mark.timeout(120)
def test_each_worker_process_of_a_two_gpu_job_trains_on_its_own_gpu() -> None:
    _, script = jobqueue_script(ClusterConfig.model_validate(
        {"spec": "slurm", "workers": 2, "gpus_per_job": 2, "jobqueue": {"interface": "lo"}}))

    def own_gpu() -> tuple[int, str]:
        import torch

        return torch.cuda.device_count(), str(torch.cuda.get_device_properties(0).uuid)

    with job_running(script, dict(os.environ)) as client:
        seen = list(client.run(own_gpu).values())
    assert [count for count, _ in seen] == [1, 1] and len({uuid for _, uuid in seen}) == 2, seen


@contextmanager
def job_running(script: str, env: dict[str, str]) -> Iterator[Client]:
    """A job script run by bash, as a batch system runs it, against a scheduler of its own; a
    client once its two workers are up. The job's processes are ended on the way out."""
    with LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address="127.0.0.1:0",
                      scheduler_kwargs={"dashboard": False}) as cluster, Client(cluster) as client:
        job = subprocess.Popen(
            ["bash", "-c", script.replace("tcp://<insert-scheduler-address-here>:8786", cluster.scheduler_address)],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client.wait_for_workers(2, timeout=60)
            yield client
        finally:
            os.killpg(job.pid, signal.SIGTERM)
            job.wait(timeout=30)


def test_a_worker_process_beyond_the_jobs_gpus_is_refused() -> None:
    assert device_for("job-1", {"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}) == "GPU-bb"
    assert device_for("job-1", {}) == "1"
    with pytest.raises(RuntimeError, match=r"worker process 2 of its job has no GPU of its own: the job sees "
                                           r"CUDA_VISIBLE_DEVICES=0,1 \(2 GPUs\)"):
        device_for("job-2", {"CUDA_VISIBLE_DEVICES": "0,1"})


def test_cluster_show_prints_the_spec_and_the_job_script_and_submits_nothing(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "jobqueue.yaml").write_text(yaml.safe_dump({"jobqueue": {"slurm": {
        "cores": 3, "memory": "5GB", "job-script-prologue": ["module load site-python"]}}}))
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"data": {"store": "x"}, "model": {"factory": "m:f"}, "train": {"shards": 4},
                                   "cluster": {"spec": "slurm", "workers": 3}}))
    # No sbatch on the PATH: showing must not need one.
    env = {**os.environ, "DASK_CONFIG": str(site), "NO_COLOR": "1", "PATH": os.path.dirname(sys.executable)}
    result = subprocess.run([sys.executable, "-m", "dasktrain.cli", "cluster", "show", str(run)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "kind: slurm" in out and "workers: 3" in out
    assert "cores: 3  # site jobqueue.slurm" in out and "processes: 1  # cluster.jobqueue_defaults" in out
    assert "3 job(s) of 1 worker process(es)" in out and "starts once 1 worker(s) are up" in out
    script = out.partition("\n# job script")[2].partition("\n")[2].splitlines()
    assert script[0] == "#!/usr/bin/env bash", out
    assert {"#SBATCH --cpus-per-task=3", "#SBATCH --mem=5G", "#SBATCH -t 01:00:00", "module load site-python",
            LEAN_LINE} <= set(script), out
    assert script[-1].startswith(f"{sys.executable} -m distributed.cli.dask_worker tcp://<insert-scheduler-address")
