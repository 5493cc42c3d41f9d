"""Cluster kinds end to end: a real SLURM, TLS, an existing scheduler, and the errors of bad specs.

The SLURM tests need a running single-node SLURM (``bash scripts/slurm/start.sh``; CI starts it)
and skip, saying why, without one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import dask.config
import pytest
import yaml
from distributed import Client, Security
from distributed.comm import connect

from dasktrain.allocator import keep_freed_memory
from dasktrain.cluster import open_cluster
from dasktrain.config import ClusterConfig, validate_config
from dasktrain.errors import ClusterError, ConfigError
from dasktrain.ingest import example_arrays, write_store
from dasktrain.run_loop import train
from tests.helpers import run_config
from tests.processes import dask_processes

SLURM_DIR = Path(os.environ.get("DASKTRAIN_SLURM_DIR", "/tmp/dasktrain-slurm"))


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_store(tmp_path_factory.mktemp("digits") / "digits.zarr", example_arrays("digits"), chunk_size=64)


def spec_file(tmp: Path, name: str, spec: dict[str, Any]) -> str:
    path = tmp / name
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def one_epoch(store: Path, out: Path, cluster: dict[str, Any]):
    return run_config(store, out, train={"epochs": 1, "batch_size": 100, "shards": 4, "seed": 3}, cluster=cluster)


# -- SLURM -------------------------------------------------------------------------------------

@pytest.fixture
def slurm(monkeypatch: pytest.MonkeyPatch) -> str:
    """SLURM_CONF of a running SLURM whose node is idle; skips otherwise."""
    if shutil.which("sinfo") is None:
        pytest.skip("SLURM is not installed (no sinfo); bash scripts/slurm/start.sh installs and starts it")
    conf = os.environ.get("SLURM_CONF") or str(SLURM_DIR / "slurm.conf")
    if not Path(conf).is_file():
        pytest.skip(f"SLURM is not running: no {conf}; start it with bash scripts/slurm/start.sh")
    monkeypatch.setenv("SLURM_CONF", conf)
    state = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=10)
    states = state.stdout.split()
    if state.returncode != 0 or not {"idle", "mix"} & set(states):
        pytest.skip(f"SLURM is not running or its node is not idle (sinfo: {state.stdout.strip() or state.stderr.strip()})")
    return conf


def squeue(name: str) -> list[list[str]]:
    out = subprocess.run(["squeue", "-h", f"--name={name}", "-o", "%i %T %N"], capture_output=True, text=True,
                         timeout=10, check=True).stdout
    return [line.split() for line in out.splitlines()]


def processes_of_jobs(job_ids: set[str]) -> dict[int, str]:
    """pid -> command line of every process running inside one of the SLURM jobs ``job_ids``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(var.startswith(b"SLURM_JOB_ID=") and var.split(b"=", 1)[1].decode() in job_ids for var in env):
            found[int(entry.name)] = cmd
    return found


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return predicate()


def slurm_spec(tmp: Path, name: str, **extra: Any) -> dict[str, Any]:
    return {"spec": "slurm", "workers": 2, "wait_timeout": 60, "jobqueue": {
        "cores": 1, "processes": 1, "memory": "2GB", "interface": "lo", "walltime": "00:10:00",
        "job_name": name, "log_directory": str(tmp / "jobs"), **extra}}


