"""A run's report from its run directory: loss/accuracy curves as a PNG, and the summary and
per-epoch table that the flow publishes as Prefect artifacts. Plain files in, plain files out:
``dasktrain report RUN_DIR`` makes the same PNG without Prefect. A run directory on object storage
(a URL) is read and written there the same way."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dasktrain.errors import DataError
from dasktrain.metrics import METRICS_FILE, read_metrics
from dasktrain.storage import AnyPath, ObjectPath, is_url, locate

CURVES_FILE = "curves.png"
EVALUATION_FILE = "evaluation.json"

EPOCH_COLUMNS = ("epoch", "end_step", "samples", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                 "samples_per_s", "time_s")


def plot_curves(run_dir: str | AnyPath, out: str | AnyPath | None = None,
                storage_options: Mapping[str, Any] | None = None) -> AnyPath:
    """Write the loss (per step and per epoch) and accuracy (per epoch) curves of a run as a PNG
    (``out``, by default ``curves.png`` in the run directory; either may be a URL)."""
    # The object API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = locate(run_dir, storage_options, "run directory")
    records = _records(run_dir)
    steps = [r for r in records if r.get("kind") == "step" and not r.get("skipped")]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    if steps:
        loss_ax.plot([r["global_step"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.5,
                     label="train loss (step)")
    for key, label in (("train_loss", "train loss (epoch)"), ("val_loss", "validation loss")):
        points = [(r["end_step"], r[key]) for r in epochs if r.get(key) is not None]
        if points:
            loss_ax.plot(*zip(*points), marker="o", label=label)
    loss_ax.set(title="loss", xlabel="global step", ylabel="loss")
    for key, label in (("train_accuracy", "train"), ("val_accuracy", "validation")):
        points = [(r["epoch"] + 1, r[key]) for r in epochs if r.get(key) is not None]
        if points:
            acc_ax.plot(*zip(*points), marker="o", label=label)
    acc_ax.set(title="accuracy", xlabel="epoch", ylabel="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    path = locate(out, storage_options, "--out") if out is not None else run_dir / CURVES_FILE
    if isinstance(path, ObjectPath):
        png = io.BytesIO()
        fig.savefig(png, format="png")
        path.write_bytes(png.getvalue())
    else:
        fig.savefig(path)
    return path


def epoch_table(run_dir: str | AnyPath, storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per epoch record of ``metrics.jsonl`` (the columns of :data:`EPOCH_COLUMNS` it has)."""
    epochs = [r for r in _records(locate(run_dir, storage_options, "run directory")) if r.get("kind") == "epoch"]
    columns = [c for c in EPOCH_COLUMNS if any(c in r for r in epochs)]
    columns += sorted({k for r in epochs for k in r if k.startswith("val_") and k not in EPOCH_COLUMNS
                       and k != "val_samples"})  # the run's own metrics
    return [{c: _round(r.get(c)) for c in columns} for r in epochs]


def summary_markdown(facts: dict[str, Any]) -> str:
    """The run summary: config digest, dataset, workers, epochs, final metrics, run directory, curves."""
    url = is_url(facts["run_dir"])
    run_dir = facts["run_dir"] if url else Path(facts["run_dir"]).resolve()
    name = str(run_dir).rstrip("/").rpartition("/")[2]
    lines = [
        f"# dasktrain run `{name}`",
        "",
        "| | |",
        "| --- | --- |",
        f"| config digest | `{facts['config_digest']}` |",
        f"| dataset | `{facts['store']}`: {facts['samples']} samples in {facts['chunks']} chunks |",
        f"| workers | {facts['workers']} |",
        f"| epochs | {facts['epochs_done']} of {facts['epochs']} ({facts['steps']} steps) |",
        f"| completed | {'yes' if facts['completed'] else 'no'} |",
        f"| run directory | `{run_dir}` |",
    ]
    final = facts.get("final_epoch") or {}
    own = sorted(k for k in final if k.startswith("val_") and k not in ("val_loss", "val_accuracy", "val_samples"))
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", *own):
        if final.get(key) is not None:
            lines.append(f"| final {key.replace('_', ' ')} | {final[key]:.4f} |")
    evaluation = facts.get("evaluation") or {}
    for key, value in evaluation.items():  # loss, accuracy or error, and the run's own metrics
        if key not in ("split", "store", "samples", "predictions") and isinstance(value, (int, float)):
            lines.append(f"| {evaluation['split']} {key} ({evaluation['samples']} samples) | {value:.4f} |")
    for label, key in (("model", "model"), ("Hugging Face directory", "hf_pretrained"),
                       ("predictions", "predictions"), ("metrics", "metrics")):
        if facts.get(key):
            lines.append(f"| {label} | `{facts[key]}` |")
    curves = facts.get("curves")
    if curves and is_url(curves):
        lines += ["", f"Loss and accuracy curves: `{curves}`"]
    elif curves:
        png = Path(curves).resolve()
        lines += ["", f"Loss and accuracy curves: [{png.name}]({png.as_uri()}) (`{png}`)"]
    return "\n".join(lines) + "\n"


def write_evaluation(run_dir: str | AnyPath, evaluation: dict[str, Any],
                     storage_options: Mapping[str, Any] | None = None) -> AnyPath:
    path = locate(run_dir, storage_options, "run directory") / EVALUATION_FILE
    path.write_text(json.dumps(evaluation, indent=1))
    return path


def _records(run_dir: AnyPath) -> list[dict[str, Any]]:
    if not (run_dir / METRICS_FILE).is_file():
        raise DataError(f"{run_dir} holds no {METRICS_FILE}: not a run directory, or the run has not started")
    return read_metrics(run_dir)


def _round(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value):
        return round(value, 6)
    return value
