"""``metrics.jsonl``: one JSON line per step and per epoch, flushed as it is written.

On object storage (``output_dir`` a URL) an object cannot be appended to: the lines are kept in
memory and the whole object is rewritten (one PUT) at most every :data:`UPLOAD_EVERY_S` seconds,
whenever the run loop calls :meth:`MetricsLog.flush` (at epoch ends and checkpoints) and on
close. A driver killed on object storage leaves the lines up to its last upload; ``--resume``
drops those past its checkpoint, as on disk, and a gap of a few steps before the checkpoint is
possible where the upload had not caught up.
"""

from __future__ import annotations

import json
import time
from typing import Any, TextIO

from dasktrain.errors import DataError
from dasktrain.storage import AnyPath, ObjectPath, locate

METRICS_FILE = "metrics.jsonl"
UPLOAD_EVERY_S = 5.0
"""On object storage: the longest time new lines wait before the metrics object is rewritten."""


class MetricsLog:
    """Appends records to a run's metrics file; on resume, drops records past the resume point."""

    def __init__(self, run_dir: AnyPath, resume_step: int | None = None) -> None:
        self.path = run_dir / METRICS_FILE
        self._lines: list[str] = []
        self._uploaded = time.monotonic()
        self._fh: TextIO | None = None
        self._pending = False
        if isinstance(self.path, ObjectPath):
            if resume_step is not None and self.path.exists():
                self._lines = [line + "\n" for line in self.path.read_text().splitlines() if _before(line, resume_step)]
            self._pending = True
            self.flush()
            return
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _before(line, resume_step)]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            self.path.write_text("")
        self._fh = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None:  # object storage: rewritten whole, now and then
            self._lines.append(json.dumps(record) + "\n")
            self._pending = True
            if time.monotonic() - self._uploaded >= UPLOAD_EVERY_S:
                self.flush()
            return
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def flush(self) -> None:
        """Make every line written so far durable (on disk each write is already flushed)."""
        if self._fh is None and self._pending:
            self.path.write_text("".join(self._lines))
            self._pending = False
            self._uploaded = time.monotonic()

    def close(self) -> None:
        if self._fh is None:
            self.flush()
            return
        self._fh.close()


def read_metrics(run_dir: str | AnyPath) -> list[dict[str, Any]]:
    """All records of a run's metrics file. A last line torn by a driver that was killed, or by a
    full disk, mid-write is left out; a damaged line before it is an error naming its number."""
    path = locate(run_dir, key="run directory") / METRICS_FILE
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise DataError(f"{path} line {n} is not a JSON record: {line[:80]!r}") from None
    return records


def _before(line: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False  # a line torn by a killed driver
    if record.get("kind") == "step":
        return int(record["global_step"]) < step
    return int(record.get("end_step", 0)) <= step
