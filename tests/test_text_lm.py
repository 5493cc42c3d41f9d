"""The transformer language model example: the byte windows ``ingest --example text`` writes, and
``dasktrain.models:transformer_lm`` trained on them on a real LocalCluster of worker processes,
data parallel and cut into pipeline stages, against a plain PyTorch loop written here.

The loop's loss is written out with torch ops: a window's loss is the mean over its positions of
the next byte's negative log-likelihood, the step's loss the mean of that over the global batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest
import torch
import zarr

from dasktrain.inference import predict
from dasktrain.ingest import example_arrays, write_store
from dasktrain.metrics import read_metrics
from dasktrain.models import transformer_lm
from dasktrain.preflight import resolve_splits
from dasktrain.run_loop import train
from dasktrain.stages import plan_stages
from tests.helpers import local_client, plan_batches, run_config, saved_weights
from tests.reference import learning_rate, max_relative_error

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 16
MODEL = {"factory": "dasktrain.models:transformer_lm",
         "kwargs": {"vocab_size": 256, "context": CONTEXT, "d_model": 16, "heads": 2, "layers": 2}}
"""Five cuttable layers: embedding, two decoder blocks, LayerNorm, head."""


def raw_corpus() -> bytes:
    """The documented corpus, read here without dasktrain: the pydoc topics by sorted name, UTF-8."""
    return "".join(topics[key] for key in sorted(topics)).encode("utf-8")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The first 320 windows of 17 bytes, in 10 chunks of 32: 8 for training, 2 for validation.
    arrays = example_arrays("text", context=CONTEXT)
    return write_store(tmp_path_factory.mktemp("data") / "text.zarr",
                       {name: a[:320] for name, a in arrays.items()}, chunk_size=32)


@pytest.fixture(scope="module")
def client():
    with local_client(2) as c:
        yield c


def lm_config(store: Path, out: Path, **parallel: int):
    return run_config(store, out, data={"inputs_dtype": "int64", "validation": {"fraction": 0.2}}, model=MODEL,
                      # A small peak rate: Adam's first steps move every weight by about lr whatever the size
                      # of its gradient, so the sign of a near-zero gradient entry, which the order of
                      # the sums decides, would otherwise show as a difference of 1e-5.
                      optimizer={"name": "adamw", "lr": 0.002, "weight_decay": 0.01, "betas": [0.9, 0.95]},
                      schedule={"name": "warmup_cosine", "warmup_steps": 3, "min_lr": 0.0002},
                      train={"epochs": 2, "batch_size": 40, "shards": 4, "seed": 5},
                      parallel=parallel)


def nats_per_token(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per window: the mean over its positions of -log p(next byte)."""
    log_p = torch.log_softmax(model(x), dim=-1)
    return -log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(dim=1)


def plain_loop(config, batches: list[np.ndarray]) -> torch.nn.Module:
    """One process, one AdamW step per global batch, on the same initial weights as the run."""
    group = zarr.open_group(str(config.data.store), mode="r")
    inputs, targets = np.asarray(group["inputs"][...]), np.asarray(group["targets"][...])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)  # as every dasktrain process builds its model
        model = transformer_lm(**config.model.kwargs)
    opt = config.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                  weight_decay=opt.weight_decay, foreach=False)
    schedule = config.schedule
    for step, indices in enumerate(batches):
        x, y = torch.from_numpy(inputs[indices]), torch.from_numpy(targets[indices])
        optimizer.zero_grad()
        nats_per_token(model, x, y).mean().backward()
        for param_group in optimizer.param_groups:
            param_group["lr"] = learning_rate(schedule.name, opt.lr, step, len(batches), schedule.warmup_steps,
                                              schedule.min_lr)
        optimizer.step()
    return model