@pytest.mark.timeout(120)
def test_slurm_trains_on_two_worker_jobs_and_leaves_nothing(slurm: str, digits: Path, tmp_path: Path) -> None:
    name = f"dasktrain-test-{uuid.uuid4().hex[:8]}"
    # train.min_workers=2: the run starts once both jobs run (a run that starts on fewer: test_slurm_site.py).
    config = run_config(digits, tmp_path / "run", train={"epochs": 1, "batch_size": 100, "shards": 4, "seed": 3,
                                                         "min_workers": 2}, cluster=slurm_spec(tmp_path, name))
    seen: dict[str, Any] = {}

    def on_event(event: dict[str, Any]) -> None:
        if event["kind"] == "start":  # the workers are up: they must be running SLURM jobs
            seen["jobs"] = squeue(name)
            seen["processes"] = processes_of_jobs({job[0] for job in seen["jobs"]})
            seen["environ"] = {pid: Path(f"/proc/{pid}/environ").read_bytes() for pid in seen["processes"]}

    result = train(config, on_event=on_event)
    assert result.completed and result.model_path.exists()
    jobs = seen["jobs"]
    assert len(jobs) == 2 and all(state == "RUNNING" for _, state, _ in jobs), jobs
    workers = [pid for pid, cmd in seen["processes"].items() if "dask_worker" in cmd or "dask-worker" in cmd]
    assert workers, seen["processes"]
    # cluster.lean reached the job's worker through its environment, as did one glibc arena.
    environ = seen["environ"][workers[0]].split(b"\0")
    assert b"DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False" in environ and b"MALLOC_ARENA_MAX=1" in environ
    ids = {job[0] for job in jobs}
    # Afterwards: the jobs were cancelled and their processes are gone.
    assert wait_until(lambda: not squeue(name), 30), squeue(name)
    assert wait_until(lambda: not processes_of_jobs(ids), 30), processes_of_jobs(ids)
    # No slurmdbd here, so plain sacct has no records; `sacct -c` reads the job completion log
    # (jobcomp/filetxt in scripts/slurm/slurm.conf.in), written when a job ends.
    def finished() -> dict[str, str]:
        out = subprocess.run(["sacct", "-c", "-n", "-P", "-o", "JobID,JobName,State"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        rows = [line.split("|") for line in out.splitlines()]
        return {row[0]: row[2] for row in rows if row[0] in ids and row[1] == name}
    assert wait_until(lambda: len(finished()) == 2, 20), finished()


@pytest.mark.timeout(60)
def test_slurm_workers_that_never_start_fail_in_time_and_their_job_is_cancelled(slurm: str, digits: Path,
                                                                                 tmp_path: Path) -> None:
    name = f"dasktrain-test-{uuid.uuid4().hex[:8]}"
    cluster = slurm_spec(tmp_path, name, job_extra_directives=["--begin=now+1hour"])  # stays pending
    path = spec_file(tmp_path, "pending.yaml", {k: v for k, v in cluster.items() if k != "spec"} | {"kind": "slurm"})
    config = one_epoch(digits, tmp_path / "run", {"spec": path, "workers": 1, "wait_timeout": 3})
    with pytest.raises(ClusterError, match=r"pending\.yaml: 0 of cluster\.workers=1 workers arrived within "
                                           r"cluster\.wait_timeout=3 s; jobs \['\d+'\]"):
        train(config)
    assert wait_until(lambda: not squeue(name), 20), squeue(name)


# -- TLS ---------------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_tls_cluster_trains_and_refuses_a_client_without_certificates(digits: Path, tmp_path: Path) -> None:
    config = one_epoch(digits, tmp_path / "run", {"kind": "local", "workers": 2, "security": "tls"})
    with open_cluster(config.cluster) as client:
        address = client.scheduler.address
        assert address.startswith("tls://")
        assert all(w.startswith("tls://") for w in client.scheduler_info(n_workers=-1)["workers"])
        assert train(config, client=client).completed
        # A client that trusts the scheduler (it has the authority's certificate) but presents none.
        no_cert = ssl.create_default_context(cadata=client.security.tls_ca_file)
        no_cert.check_hostname = False
        with pytest.raises(OSError):
            asyncio.run(connect(address, timeout=3, ssl_context=no_cert, require_encryption=True))
        with pytest.raises(OSError):  # one with a certificate of another authority
            Client(address, security=Security.temporary(), timeout=3)
        with pytest.raises(OSError):  # and plain TCP to the TLS port
            Client(address.replace("tls://", "tcp://"), timeout=3)
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2  # the cluster is unharmed


# -- address -----------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_address_trains_on_a_running_scheduler_and_leaves_it_running(digits: Path, tmp_path: Path) -> None:
    with dask_processes(tmp_path, workers=2) as address:
        path = spec_file(tmp_path, "address.yaml", {"kind": "address", "address": address, "workers": 2,
                                                    "wait_timeout": 60})
        with Client(address, timeout=30) as watcher:
            watcher.wait_for_workers(2, timeout=60)
            before = sorted(watcher.scheduler_info(n_workers=-1)["workers"])
            assert train(one_epoch(digits, tmp_path / "run", {"spec": path})).completed
            assert sorted(watcher.scheduler_info(n_workers=-1)["workers"]) == before
            # Asking for more workers than there are: a clear timeout, and still nothing closed.
            more = ClusterConfig.model_validate({"spec": path, "workers": 3, "wait_timeout": 2})
            with pytest.raises(ClusterError, match=r"address\.yaml: 2 of cluster\.workers=3 workers arrived "
                                                   r"within cluster\.wait_timeout=2 s"):
                with open_cluster(more):
                    pass
            assert sorted(watcher.scheduler_info(n_workers=-1)["workers"]) == before


# -- bad specs ---------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_lean_turns_dask_housekeeping_down_in_the_workers_it_starts() -> None:
    keys = ("distributed.worker.profile.enabled", "distributed.admin.tick.interval")
    seen = {}
    monitors = {}
    for lean in (True, False):
        with open_cluster(ClusterConfig(workers=1, dashboard=False, lean=lean)) as client:
            seen[lean] = next(iter(client.run(lambda: [dask.config.get(k) for k in keys]).values()))
            # Milliseconds between memory checks, in the worker and in its nanny (which lives here).
            [worker] = client.run(lambda dask_worker: dask_worker.periodic_callbacks["memory_monitor"].callback_time
                                  ).values()
            [nanny] = client.run(lambda dask_worker: dask_worker.periodic_callbacks["memory_monitor"].callback_time,
                                 nanny=True).values()
            monitors[lean] = (worker, nanny)
            # Either way the worker process started with one glibc arena, and Dask's own variables.
            environ = next(iter(client.run(lambda: dict(os.environ)).values()))
            assert environ["MALLOC_ARENA_MAX"] == "1" and environ["MALLOC_TRIM_THRESHOLD_"] == "65536"
    assert seen[True] == [False, "500ms"]
    assert seen[False] == [dask.config.get(keys[0]), dask.config.get(keys[1])] == [True, "20ms"]
    assert monitors == {True: (1000, 1000), False: (100, 100)}


def test_a_worker_thread_without_one_arena_says_so(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    # What a worker of a cluster dasktrain did not start (an address cluster) logs once it trains.
    said: dict[str, list[str]] = {}

    def train_thread(name: str) -> None:
        caplog.clear()
        thread = threading.Thread(target=keep_freed_memory)
        thread.start()
        thread.join(timeout=10)
        said[name] = [r.getMessage() for r in caplog.records if "MALLOC_ARENA_MAX" in r.getMessage()]

    with caplog.at_level(logging.INFO, logger="dasktrain.allocator"):
        monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
        train_thread("without")
        monkeypatch.setenv("MALLOC_ARENA_MAX", "1")
        train_thread("with")
    assert len(said["without"]) == 1 and "started without MALLOC_ARENA_MAX=1" in said["without"][0]
    assert said["with"] == []


def test_unknown_kind_names_the_spec_file_and_field(tmp_path: Path) -> None:
    path = spec_file(tmp_path, "k8s.yaml", {"kind": "kubernetes", "workers": 2})
    with pytest.raises(ConfigError, match=r"k8s\.yaml: unknown kind 'kubernetes' in 'cluster\.kind' \(kinds: local, "):
        validate_config({"data": {"store": "x"}, "model": {"factory": "m:f"}, "cluster": {"spec": path}})


@pytest.mark.timeout(30)
def test_inline_keys_override_the_spec_file_and_set_overrides_work(tmp_path: Path) -> None:
    from dasktrain.config import load_config

    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"data": {"store": "x"}, "model": {"factory": "m:f"}, "train": {"shards": 8},
                                   "cluster": {"spec": "slurm", "jobqueue": {"queue": "gpu"}}}))
    cluster = load_config(run, ["cluster.workers=8", "cluster.jobqueue.cores=4"]).cluster
    assert (cluster.kind, cluster.workers, cluster.spec and Path(cluster.spec).name) == ("slurm", 8, "slurm.yaml")
    # The run's own jobqueue keys; the shipped spec's are defaults under the site's (test_jobqueue_site.py).
    assert cluster.jobqueue == {"queue": "gpu", "cores": 4}
    assert cluster.jobqueue_defaults == {"cores": 1, "processes": 1, "memory": "2GB", "walltime": "01:00:00"}
    with pytest.raises(ConfigError, match=r"cluster spec .*slurm\.yaml: 'cluster\.wait_timeout'"):
        ClusterConfig.model_validate({"spec": spec_file(tmp_path, "slurm.yaml", {"kind": "slurm", "wait_timeout": -1})})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("jobqueue, match", [
    ({"cores": 1, "memory": "2GB", "queues": "gpu"}, r"cluster\.jobqueue\.queues is not an option of dask_jobqueue\.SLURMCluster"),
    ({"memory": "2GB"}, r"dask_jobqueue\.SLURMCluster needs cores per job, and neither cluster\.jobqueue"),
    ({"cores": 1, "memory": "2GB", "n_workers": 3}, r"cluster\.jobqueue\.n_workers is set by dasktrain from cluster\.workers"),
])
def test_jobqueue_option_the_class_rejects(tmp_path: Path, jobqueue: dict[str, Any], match: str) -> None:
    pytest.importorskip("dask_jobqueue")
    path = spec_file(tmp_path, "hpc.yaml", {"kind": "slurm", "jobqueue": jobqueue})
    with pytest.raises(ClusterError, match=r"cluster spec .*hpc\.yaml: " + match):
        with open_cluster(ClusterConfig.model_validate({"spec": path})):
            pass


