"""Rules across config sections, checked when the config is built; the checks before a run, made once.

Every rule that relates keys of two sections (:func:`dasktrain.config.cross_section_problems`)
must refuse a config at :func:`~dasktrain.config.validate_config` (and :func:`~dasktrain.config.load_config`)
time, before any store is opened or cluster started, with one ``ConfigError`` line naming the keys on
both sides; and it must let through what it does not forbid. :func:`dasktrain.preflight.preflight`
makes the store and model checks once and hands them on: the flow's prepare stage and ``dasktrain
run`` use them instead of checking again. No cluster is started in this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from torch import nn

from dasktrain.config import RunConfig, load_config, validate_config
from dasktrain.errors import ConfigError, ShapeMismatchError
from dasktrain.preflight import Preflight, build_plan, preflight, resolve_splits
from tests.helpers import run_config


def config(**sections: dict[str, Any]) -> dict[str, Any]:
    """A minimal raw config (no store is opened at validation); ``sections`` replace whole sections."""
    return {"data": {"store": "nowhere.zarr"}, "model": {"factory": "dasktrain.models:mlp"}, **sections}


def refused(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_config(raw, source="run.yaml")
    message = str(caught.value)
    assert message.startswith("run.yaml: ") and "\n" not in message, message
    return message


# Each case: the config, and the fragments its one-line message must hold (the keys of both sections).
BROKEN = {
    "collective-with-tls": (
        config(train={"reduce": "collective"}, cluster={"security": "tls"}),
        ["train.reduce: collective", "cluster.security: tls"]),
    "more-workers-than-shards": (
        config(train={"shards": 2}, cluster={"workers": 3}),
        ["cluster.workers=3", "train.shards=2"]),
    "local-default-workers-than-shards": (
        config(train={"shards": 1}),
        ["cluster.workers (unset, so 2 for kind 'local')", "train.shards=1"]),
    "address-waits-for-more-workers-than-shards": (
        config(train={"shards": 2}, cluster={"kind": "address", "address": "tcp://127.0.0.1:1", "workers": 3}),
        ["cluster.workers=3", "train.shards=2"]),
    "pipeline-in-bf16": (
        config(train={"precision": "bf16"}, parallel={"pipeline": 2}),
        ["train.precision=bf16", "parallel.pipeline=2"]),
    "clipping-with-pipeline": (
        config(train={"clip_grad_norm": 1.0}, parallel={"pipeline": 2}),
        ["train.clip_grad_norm=1.0", "parallel.pipeline=2"]),
    "more-micro-batches-than-a-replica-gets": (
        config(train={"batch_size": 16}, parallel={"pipeline": 2, "data": 2, "micro_batches": 9}, cluster={"workers": 4}),
        ["parallel.micro_batches=9", "train.batch_size=16", "parallel.data=2", "<= 8"]),
    "more-pipeline-replicas-than-samples": (
        config(train={"batch_size": 4}, parallel={"pipeline": 2, "data": 5}, cluster={"workers": 10}),
        ["parallel.data=5", "train.batch_size=4", ">= 5"]),
    "more-stages-than-local-workers": (
        config(parallel={"pipeline": 2, "data": 2}, cluster={"workers": 3}),
        ["parallel.pipeline=2", "parallel.data=2", "needs 4 workers", "cluster.workers=3"]),
    "more-stages-than-the-local-default": (
        config(parallel={"pipeline": 3}),
        ["parallel.pipeline=3", "needs 3 workers", "cluster.workers (unset, so 2 for kind 'local')"]),
    "more-stages-than-local-cuda-devices": (
        config(parallel={"pipeline": 3}, cluster={"kind": "local-cuda", "devices": [0, 1]}),
        ["parallel.pipeline=3", "needs 3 workers", "cluster.devices: 2"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_cross_section_rule_refuses_at_validation_naming_both_keys(case: str) -> None:
    raw, fragments = BROKEN[case]
    message = refused(raw)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


ALLOWED = {
    # Pipeline stages read through the same normalising reader as replicas: no rule against it.
    "normalize-with-pipeline": config(data={"store": "x.zarr", "normalize": True}, parallel={"pipeline": 2}),
    "workers-equal-shards": config(train={"shards": 3}, cluster={"workers": 3}),
    # Shards are a data-parallel notion: pipeline stages do not stream them.
    "pipeline-with-more-workers-than-shards": config(train={"shards": 1}, parallel={"pipeline": 2, "data": 2},
                                                     cluster={"workers": 4}),
    # Micro-batches and precision rules are the pipeline's: unused keys under data parallelism.
    "bf16-and-micro-batches-without-pipeline": config(train={"precision": "bf16", "batch_size": 4},
                                                      parallel={"micro_batches": 64}),
    "micro-batches-equal-a-replica-batch": config(train={"batch_size": 16}, parallel={"pipeline": 2, "data": 2, "micro_batches": 8},
                                                  cluster={"workers": 4}),
    # Sizes known only when running: an address cluster may hold more workers than it waits for,
    # jobqueue rounds workers up to whole jobs, local-cuda takes every visible GPU. The run checks.
    "pipeline-on-an-address-cluster": config(parallel={"pipeline": 4},
                                             cluster={"kind": "address", "address": "tcp://127.0.0.1:1"}),
    "pipeline-on-slurm": config(parallel={"pipeline": 4}, cluster={"spec": "slurm"}),
    "pipeline-on-every-gpu": config(parallel={"pipeline": 4}, cluster={"kind": "local-cuda"}),
    "collective-without-tls": config(train={"reduce": "collective"}),
    # The global norm of the reduced gradient: every replica holds all of it.
    "clipping-without-pipeline": config(train={"clip_grad_norm": 1.0, "reduce": "collective"}),
}


@pytest.mark.parametrize("case", sorted(ALLOWED))
def test_what_no_rule_forbids_validates(case: str) -> None:
    assert isinstance(validate_config(ALLOWED[case]), RunConfig)


def test_every_broken_rule_is_named_in_one_line() -> None:
    message = refused(config(train={"precision": "bf16", "batch_size": 4}, parallel={"pipeline": 3, "micro_batches": 5}))
    assert "train.precision=bf16" in message and "parallel.micro_batches=5" in message
    assert "needs 3 workers" in message


def test_a_rule_broken_by_an_override_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config(train={"shards": 2}, cluster={"workers": 2})))
    assert load_config(path).cluster.workers == 2
    with pytest.raises(ConfigError, match=rf"^{path}: cluster.workers=3 is more than train.shards=2"):
        load_config(path, ["cluster.workers=3"])


def test_a_rule_within_one_section_names_its_keys_without_the_whole_section() -> None:
    message = refused(config(train={"reduce": "collective", "deterministic": True}))
    assert message == ("run.yaml: 'train': deterministic: true needs reduce: tree "
                       "(an all-reduce does not fix the order of its sums)")


# -- preflight: the store and model checked once, and the result handed on -----------------------


def two_stages() -> list[nn.Module]:
    """A pipeline model given as its two named stages (no one nn.Module)."""
    return [nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU()), nn.Linear(16, 10)]


def test_preflight_gives_the_splits_and_plan_of_its_config(digits_store: Path, tmp_path: Path) -> None:
    cfg = run_config(digits_store, tmp_path / "run", data={"store": str(digits_store), "validation": {"fraction": 0.2}})
    checked = preflight(cfg)
    assert isinstance(checked, Preflight)
    assert checked.splits == resolve_splits(cfg)
    expected = build_plan(cfg, checked.splits)
    assert checked.plan.steps_per_epoch == expected.steps_per_epoch
    assert (checked.plan.epoch(1).global_batch(3) == expected.epoch(1).global_batch(3)).all()
    # Fits a variant that only runs elsewhere; not one whose trajectory differs.
    assert checked.fits(cfg.model_copy(update={"output_dir": str(tmp_path / "other")}))
    assert not checked.fits(cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 9})}))


def test_preflight_checks_a_pipeline_model_as_its_stages(digits_store: Path, tmp_path: Path) -> None:
    named = {"factory": "tests.test_config_rules:two_stages", "kwargs": {}}
    preflight(run_config(digits_store, tmp_path / "run", model=named, parallel={"pipeline": 2}))
    with pytest.raises(ConfigError, match=r"names 2 stages, parallel.pipeline=3"):
        preflight(run_config(digits_store, tmp_path / "run", model=named, parallel={"pipeline": 3},
                             cluster={"workers": 3}))
    mlp = {"factory": "dasktrain.models:mlp", "kwargs": {"in_features": 64, "out_features": 10, "hidden": [32]}}
    with pytest.raises(ConfigError, match=r"parallel.pipeline=5 stages, but model .* only 4 cuttable layers"):
        preflight(run_config(digits_store, tmp_path / "run", model=mlp, parallel={"pipeline": 5, "balance": "time"},
                             cluster={"workers": 5}))
    wide = {**mlp, "kwargs": {**mlp["kwargs"], "in_features": 65}}
    with pytest.raises(ShapeMismatchError, match=r"\(64,\)"):
        preflight(run_config(digits_store, tmp_path / "run", model=wide, parallel={"pipeline": 2}))


class _OneWorker:
    def nthreads(self) -> dict[str, int]:
        return {"tcp://127.0.0.1:1": 1}


def test_prepare_uses_the_checks_handed_to_it(digits_store: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import dasktrain.prepare

    cfg = run_config(digits_store, tmp_path / "run")
    checked = preflight(cfg)
    made: list[RunConfig] = []
    monkeypatch.setattr(dasktrain.prepare, "preflight", lambda c: made.append(c) or checked)
    got, facts = dasktrain.prepare.prepare_data(cfg, _OneWorker, checked=checked)  # type: ignore[arg-type]
    assert got is checked and made == [] and facts["samples"] == 1797 and facts["workers"] == 1
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"shards": 3})})
    dasktrain.prepare.prepare_data(other, _OneWorker, checked=checked)  # type: ignore[arg-type]
    assert made == [other]  # checks made for another config are not used: checked again
    dasktrain.prepare.prepare_data(cfg, _OneWorker)  # type: ignore[arg-type]
    assert made == [other, cfg]


def test_the_flow_takes_a_validated_config_as_it_is(digits_store: Path, tmp_path: Path) -> None:
    from dasktrain.flows.training import config_of

    cfg = run_config(digits_store, tmp_path / "run")
    assert config_of(cfg, []) is cfg
    assert config_of(cfg.model_dump(mode="json"), []) == cfg
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    assert config_of(str(path), ["train.epochs=5"]).train.epochs == 5
    with pytest.raises(ConfigError, match="overrides apply to a config file"):
        config_of(cfg, ["train.epochs=5"])
    with pytest.raises(ConfigError, match=r"^flow parameter config: cluster.workers=3 is more than train.shards=2"):
        config_of({**cfg.model_dump(mode="json"), "train": {"shards": 2}, "cluster": {"workers": 3}}, [])