def test_transformer_is_causal_and_cut_between_blocks() -> None:
    torch.manual_seed(0)
    model = transformer_lm(**MODEL["kwargs"])
    assert [type(m).__name__ for m in model] == ["TokenEmbedding", "DecoderBlock", "DecoderBlock", "LayerNorm", "Linear"]
    x = torch.randint(0, 256, (3, CONTEXT))
    changed = x.clone()
    changed[:, 9:] = (x[:, 9:] + 1) % 256
    with torch.no_grad():
        out, out_changed = model(x), model(changed)
    assert out.shape == (3, CONTEXT, 256)
    # Positions 0..8 see only bytes 0..8, which are the same; position 9 sees a changed byte.
    torch.testing.assert_close(out_changed[:, :9], out[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(out_changed[:, 9], out[:, 9])


def test_ingest_text_writes_next_byte_windows(tmp_path: Path) -> None:
    store = tmp_path / "text.zarr"
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "COLUMNS")}
    result = subprocess.run([sys.executable, "-m", "dasktrain.cli", "ingest", str(store), "--example", "text",
                             "--context", "24"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    group = zarr.open_group(str(store), mode="r")
    inputs, targets = np.asarray(group["inputs"][...]), np.asarray(group["targets"][...])
    raw = np.frombuffer(raw_corpus(), dtype=np.uint8)
    windows = len(raw) // 25
    assert len(raw) > 200_000 and inputs.shape == targets.shape == (windows, 24)
    assert inputs.dtype == targets.dtype == np.int64
    # Window i is bytes [25 i, 25 i + 25): the inputs its first 24, the targets its last 24.
    rows = raw[: windows * 25].reshape(windows, 25)
    np.testing.assert_array_equal(inputs, rows[:, :-1])
    np.testing.assert_array_equal(targets, rows[:, 1:])


def test_context_needs_the_text_example(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    result = subprocess.run([sys.executable, "-m", "dasktrain.cli", "ingest", str(store), "--example", "digits",
                             "--context", "8"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "NO_COLOR": "1"})
    # A misused option is a usage error, as for every option of ingest: exit code 2, no traceback.
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "--context only applies with --example text" in " ".join(result.stderr.split())
    assert not store.exists()


def test_data_parallel_equals_plain_loop(store: Path, client, tmp_path: Path) -> None:
    config = lm_config(store, tmp_path / "run")
    result = train(config, client=client)
    batches = plan_batches(config)
    assert result.completed and result.steps == len(batches) == 2 * 7  # 256 windows, batch 40
    model = plain_loop(config, batches)
    got = saved_weights(tmp_path / "run")
    assert max_relative_error(got, model.state_dict()) < 1e-5
    # Validation after the last epoch: nats per token and token accuracy of the final weights.
    splits = resolve_splits(config)
    rows = np.concatenate([np.arange(c.start, c.stop) for c in splits.val_chunks])
    group = zarr.open_group(str(store), mode="r")
    x, y = torch.from_numpy(group["inputs"][...][rows]), torch.from_numpy(group["targets"][...][rows])
    with torch.no_grad():
        nats = float(nats_per_token(model, x, y).mean())
        accuracy = float((model(x).argmax(dim=-1) == y).double().mean())
    last = [r for r in read_metrics(tmp_path / "run") if r.get("kind") == "epoch"][-1]
    assert last["val_samples"] == len(rows) == 64
    assert last["val_loss"] == pytest.approx(nats, rel=1e-5)
    assert last["val_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert 0.0 < accuracy < 1.0 and accuracy * len(rows) != round(accuracy * len(rows))  # a token accuracy


def test_pipeline_stages_equal_plain_loop(store: Path, client, tmp_path: Path) -> None:
    config = lm_config(store, tmp_path / "run", pipeline=2, micro_batches=2)
    # Cut by parameter count between the two decoder blocks.
    assert plan_stages(config, (CONTEXT,)).bounds == ((0, 2), (2, 5))
    result = train(config, client=client)
    assert result.completed
    model = plain_loop(config, plan_batches(config))
    assert max_relative_error(saved_weights(tmp_path / "run"), model.state_dict()) < 1e-5


def test_predictions_of_a_language_model_are_labels_per_position(store: Path, client, tmp_path: Path) -> None:
    # A sequence's logits would be 256 floats per input byte: predict keeps the predicted bytes only.
    config = lm_config(store, tmp_path / "run")
    train(config, client=client)
    written = predict(client, config, tmp_path / "run", store, tmp_path / "predictions.zarr")
    assert written["arrays"] == ["labels"]
    labels = np.asarray(zarr.open_group(str(tmp_path / "predictions.zarr"), mode="r")["labels"][...])
    x = torch.from_numpy(np.asarray(zarr.open_group(str(store), mode="r")["inputs"][...]))
    model = transformer_lm(**MODEL["kwargs"])
    model.load_state_dict(saved_weights(tmp_path / "run"))
    with torch.no_grad():
        assert np.array_equal(labels, model(x).argmax(dim=-1).numpy())
