"""Keras 3 models (torch backend): a factory returning a ``keras.Model`` trains like any module.

The equivalence test runs the user's model (tests/keras_models.py) on 2 Dask worker processes and
replays it in a plain torch loop written here: the same keras model, built in this process from
the same seed with keras's own calls, trained with ``torch.optim`` over the plan's global batches.
The workers start without ``KERAS_BACKEND`` (and this user's ~/.keras may name another backend),
so they train only when dasktrain picks the torch backend itself.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

os.environ.setdefault("KERAS_BACKEND", "torch")  # this test process's own keras, before it is imported
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip(f"keras was imported with the {keras.backend.backend()} backend", allow_module_level=True)

from dasktrain.errors import ConfigError  # noqa: E402
from dasktrain.inference import evaluate, evaluation_split  # noqa: E402
from dasktrain.models import build_model  # noqa: E402
from dasktrain.run_loop import train  # noqa: E402
from tests.helpers import local_client, plan_batches, run_config, saved_weights  # noqa: E402
from tests.keras_models import mlp  # noqa: E402
from tests.reference import max_relative_error  # noqa: E402

pytestmark = pytest.mark.timeout(120)

KWARGS = {"in_features": 64, "hidden": 32, "out_features": 10}
OPTIMIZER = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}


@contextlib.contextmanager
def without_backend_variable() -> Iterator[None]:
    """Worker processes started here inherit no ``KERAS_BACKEND``."""
    saved = os.environ.pop("KERAS_BACKEND", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["KERAS_BACKEND"] = saved


@pytest.fixture(scope="module")
def client():
    with without_backend_variable(), local_client(2) as c:
        yield c


@pytest.fixture(scope="module")
def trained(digits_store, client, tmp_path_factory):
    """One 2-epoch run of the keras MLP on 2 workers: its config and run directory."""
    run_dir = tmp_path_factory.mktemp("keras") / "run"
    config = run_config(digits_store, run_dir, model={"factory": "tests.keras_models:mlp", "kwargs": KWARGS},
                        optimizer=OPTIMIZER)
    result = train(config, client=client)
    assert result.completed
    return config, run_dir


def plain_loop(config, batches: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """The keras model trained in this process: fresh keras session, keras's seed, torch's SGD,
    mean cross-entropy per global batch, fp32. Returns its state dict (every key keras gives)."""
    group = zarr.open_group(str(config.data.store), mode="r")
    inputs = torch.from_numpy(np.asarray(group[config.data.inputs][...], dtype=np.float32))
    targets = torch.from_numpy(np.asarray(group[config.data.targets][...])).long()
    keras.backend.clear_session()
    keras.utils.set_random_seed(config.train.seed)
    model = mlp(**KWARGS)
    opt = config.optimizer
    optimizer = torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=opt.momentum,
                                weight_decay=opt.weight_decay, foreach=False)
    for indices in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(inputs[indices]), targets[indices]).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_keras_model_trains_like_a_plain_loop(trained):
    config, run_dir = trained
    expected = plain_loop(config, plan_batches(config))
    got = saved_weights(run_dir)
    # A Sequential names each tensor twice (itself and its inner functional model); one key is saved.
    assert set(got) == {k for k in expected if not k.startswith("_functional.")}
    assert max_relative_error(got, {k: expected[k] for k in got}) < 1e-5


def test_saved_keras_weights_load_into_a_fresh_model(trained):
    """What a user does with the run's model.safetensors: the config's model, built as dasktrain
    builds it, loads it; keras's own predict then gives the trained model's outputs."""
    config, run_dir = trained
    from safetensors.torch import load_file

    saved = load_file(str(Path(run_dir) / "model.safetensors"))
    keras.layers.Dense(3)  # advance this process's layer-name counter: the names must not depend on it
    model = build_model(config.model, config.train.seed)
    model.load_state_dict(saved)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    x = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
    model.eval()
    with torch.no_grad():
        direct = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.predict(x, verbose=0), direct, rtol=1e-6, atol=1e-6)


def test_dasktrain_evaluates_a_keras_run(trained, client):
    """``dasktrain evaluate``'s path: each worker builds the model and loads the saved weights."""
    config, run_dir = trained
    result = evaluate(client, config, run_dir, evaluation_split(config))
    assert result["samples"] == 1797 and result["accuracy"] > 0.8


def test_same_initial_weights_whatever_else_the_process_does():
    """Same seed, same weights, names and order: after other keras layers were made (names then
    sort differently: dense_10 before dense_9), and while another thread draws from ``random``
    (a Dask worker's event loop does, sizing collections)."""
    config_model = run_config("unused", "unused", model={"factory": "tests.keras_models:mlp", "kwargs": KWARGS}).model
    first = build_model(config_model, 7).state_dict()
    [keras.layers.Dense(2) for _ in range(11)]
    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            random.random()

    drawing = threading.Thread(target=draw)
    drawing.start()
    try:
        second = [build_model(config_model, 7).state_dict() for _ in range(5)]
    finally:
        stop.set()
        drawing.join()
    for state in second:
        assert list(state) == list(first)
        assert all(torch.equal(first[k], state[k]) for k in first)
    other = build_model(config_model, 8).state_dict()
    assert any(not torch.equal(first[k], v) for k, v in other.items())


def test_keras_layers_follow_train_and_eval():
    """Keras layers run in inference mode unless told: the module's mode is passed to each call."""
    config_model = run_config("unused", "unused",
                              model={"factory": "tests.keras_models:dropout_mlp", "kwargs": KWARGS}).model
    model = build_model(config_model, 0)
    x = torch.ones(4, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        inference = model(x)
        model.train()
        assert not torch.equal(model(x), inference)


def test_unbuilt_keras_model_is_refused():
    config_model = run_config("unused", "unused",
                              model={"factory": "tests.keras_models:unbuilt_mlp", "kwargs": KWARGS}).model
    with pytest.raises(ConfigError, match="not built"):
        build_model(config_model, 0)
