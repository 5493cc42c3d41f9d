"""``train.ahead`` keeps that many steps submitted beyond the one the driver waits on.

Observed where it matters, on the scheduler: while a run whose steps are slow (one worker sleeps
in every forward, tests/sleepy.py) trains in a thread, the test polls the scheduler's task
states and counts the distinct steps whose step tasks (``<run>-g<n>-step-<t>-w<w>``) are not
finished yet. The driver waits on the oldest step and keeps ``ahead`` more submitted, so that
count reaches ``ahead + 1``, again and again as steps finish, and never exceeds it.
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import Any

import pytest

from dasktrain.run_loop import train
from tests.helpers import local_client, run_config

pytestmark = pytest.mark.timeout(180)

STEP_KEY = re.compile(r"-step-(\d+)a?-w\d+$")
UNFINISHED = {"waiting", "queued", "no-worker", "processing"}
POLL_S = 0.02
SLEEP_S = 0.3  # per step, in the flagged worker's forward


def steps_in_flight(dask_scheduler) -> list[int]:
    """Run on the scheduler: the steps some of whose step tasks are not finished."""
    steps = set()
    for key, task in dask_scheduler.tasks.items():
        found = STEP_KEY.search(str(key))
        if found and task.state in UNFINISHED:
            steps.add(int(found.group(1)))
    return sorted(steps)


@pytest.fixture(scope="module")
def client():
    with local_client(2) as c:
        yield c


@pytest.mark.parametrize("ahead", [1, 3])
def test_ahead_steps_stay_in_flight(digits_store, client, tmp_path, ahead):
    slow_pid = sorted(client.run(os.getpid).values())[0]
    flag = tmp_path / "flag"
    flag.write_text(str(slow_pid))
    config = run_config(
        digits_store, tmp_path / "run",
        model={"factory": "tests.sleepy:sleepy_mlp",
               "kwargs": {"flag": str(flag), "seconds": SLEEP_S, "in_features": 64, "out_features": 10, "hidden": [16]}},
        train={"epochs": 1, "batch_size": 160, "shards": 2, "seed": 3, "ahead": ahead},  # 12 steps
    )
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = train(config, client=client)
        except BaseException as exc:  # re-raised in the test's thread
            outcome["error"] = exc

    trainer = threading.Thread(target=run, daemon=True)
    trainer.start()
    seen: list[list[int]] = []
    deadline = time.monotonic() + 120
    while trainer.is_alive():
        assert time.monotonic() < deadline, f"the run did not end in time; in flight: {seen[-5:]}"
        seen.append(client.run_on_scheduler(steps_in_flight))
        trainer.join(POLL_S)
    if "error" in outcome:
        raise outcome["error"]
    assert outcome["result"].completed and outcome["result"].steps == 12
    most = max(len(s) for s in seen)
    assert most <= ahead + 1, f"more than ahead + 1 = {ahead + 1} steps in flight: {max(seen, key=len)}"
    # Full again after the driver took results: not only the first burst of submissions.
    refilled = sorted({s[0] for s in seen if len(s) == ahead + 1 and s[0] > 0})
    assert most == ahead + 1 and len(refilled) >= 3, (
        f"expected {ahead + 1} steps in flight at several points; most seen {most}; "
        f"full windows began at steps {refilled}; last samples {seen[-10:]}")
