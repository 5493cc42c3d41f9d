"""GPU placement and mixed precision (``dasktrain.device``), and training on ``local-cuda``.

Tests marked ``gpu`` need a CUDA GPU and skip cleanly without one; ``benchmarks/gpu_check.py``
runs them on a GPU machine. The CPU tests below check the same bf16 logic where there is no GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dasktrain.device import Placement, worker_device
from dasktrain.ingest import example_arrays, write_store
from tests.helpers import run_config

has_cuda = torch.cuda.is_available()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def _grads(placement: Placement) -> tuple[torch.Tensor, torch.dtype, torch.Tensor]:
    """Flat fp32 gradient of one batch, the forward output's dtype, and the flat buffer's device."""
    model = placement.model(_model())
    rng = np.random.default_rng(0)
    x = placement.to_device(rng.random((256, 64), dtype=np.float32), "inputs")
    y = placement.to_device(rng.integers(0, 10, 256), "targets")
    with placement.autocast():
        out = model(x)
    loss = torch.nn.functional.cross_entropy(out.float(), y, reduction="sum")  # loss in fp32
    loss.backward()
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return placement.to_host(flat), out.dtype, flat


@pytest.mark.timeout(30)
def test_bf16_autocast_keeps_fp32_weights_and_gradients_on_cpu() -> None:
    exact, out32, _ = _grads(Placement("fp32", "cpu"))
    mixed, out16, _ = _grads(Placement("bf16", "cpu"))
    assert (out32, out16) == (torch.float32, torch.bfloat16)
    assert mixed.dtype == torch.float32
    assert torch.allclose(mixed, exact, rtol=0.05, atol=0.05 * float(exact.abs().max()))


@pytest.mark.timeout(30)
def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16'"):
        Placement("fp16")  # type: ignore[arg-type]


@pytest.mark.timeout(30)
@pytest.mark.skipif(has_cuda, reason="checks the CPU fallback")
def test_worker_device_without_gpu_is_cpu() -> None:
    assert worker_device() == torch.device("cpu")


@pytest.mark.timeout(60)
@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda, reason="needs a CUDA GPU")
def test_pinned_async_copies_are_correct_and_reuse_their_buffer() -> None:
    placement = Placement("fp32")
    assert placement.device == torch.device("cuda", 0)
    rng = np.random.default_rng(1)
    arrays = [rng.random((n, 64), dtype=np.float32) for n in (100, 100, 300, 50)]
    outs = [placement.to_device(a, "inputs") for a in arrays]  # same slot: each waits for the last copy
    torch.cuda.synchronize()
    for a, out in zip(arrays, outs):
        assert out.is_cuda and np.array_equal(out.cpu().numpy(), a)
    buffer, _ = placement._staging["inputs"]
    assert buffer.is_pinned() and buffer.numel() >= 300 * 64 * 4


@pytest.mark.timeout(60)
@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda, reason="needs a CUDA GPU")
def test_bf16_on_gpu_matches_fp32_with_fp32_gradients() -> None:
    exact, _, flat32 = _grads(Placement("fp32"))
    mixed, out16, flat16 = _grads(Placement("bf16"))
    assert out16 == torch.bfloat16 and flat16.is_cuda and flat16.dtype == torch.float32
    assert torch.allclose(mixed, exact, rtol=0.05, atol=0.05 * float(exact.abs().max()))


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_store(tmp_path_factory.mktemp("digits") / "digits.zarr", example_arrays("digits"), chunk_size=64)


def _gpu_workers() -> int:
    return min(torch.cuda.device_count(), 4)


@pytest.mark.timeout(180)
@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda, reason="needs a CUDA GPU")
def test_local_cuda_trains_with_one_worker_per_gpu(digits: Path, tmp_path: Path) -> None:
    pytest.importorskip("dask_cuda", reason="local-cuda needs dask-cuda")
    from dasktrain.cluster import open_cluster
    from dasktrain.run_loop import train

    n = _gpu_workers()
    config = run_config(digits, tmp_path / "run", train={"epochs": 2, "batch_size": 100, "shards": 4, "seed": 3},
                        cluster={"kind": "local-cuda", "workers": n, "dashboard": False})
    with open_cluster(config.cluster) as client:
        visible = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES", ""))
        firsts = {v.split(",")[0] for v in visible.values()}
        assert len(visible) == n and len(firsts) == n, visible  # each worker sees its own GPU first
        devices = client.run(lambda: str(worker_device()))
        assert set(devices.values()) == {"cuda:0"}, devices
        result = train(config, client=client)
    assert result.completed
    losses = [e["train_loss"] for e in result.epochs]
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


@pytest.mark.timeout(180)
@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda, reason="needs a CUDA GPU")
def test_bf16_training_on_local_cuda(digits: Path, tmp_path: Path) -> None:
    pytest.importorskip("dask_cuda", reason="local-cuda needs dask-cuda")
    from dasktrain.config import TrainConfig
    from dasktrain.run_loop import train

    if "precision" not in TrainConfig.model_fields:
        pytest.skip("train.precision is not in TrainConfig yet (dasktrain.device is not wired into the replica)")
    config = run_config(digits, tmp_path / "run",
                        train={"epochs": 2, "batch_size": 100, "shards": 4, "seed": 3, "precision": "bf16"},
                        cluster={"kind": "local-cuda", "workers": _gpu_workers(), "dashboard": False})
    result = train(config)
    assert result.completed
    losses = [e["train_loss"] for e in result.epochs]
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


@pytest.mark.timeout(180)
@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda, reason="needs a CUDA GPU")
def test_collective_on_local_cuda_reads_once_per_segment_and_learns_what_one_process_learns(
        digits: Path, tmp_path: Path) -> None:
    # On a GPU, host_reads: auto decides each update on the device (a fused optimizer) and reads
    # the numbers once per segment: the weights still match the CPU reference loop, to the
    # rounding of CUDA kernels.
    pytest.importorskip("dask_cuda", reason="local-cuda needs dask-cuda")
    from dasktrain.run_loop import train
    from tests.helpers import plan_batches, saved_weights
    from tests.reference import max_relative_error, reference_weights

    config = run_config(digits, tmp_path / "run", optimizer={"name": "adamw", "lr": 0.003},
                        train={"epochs": 2, "batch_size": 100, "shards": 4, "seed": 3, "reduce": "collective"},
                        cluster={"kind": "local-cuda", "workers": _gpu_workers(), "dashboard": False},
                        checkpoint={"every_steps": 7, "keep": 2})
    assert train(config).completed
    assert max_relative_error(saved_weights(tmp_path / "run"), reference_weights(config, plan_batches(config))) < 1e-3
