"""Hugging Face models: a factory returning a ``transformers.PreTrainedModel`` built from a config.

The user's model (tests/hf_models.py) is a 2-layer GPT-2 whose output head is tied to its token
embedding. The equivalence test trains it on 2 Dask worker processes with ``data.fields`` (the
model is called ``model(input_ids=..., labels=...)``) and ``loss: model`` (its own mean
next-token loss), and replays it in a plain loop written here: the same factory under the same
seed, ``torch.optim.AdamW`` over the plan's global batches, fp32.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from dasktrain import hf_support  # noqa: E402
from dasktrain.ingest import example_arrays, write_store  # noqa: E402
from dasktrain.models import build_model  # noqa: E402
from dasktrain.run_loop import train  # noqa: E402
from tests.helpers import local_client, plan_batches, run_config, saved_weights  # noqa: E402
from tests.hf_models import gpt2  # noqa: E402
from tests.reference import max_relative_error  # noqa: E402

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 16
MODEL = {"factory": "tests.hf_models:gpt2", "kwargs": {"context": CONTEXT}}
TIED = "lm_head.weight"
"""GPT-2's output head: the token embedding ``transformer.wte.weight`` under a second name."""


def seeded_gpt2(seed: int) -> transformers.GPT2LMHeadModel:
    """The factory called as dasktrain calls it: torch's generator seeded, then restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return gpt2(context=CONTEXT)


def test_adapted_gpt2_saves_one_key_per_tensor_and_loads_tied(tmp_path: Path) -> None:
    model = hf_support.adapt(seeded_gpt2(0))
    assert model.lm_head.weight is model.transformer.wte.weight
    # dasktrain binds gradients as views into one flat buffer over parameters(): the tied one once.
    params = list(model.parameters())
    assert len({id(p) for p in params}) == len(params)
    assert sum(p is model.lm_head.weight for p in params) == 1
    state = model.state_dict()
    assert TIED not in state and "transformer.wte.weight" in state
    save_file(state, str(tmp_path / "model.safetensors"))  # refused for tensors sharing memory

    fresh = hf_support.adapt(seeded_gpt2(1))
    assert not torch.equal(fresh.transformer.wte.weight, model.transformer.wte.weight)
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")))  # strict: nothing missing
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    # A second adapt (publish adapts what build_model already adapted) changes nothing.
    assert hf_support.adapt(fresh) is fresh and fresh.state_dict().keys() == state.keys()


def test_other_models_are_left_alone(tmp_path: Path) -> None:
    linear = torch.nn.Linear(3, 2)
    linear.extra = linear.weight  # a second name for a tensor, on a module that is not Hugging Face's
    assert hf_support.adapt(linear) is linear
    assert set(linear.state_dict()) == {"weight", "bias", "extra"}  # no hook: its state is as torch gives it
    assert not hf_support.is_pretrained_model(linear)
    assert hf_support.save_pretrained_dir(linear, tmp_path / "hf") is None
    assert not (tmp_path / "hf").exists()
    # transformers is imported in this process, and pulled in neither TensorFlow nor JAX.
    assert not {"tensorflow", "jax", "flax"} & set(sys.modules)


def test_save_pretrained_dir_loads_with_from_pretrained(tmp_path: Path) -> None:
    model = hf_support.adapt(seeded_gpt2(2))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "stale.txt").write_text("a previous run's")
    path = hf_support.save_pretrained_dir(model, tmp_path / "hf")
    assert path == tmp_path / "hf"
    assert {"config.json", "model.safetensors"} <= {p.name for p in path.iterdir()}
    assert not (path / "stale.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    loaded = transformers.GPT2LMHeadModel.from_pretrained(str(path))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert loaded.config.n_layer == 2 and loaded.config.n_positions == CONTEXT
    x = torch.randint(0, 256, (3, CONTEXT), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)


def test_publish_writes_a_run_model_as_a_pretrained_dir(tmp_path: Path) -> None:
    """The publish stage's steps on a finished run's ``model.safetensors``: the model built as every
    process builds it (``build_model`` adapts it) loads the file and is written for ``from_pretrained``."""
    config = run_config("unused", tmp_path / "run", model=MODEL)
    trained = hf_support.adapt(seeded_gpt2(4))  # stands for the trained weights: not the seed's
    save_file(trained.state_dict(), str(tmp_path / "model.safetensors"))
    assert hf_support.may_be_pretrained(config.model.factory)
    model = build_model(config.model, config.train.seed)
    model.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    path = hf_support.save_pretrained_dir(model, tmp_path / "hf")
    assert path is not None
    loaded = transformers.GPT2LMHeadModel.from_pretrained(str(path))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.state_dict().items())


def test_other_models_never_import_transformers(tmp_path: Path) -> None:
    """The publish stage's check for a built-in model, in a process that did not import transformers."""
    code = (
        "import sys\n"
        "from dasktrain import hf_support\n"
        "assert not hf_support.may_be_pretrained('dasktrain.models:mlp')\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# -- the equivalence test ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 320 windows of 16 bytes in 10 chunks of 32: 10 global steps of 32 windows.
    arrays = example_arrays("text", context=CONTEXT)
    return write_store(tmp_path_factory.mktemp("data") / "text.zarr", {"inputs": arrays["inputs"][:320]},
                       chunk_size=32)


def hf_config(store: Path, out: Path):
    # eps 1e-5, not 1e-8: GPT-2's key bias (in attn.c_attn.bias) shifts all of a query's scores
    # alike, which the softmax ignores, so its gradient is rounding noise (about 1e-11), whose sign
    # the order of the sums decides. Adam's step lr * m / (sqrt(v) + eps) makes that a full step at
    # eps 1e-8 (run and loop then differ by 1.4e-4 of the largest entry there), a negligible one
    # at eps 1e-5, while the real gradients (1e-5 and up) still get Adam-sized steps.
    return run_config(store, out, data={"fields": {"input_ids": "inputs", "labels": "inputs"}}, loss="model",
                      model=MODEL, optimizer={"name": "adamw", "lr": 0.002, "weight_decay": 0.01, "eps": 1e-5},
                      schedule={"name": "constant"}, train={"epochs": 1, "batch_size": 32, "shards": 2, "seed": 3})


def plain_loop(config, batches: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """One process, one AdamW step per global batch on the model's own loss (the mean over the
    batch's next-token predictions), from the same initial weights as the run."""
    inputs = np.asarray(zarr.open_group(str(config.data.store), mode="r")["inputs"][...])
    model = seeded_gpt2(config.train.seed)
    model.train()
    opt = config.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                  weight_decay=opt.weight_decay, foreach=False)
    for indices in batches:
        x = torch.from_numpy(inputs[indices])
        optimizer.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_gpt2_trains_like_a_plain_loop(store: Path, tmp_path: Path) -> None:
    config = hf_config(store, tmp_path / "run")
    with local_client(2) as client:
        result = train(config, client=client)
    assert result.completed
    expected = plain_loop(config, plan_batches(config))
    got = saved_weights(tmp_path / "run")
    assert set(got) == set(expected) - {TIED}
    assert max_relative_error(got, {k: expected[k] for k in got}) < 1e-5
