"""The sample ledger: which samples each applied step was computed from, to audit exactly-once use.

With ``train.ledger: true`` every replica appends, for each step it computes, the store sample
indices it fed to the model, tagged with the driver's *generation* (bumped whenever the worker
set changes). The driver's step records say which generation's result each step applied, so a
step that was recomputed after a lost worker counts once, from the attempt that was used.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from dasktrain.metrics import read_metrics

LEDGER_DIR = "ledger"


def append_entry(run_dir: str | Path, writer: str, entry: dict[str, Any]) -> None:
    """Append one line to this writer's ledger file (one file per replica process)."""
    folder = Path(run_dir) / LEDGER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{writer}-{os.getpid()}.jsonl", "a") as fh:
        fh.write(json.dumps(entry) + "\n")


def samples_per_epoch(run_dir: str | Path) -> dict[int, Counter[int]]:
    """For each epoch, how many times each sample was used by an applied step."""
    applied = {r["global_step"]: r["generation"] for r in read_metrics(Path(run_dir)) if r["kind"] == "step"}
    used: dict[int, Counter[int]] = {}
    seen: set[tuple[int, int, int]] = set()
    for path in sorted((Path(run_dir) / LEDGER_DIR).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            step, gen, shard = entry["step"], entry["generation"], entry["shard"]
            if applied.get(step) != gen or (step, gen, shard) in seen:
                continue
            seen.add((step, gen, shard))
            used.setdefault(entry["epoch"], Counter()).update(entry["samples"])
    return used


def check_exactly_once(run_dir: str | Path, expected: np.ndarray, epochs: int) -> None:
    """Raise AssertionError unless every sample of ``expected`` was used exactly once per epoch."""
    used = samples_per_epoch(run_dir)
    want = sorted(int(i) for i in expected)
    for epoch in range(epochs):
        counts = used.get(epoch, Counter())
        twice = sorted(i for i, n in counts.items() if n != 1)
        missing = sorted(set(want) - set(counts))
        extra = sorted(set(counts) - set(want))
        if twice or missing or extra:
            raise AssertionError(
                f"epoch {epoch}: {len(twice)} samples used more than once (e.g. {twice[:5]}), "
                f"{len(missing)} never used (e.g. {missing[:5]}), {len(extra)} not in the training set"
            )
