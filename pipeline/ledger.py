"""The sample ledger: which samples each applied step was computed from, to audit exactly-once use.

With ``train.ledger: true`` every replica appends, for each step it computes, the store sample
indices it fed to the model, tagged with the driver's *generation* (bumped whenever the worker
set changes). The driver's step records say which generation's result each step applied, so a
step that was recomputed after a lost worker counts once, from the attempt that was used.

On object storage (no appends) each writer keeps its lines and rewrites its object whole once
per step: the ledger is an audit option, small, and off by default.

The library only writes the ledger; the audit that reads it back against ``metrics.jsonl`` lives
with the tests (``tests/ledger_check.py``), which check it from the files alone.
"""

from __future__ import annotations

import json
import os
from typing import Any

from dasktrain.registry import Resident
from dasktrain.storage import AnyPath, ObjectPath, locate

LEDGER_DIR = "ledger"


_OBJECT_LINES: Resident[list[str]] = Resident("ledger lines")
"""On object storage: this process's ledger lines of each run so far (freed with the run)."""


def append_entries(run_dir: str | AnyPath, writer: str, entries: list[dict[str, Any]]) -> None:
    """Append one line per entry to this writer's ledger file (one file per replica process, named
    after ``writer``, the run id): ``generation``, ``step`` (global), ``epoch``, ``shard`` and
    ``samples`` (store sample indices). One write per call: a step's shards together."""
    where = locate(run_dir, key="output_dir")
    text = "".join(json.dumps(entry) + "\n" for entry in entries)
    if isinstance(where, ObjectPath):
        target = where / LEDGER_DIR / f"{writer}-{os.getpid()}.jsonl"
        lines = _OBJECT_LINES.find(writer)
        if lines is None:
            lines = []
            _OBJECT_LINES.put(writer, lines)
        lines.append(text)
        target.write_text("".join(lines))
        return
    folder = where / LEDGER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{writer}-{os.getpid()}.jsonl", "a") as fh:
        fh.write(text)
