"""The transformer language model cut into 2-4 pipeline stages by parameter count.

The cut is checked against every possible cut (brute force, written here): no other split has a
smaller largest stage. Training it in 4 stages under ZB-H1, and in 3 workers x 2 virtual stages
under interleaved 1F1B, must give the weights of the plain loop of ``tests/test_text_lm.py``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from dasktrain.ingest import example_arrays, write_store
from dasktrain.run_loop import train
from dasktrain.stages import plan_stages
from tests.helpers import local_client, plan_batches, run_config, saved_weights
from tests.reference import max_relative_error
from tests.test_text_lm import CONTEXT, plain_loop

MODEL = {"factory": "dasktrain.models:transformer_lm",
         "kwargs": {"vocab_size": 256, "context": CONTEXT, "d_model": 16, "heads": 2, "layers": 4}}
"""Seven cuttable layers: embedding, four decoder blocks, LayerNorm, head."""
D = 16
BLOCK = 2 * 2 * D + 3 * D * D + (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D)
"""Two LayerNorms, the bias-free qkv projection, the output projection, the MLP's two Linears."""
LAYER_PARAMS = [256 * D + CONTEXT * D, *[BLOCK] * 4, 2 * D, D * 256 + 256]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    arrays = example_arrays("text", context=CONTEXT)
    return write_store(tmp_path_factory.mktemp("data") / "text.zarr",
                       {name: a[:240] for name, a in arrays.items()}, chunk_size=40)


@pytest.fixture(scope="module")
def client():
    with local_client(4) as c:
        yield c


def lm_config(store: Path, out: Path, **parallel):
    return run_config(store, out, data={"inputs_dtype": "int64"}, model=MODEL,
                      optimizer={"name": "adamw", "lr": 0.002, "weight_decay": 0.01, "betas": [0.9, 0.95]},
                      schedule={"name": "warmup_cosine", "warmup_steps": 3, "min_lr": 0.0002},
                      train={"epochs": 1, "batch_size": 40, "shards": 2, "seed": 5},
                      cluster={"workers": 4}, parallel=parallel)


def largest_stage_of_best_cut(weights: list[int], stages: int) -> int:
    """Brute force over every contiguous cut: the smallest possible largest stage."""
    best = None
    for cuts in itertools.combinations(range(1, len(weights)), stages - 1):
        edges = [0, *cuts, len(weights)]
        largest = max(sum(weights[a:b]) for a, b in zip(edges, edges[1:]))
        best = largest if best is None else min(best, largest)
    assert best is not None
    return best


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_cut_by_parameter_count_has_the_smallest_largest_stage(store, tmp_path, stages):
    layout = plan_stages(lm_config(store, tmp_path, pipeline=stages), (CONTEXT,))
    assert layout.stages == stages and layout.bounds[0][0] == 0 and layout.bounds[-1][1] == len(LAYER_PARAMS)
    largest = max(sum(LAYER_PARAMS[lo:hi]) for lo, hi in layout.bounds)
    assert largest == largest_stage_of_best_cut(LAYER_PARAMS, stages)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("parallel", [
    {"pipeline": 4, "micro_batches": 4, "schedule": "zb-h1"},
    {"pipeline": 3, "micro_batches": 3, "schedule": "interleaved-1f1b", "virtual_stages": 2},
], ids=["zb-h1-4-stages", "interleaved-3x2"])
def test_transformer_in_stages_equals_the_plain_loop(store, client, tmp_path, parallel):
    config = lm_config(store, tmp_path / "run", **parallel)
    result = train(config, client=client)
    assert result.completed and result.steps == 6
    model = plain_loop(config, plan_batches(config))
    assert max_relative_error(saved_weights(tmp_path / "run"), model.state_dict()) < 1e-5
