"""A tree step's numbers reach the driver as the workers' Dask events, and still do without them.

On a real LocalCluster of two worker processes, the same run is trained three times:

- as it is, with the driver allowed no wait at all for a step's events once the step's tasks
  have finished (``EVENTS_GRACE_S = 0``): the events must already be there (a worker sends its
  event before it reports its task finished, on the same stream), so the fallback is never taken;
- with every worker dropping its step events (a worker plugin wraps ``Worker.log_event``), so
  every step's numbers come from the fallback tasks;
- and the records of both must be the same, number for number: the driver's sum of the events is
  the numbers the tasks hold.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from distributed import WorkerPlugin

from dasktrain.engines.tree import TreeEngine
from dasktrain.metrics import read_metrics
from dasktrain.run_loop import train
from dasktrain.step_events import topic
from tests.helpers import local_client, plan_batches, run_config

pytestmark = pytest.mark.timeout(240)

FALLBACK = "did not all arrive"


class DropStepEvents(WorkerPlugin):
    """On every worker: its step events are never sent (a scheduler or network that loses them)."""

    name = "test-drop-step-events"

    def setup(self, worker: Any) -> None:
        original = worker.log_event

        def log_event(name: Any, msg: Any) -> None:
            if isinstance(name, str) and name.startswith(topic("")):
                return
            original(name, msg)

        worker.log_event = log_event


def records(run_dir: Path) -> list[dict[str, Any]]:
    """The step and epoch records, without what depends on timing."""
    kept = []
    for r in read_metrics(run_dir):
        if r["kind"] in ("step", "epoch"):
            kept.append({k: v for k, v in r.items() if not k.endswith("_s") and k not in ("chunks_read", "samples_per_s")})
    return kept


def test_step_numbers_come_from_events_and_without_them_from_the_tasks(digits_store, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(TreeEngine, "EVENTS_GRACE_S", 0.0)
    caplog.set_level(logging.WARNING, logger="dasktrain.engines.tree")

    def config(name: str):
        return run_config(digits_store, tmp_path / name,
                          train={"epochs": 2, "batch_size": 160, "shards": 2, "seed": 5, "ahead": 2})

    with local_client(2) as client:
        train(config("events"), client=client)
        assert not [r for r in caplog.records if FALLBACK in r.getMessage()], (
            "a step's events had not arrived when its tasks were seen finished")
        client.register_plugin(DropStepEvents())
        train(config("tasks"), client=client)
    fallbacks = [r for r in caplog.records if FALLBACK in r.getMessage()]
    from_events, from_tasks = records(tmp_path / "events"), records(tmp_path / "tasks")
    steps = [r for r in from_events if r["kind"] == "step"]
    assert len(steps) == 24 and len(fallbacks) >= len(steps), (len(steps), len(fallbacks))
    assert [r["samples"] for r in steps] == [len(b) for b in plan_batches(config("events"))]
    assert from_events == from_tasks