@pytest.mark.timeout(30)
def test_local_cuda_without_a_gpu_is_one_sentence(tmp_path: Path) -> None:
    from dasktrain.cluster import visible_gpus

    if visible_gpus():
        pytest.skip("this machine has a GPU")
    path = spec_file(tmp_path, "gpu.yaml", {"kind": "local-cuda"})
    with pytest.raises(ClusterError) as info:
        with open_cluster(ClusterConfig.model_validate({"spec": path})):
            pass
    message = str(info.value)
    assert "gpu.yaml: cluster.kind 'local-cuda' needs a CUDA GPU, and none is visible" in message
    assert "\n" not in message and "Traceback" not in message


@pytest.mark.timeout(30)
def test_local_cuda_without_dask_cuda_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dasktrain.cluster.specs

    monkeypatch.setattr(dasktrain.cluster.specs, "visible_gpus", lambda: 1)
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # importing it now fails, as where it is missing
    path = spec_file(tmp_path, "gpu.yaml", {"kind": "local-cuda"})
    with pytest.raises(ClusterError, match=r"gpu\.yaml: cluster\.kind 'local-cuda' needs dask-cuda, which cannot "
                                           r"be imported here .*pip install 'dasktrain\[cuda\]'"):
        with open_cluster(ClusterConfig.model_validate({"spec": path})):
            pass


