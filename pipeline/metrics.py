"""``metrics.jsonl``: one JSON line per step and per epoch, flushed as it is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dasktrain.errors import DataError

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends records to a run's metrics file; on resume, drops records past the resume point."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _before(line, resume_step)]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            self.path.write_text("")
        self._fh = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of a run's metrics file. A last line torn by a driver that was killed, or by a
    full disk, mid-write is left out; a damaged line before it is an error naming its number."""
    path = Path(run_dir) / METRICS_FILE
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
