"""A worker frozen with SIGSTOP (a hung node: its process neither dies nor answers).

The scheduler keeps listing a stopped worker for minutes, so nothing is "lost"; with
``train.step_timeout`` set the driver must notice that the scheduler hears no heartbeat from it,
drop it whatever task the step is stuck in (its step, a reduction, a transfer, an all-reduce),
regroup on the rest without waiting on it again, and finish with every sample used exactly once
per epoch and the weights of a fault-free run.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from dasktrain.run_loop import train
from tests.helpers import local_client, run_config, saved_weights
from tests.ledger_check import check_exactly_once
from tests.reference import max_relative_error
from tests.test_faults import regroups, training_samples

pytestmark = pytest.mark.timeout(240)


def frozen_config(store, out, **train):
    return run_config(store, out, optimizer={"name": "adamw", "lr": 0.003},
                      train={"epochs": 2, "batch_size": 50, "shards": 4, "seed": 3, "ledger": True,
                             "step_timeout": 3.0, **train},
                      checkpoint={"every_steps": 10, "keep": 2})


def freeze_at(client, step):
    """An on_event hook that SIGSTOPs the second worker's process when ``step`` is recorded."""
    frozen: list[tuple[str, int, float]] = []

    def on_event(event):
        if event["kind"] == "step" and event["global_step"] == step and not frozen:
            pids = client.run(os.getpid)
            address = sorted(pids)[1]
            os.kill(pids[address], signal.SIGSTOP)
            frozen.append((address, pids[address], time.monotonic()))

    return on_event, frozen


@pytest.mark.parametrize("mode", ["tree", "collective"])
def test_sigstopped_worker_is_dropped_and_the_run_finishes(digits_store, tmp_path, mode):
    options = {"deterministic": True} if mode == "tree" else {"reduce": "collective"}
    clean_config = frozen_config(digits_store, tmp_path / "clean", **options)
    config = clean_config.model_copy(update={"output_dir": str(tmp_path / "frozen")})
    with local_client(2) as client:
        train(clean_config, client=client)
        hook, frozen = freeze_at(client, 9)
        try:
            result = train(config, client=client, on_event=hook)
            finished = time.monotonic()
        finally:
            for _, pid, _ in frozen:
                os.kill(pid, signal.SIGCONT)  # let the cluster close it
    assert frozen and result.completed
    (address, _, stopped), = frozen
    events = regroups(tmp_path / "frozen")
    assert events and all(e["workers"] == 1 for e in events), events
    assert any(address in e["lost"] for e in events), events
    assert finished - stopped < 60, "the run waited on the frozen worker"
    check_exactly_once(tmp_path / "frozen", training_samples(config), epochs=2)
    got, clean = saved_weights(tmp_path / "frozen"), saved_weights(tmp_path / "clean")
    if mode == "tree":  # deterministic: the same bits whatever the worker set did
        for key in clean:
            assert torch.equal(got[key], clean[key]), key
    else:
        assert max_relative_error(got, clean) < 1e-5