@pytest.mark.timeout(30)
def test_unreachable_address(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = spec_file(tmp_path, "remote.yaml", {"kind": "address", "address": f"tcp://127.0.0.1:{port}",
                                                "wait_timeout": 2})
    started = time.monotonic()
    with pytest.raises(ClusterError, match=rf"remote\.yaml: cannot reach the scheduler at cluster\.address="
                                           rf"tcp://127\.0\.0\.1:{port} within cluster\.wait_timeout=2 s"):
        with open_cluster(ClusterConfig.model_validate({"spec": path})):
            pass
    assert time.monotonic() - started < 15


@pytest.mark.timeout(30)
def test_spec_cross_field_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"a\.yaml: 'cluster\.address': kind 'address' needs cluster\.address"):
        ClusterConfig.model_validate({"spec": spec_file(tmp_path, "a.yaml", {"kind": "address"})})
    with pytest.raises(ConfigError, match=r"s\.yaml: 'cluster\.tls': security 'tls' with kind 'slurm' needs"):
        ClusterConfig.model_validate({"spec": spec_file(tmp_path, "s.yaml", {"kind": "slurm", "security": "tls"})})
    with pytest.raises(ConfigError, match=r"g\.yaml: 'cluster\.gpus_per_worker': gpus_per_worker=1 needs jobqueue\.processes: 1"):
        ClusterConfig.model_validate({"spec": spec_file(tmp_path, "g.yaml", {
            "kind": "slurm", "gpus_per_worker": 1, "jobqueue": {"processes": 2}})})
    with pytest.raises(ConfigError, match=r"cluster\.spec: nowhere\.yaml is not a file, nor a shipped spec"):
        ClusterConfig.model_validate({"spec": "nowhere.yaml"})
