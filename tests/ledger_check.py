"""The exactly-once audit of a run's sample ledger (``train.ledger: true``; DESIGN.md invariant 4).

It reads the run directory's files as written and imports nothing from dasktrain, so it shares
no code with what it checks:

- ``ledger/*.jsonl``: one line per shard per step a replica computed: ``generation`` (the
  driver's worker-set generation), ``step`` (global), ``epoch``, ``shard`` and ``samples`` (store
  sample indices). A step recomputed after a lost worker appears once per attempt.
- ``metrics.jsonl``: the step records (``kind: step``) say, by ``generation``, which attempt's
  result each applied ``global_step`` used; only that attempt counts.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


def _records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path``; a last line torn by a killed writer is left out."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return records


def samples_per_epoch(run_dir: str | Path) -> dict[int, Counter[int]]:
    """For each epoch, how many times each sample was used by an applied step."""
    run_dir = Path(run_dir)
    applied = {r["global_step"]: r["generation"] for r in _records(run_dir / "metrics.jsonl") if r["kind"] == "step"}
    used: dict[int, Counter[int]] = {}
    seen: set[tuple[int, int, int]] = set()
    for path in sorted((run_dir / "ledger").glob("*.jsonl")):
        for entry in _records(path):
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
