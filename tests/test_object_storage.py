"""Object storage: the store, the run directory and the predictions on a real S3 server.

The server is moto's standalone S3 server (``python -m moto.server``), started on 127.0.0.1 on a
free port for this module and ended by pid. Credentials come from the environment (inherited by
the LocalCluster's worker processes and the CLI subprocesses); the endpoint comes from the
config's ``storage_options``, so a worker that opened a URL without them would reach for AWS
itself and fail. The checks read S3 with s3fs directly, not through dasktrain.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import psutil
import pytest
import torch
import yaml
import zarr
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file

from dasktrain import inference
from dasktrain.errors import ConfigError, DataError
from dasktrain.ingest import write_store
from dasktrain.run_lock import RunDirLockedError, run_lock
from dasktrain.run_loop import train
from dasktrain.storage import locate
from tests.helpers import local_client, run_config
from tests.ledger_check import samples_per_epoch

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[1]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
SERVER_START_S = 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for this module, with the test credentials in the environment."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    with pytest.MonkeyPatch.context() as env:
        for key, value in CREDENTIALS.items():
            env.setenv(key, value)
        try:
            deadline = time.monotonic() + SERVER_START_S
            while True:
                try:
                    urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"moto's S3 server did not start on {endpoint}: {log.read_text()[-2000:]}")
                    time.sleep(0.1)
            yield endpoint
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=20)


@pytest.fixture(scope="module")
def s3(s3_endpoint: str) -> dict[str, Any]:
    """A fresh bucket on the server, its storage options and an s3fs filesystem to check it with."""
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False, **options)
    bucket = f"dasktrain-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    return {"options": options, "fs": fs, "bucket": bucket, "endpoint": s3_endpoint}


@pytest.fixture(scope="module")
def s3_store(s3: dict[str, Any]) -> str:
    """A small classification store written straight to S3 (ingest to a URL): 384 samples, 12 chunks."""
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 10, size=384)
    centers = rng.normal(size=(10, 64)).astype(np.float32)
    inputs = (centers[targets] + rng.normal(scale=0.5, size=(384, 64))).astype(np.float32)
    url = f"s3://{s3['bucket']}/data/blobs.zarr"
    write_store(url, {"inputs": inputs, "targets": targets.astype(np.int64)}, chunk_size=32,
                storage_options=s3["options"])
    return url


@pytest.fixture(scope="module")
def client(s3_endpoint: str) -> Iterator[Any]:
    """Two worker processes, started after the credentials are in the environment (they inherit them)."""
    with local_client(2) as c:
        yield c


def s3_config(s3: dict[str, Any], store: str, output_dir: str | Path) -> Any:
    """The runs of this module: 3 epochs of 24 steps, deterministic, a checkpoint every 4 steps."""
    return run_config(store, output_dir, storage_options=s3["options"], optimizer={"name": "adamw", "lr": 0.003},
                      train={"epochs": 3, "batch_size": 16, "shards": 4, "seed": 7, "deterministic": True,
                             "ledger": True},
                      checkpoint={"every_steps": 4, "keep": 2})


@pytest.fixture(scope="module")
def reference(s3: dict[str, Any], s3_store: str, client: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of :func:`s3_config` into a local run directory (same store on S3)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(s3_config(s3, s3_store, run_dir), client=client)
    return run_dir


def _weights_on_s3(s3: dict[str, Any], key: str) -> dict[str, torch.Tensor]:
    return load_tensors(s3["fs"].cat_file(f"{s3['bucket']}/{key}"))


def _assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def _no_local_url_dirs(*folders: Path) -> None:
    for folder in folders:
        found = sorted(p.name for p in folder.iterdir() if p.name.endswith(":"))
        assert not found, f"local directories named after a URL protocol in {folder}: {found}"


def _names(fs: Any, prefix: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[1] for p in fs.ls(prefix, detail=False))


def test_train_checkpoint_resume_and_predict_on_s3(s3: dict[str, Any], s3_store: str, client: Any,
                                                  reference: Path, tmp_path: Path) -> None:
    fs, bucket = s3["fs"], s3["bucket"]
    run_url = f"s3://{bucket}/runs/first"
    config = s3_config(s3, s3_store, run_url)
    first = train(config, client=client, until_epoch=1)
    assert not first.completed and first.steps == 24
    checkpoints = f"{bucket}/runs/first/checkpoints"
    # Each checkpoint's files and its marker, written last; only the newest `keep` remain.
    assert _names(fs, checkpoints) == ["step-00000020", "step-00000024"]
    assert _names(fs, f"{checkpoints}/step-00000024") == [
        "COMMITTED", "model.safetensors", "optimizer.safetensors", "state.json"]
    assert json.loads(fs.cat_file(f"{checkpoints}/step-00000024/state.json"))["step"] == 24
    assert ".lock" not in _names(fs, f"{bucket}/runs/first")  # released
    # A writer killed before its marker: objects of a newer checkpoint, uncommitted. Resume must not trust them.
    fs.pipe_file(f"{checkpoints}/step-00000028/state.json", json.dumps({"step": 28}).encode())
    fs.pipe_file(f"{checkpoints}/step-00000028/model.safetensors", b"torn")
    # The newest committed one damaged after its commit (a bad copy): set aside, resumed from the one before.
    whole = fs.cat_file(f"{checkpoints}/step-00000024/model.safetensors")
    fs.pipe_file(f"{checkpoints}/step-00000024/model.safetensors", whole[: len(whole) // 2])

    events: list[dict[str, Any]] = []
    resumed = train(config, client=client, resume=True, on_event=events.append)
    assert resumed.completed and resumed.steps == 72
    assert [e["start_step"] for e in events if e["kind"] == "start"] == [20]
    records = [json.loads(line) for line in fs.cat_file(f"{bucket}/runs/first/metrics.jsonl").decode().splitlines()]
    assert [r["global_step"] for r in records if r["kind"] == "step"] == list(range(72))
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1, 2]
    _assert_bitwise_equal(_weights_on_s3(s3, "runs/first/model.safetensors"),
                          load_file(str(reference / "model.safetensors")))
    # Exactly once per epoch across the resume, from the ledger the workers wrote on S3 (audited locally).
    fs.get(f"{bucket}/runs/first/ledger", str(tmp_path / "copy" / "ledger"), recursive=True)
    fs.get(f"{bucket}/runs/first/metrics.jsonl", str(tmp_path / "copy" / "metrics.jsonl"))
    used = samples_per_epoch(tmp_path / "copy")
    assert sorted(used) == [0, 1, 2]
    for epoch, counts in used.items():
        assert sorted(counts) == list(range(384)) and set(counts.values()) == {1}, epoch

    # Predict from the run directory on S3 into S3; the reference run's model predicted into a local store.
    out_url = f"s3://{bucket}/predictions/first.zarr"
    written = inference.predict(client, config, run_url, s3_store, out_url)
    assert written["samples"] == 384
    inference.predict(client, config, str(reference), s3_store, tmp_path / "local.zarr")
    remote = zarr.open_group(out_url, mode="r", storage_options=s3["options"])
    local = zarr.open_group(str(tmp_path / "local.zarr"), mode="r")
    assert remote.attrs["dasktrain"]["written_by"] == "predict"
    for name in ("predictions", "labels"):
        assert np.array_equal(np.asarray(remote[name][:]), np.asarray(local[name][:])), name
    assert np.array_equal(np.asarray(remote["labels"][:]), np.asarray(remote["predictions"][:]).argmax(axis=1))
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        inference.predict(client, config, run_url, s3_store, out_url)
    assert inference.predict(client, config, run_url, s3_store, out_url, overwrite=True)["samples"] == 384
    _no_local_url_dirs(Path.cwd(), tmp_path)


def test_pipeline_stages_into_object_storage_are_refused_by_the_config(s3: dict[str, Any], s3_store: str) -> None:
    with pytest.raises(ConfigError, match=r"output_dir s3://.* is on object storage.*parallel.pipeline=2"):
        run_config(s3_store, f"s3://{s3['bucket']}/runs/pp", storage_options=s3["options"],
                   parallel={"pipeline": 2}, cluster={"workers": 2})


def test_lock_object_names_a_live_holder_and_is_taken_over_once_it_is_gone(s3: dict[str, Any]) -> None:
    fs, bucket = s3["fs"], s3["bucket"]
    run_dir = locate(f"s3://{bucket}/runs/locked", s3["options"])
    holder = psutil.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        fs.pipe_file(f"{bucket}/runs/locked/.lock", json.dumps(
            {"pid": holder.pid, "host": socket.gethostname(), "since": "2026-01-01T00:00:00Z",
             "command": "dasktrain run other.yaml", "purpose": "train"}).encode())
        with pytest.raises(RunDirLockedError, match=f"pid {holder.pid} .*dasktrain run other.yaml"):
            with run_lock(run_dir):
                pass
    finally:
        holder.kill()
        holder.wait(timeout=20)
    with run_lock(run_dir) as held:  # its holder is gone: taken over
        assert json.loads(fs.cat_file(f"{bucket}/runs/locked/.lock"))["pid"] == os.getpid()
        with pytest.raises(RunDirLockedError, match=f"pid {os.getpid()} "):  # one writer, also within a process
            with run_lock(run_dir):
                pass
    fs.invalidate_cache()
    assert held.holder.pid == os.getpid() and not fs.exists(f"{bucket}/runs/locked/.lock")


def _newest_committed(fs: Any, prefix: str) -> int:
    """The step of the newest checkpoint with its marker under ``prefix``, or -1 (read with s3fs)."""
    fs.invalidate_cache()
    found = [int(p.rsplit("/", 2)[-2].removeprefix("step-")) for p in fs.find(prefix) if p.endswith("/COMMITTED")]
    return max(found, default=-1)


def _end_tree(proc: psutil.Process) -> None:
    """SIGKILL the driver, then end the processes it had started (found by pid before the kill)."""
    children = proc.children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=20)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=20)
    for child in alive:
        child.kill()
    psutil.wait_procs(alive, timeout=20)


def _cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "COLUMNS")}
    return {**env, **CREDENTIALS, "NO_COLOR": "1", "PYTHONPATH": str(ROOT)}


def test_driver_killed_then_resumed_from_s3_is_bitwise_equal(s3: dict[str, Any], s3_store: str, reference: Path,
                                                             tmp_path: Path) -> None:
    fs, bucket = s3["fs"], s3["bucket"]
    run_url = f"s3://{bucket}/runs/killed"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(s3_config(s3, s3_store, run_url).to_yaml())
    cli = [sys.executable, "-m", "dasktrain.cli", "run", str(config_file)]

    proc = psutil.Popen(cli, cwd=tmp_path, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while (_newest_committed(fs, f"{bucket}/runs/killed") < 8 and time.monotonic() < deadline
               and proc.poll() is None):
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert _newest_committed(fs, f"{bucket}/runs/killed") >= 8, "the run wrote no checkpoint in time"
    finally:
        _end_tree(proc)
    newest = _newest_committed(fs, f"{bucket}/runs/killed")
    assert newest < 72 and "model.safetensors" not in _names(fs, f"{bucket}/runs/killed")  # killed mid-run
    assert ".lock" in _names(fs, f"{bucket}/runs/killed")  # left by the killed driver: stale, taken over below

    resumed = subprocess.run([*cli, "--resume"], cwd=tmp_path, env=_cli_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_bitwise_equal(_weights_on_s3(s3, "runs/killed/model.safetensors"),
                          load_file(str(reference / "model.safetensors")))
    # The flow's evaluate stage predicted into the run directory on S3.
    predictions = zarr.open_group(f"{run_url}/predictions.zarr", mode="r", storage_options=s3["options"])
    assert predictions["labels"].shape == (384,)
    _no_local_url_dirs(tmp_path, ROOT)


@pytest.mark.parametrize(("key", "url", "says"), [
    ("output_dir", "gs://some-bucket/runs/x", "pip install gcsfs"),
    ("data.store", "nosuch://bucket/data.zarr", "no filesystem is known for the protocol 'nosuch://'"),
])
def test_url_without_a_filesystem_is_one_line_and_leaves_no_directory(tmp_path: Path, key: str, url: str,
                                                                      says: str) -> None:
    config = run_config(tmp_path / "data.zarr", tmp_path / "run", **{})
    raw = config.model_dump(mode="json")
    section, _, field = key.rpartition(".")
    (raw[section] if section else raw)[field] = url
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = subprocess.run([sys.executable, "-m", "dasktrain.cli", "run", "run.yaml"], cwd=tmp_path, env=_cli_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert f"{key} {url}" in lines[0] and says in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    _no_local_url_dirs(tmp_path)
