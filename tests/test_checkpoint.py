"""Checkpoint atomicity: a writer killed at any point never leaves a checkpoint resume would misread."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dasktrain.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint

WRITER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from dasktrain.checkpoint import save_checkpoint, latest_checkpoint, load_checkpoint
    run = Path(sys.argv[1])
    newest = latest_checkpoint(run)
    step = load_checkpoint(newest).step + 1 if newest else 1
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 256)).sum().backward()
    opt.step()
    print("ready", flush=True)
    while True:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))  # every tensor of checkpoint N holds N
        save_checkpoint(run, step, model.state_dict(), opt.state_dict(), {"marker": step}, keep=2)
        step += 1
""")


def assert_consistent(path):
    ckpt = load_checkpoint(path)
    assert ckpt.state["marker"] == ckpt.step
    for tensor in ckpt.model.values():
        assert torch.all(tensor == float(ckpt.step))
    assert set(ckpt.optimizer["state"]) == {0, 1}


@pytest.mark.timeout(180)
def test_killed_writer_always_leaves_a_complete_checkpoint(tmp_path):
    rng = random.Random(0)
    seen = 0
    for _ in range(10):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        newest = latest_checkpoint(tmp_path)
        if newest is None:
            continue
        for path in list_checkpoints(tmp_path):
            assert_consistent(path)
        step = load_checkpoint(newest).step
        assert step >= seen  # never goes back
        seen = step
    assert seen > 5  # the loop did write many checkpoints


def test_half_written_directories_are_never_picked(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path, 3, model.state_dict(), opt.state_dict(), {"marker": 3}, keep=3)
    (tmp_path / "checkpoints" / ".step-00000004.tmp-123").mkdir()  # a writer died here
    (tmp_path / "checkpoints" / "step-00000005").mkdir()  # no state.json: incomplete
    assert latest_checkpoint(tmp_path).name == "step-00000003"
